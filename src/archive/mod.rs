//! The journal archive: an append-only copy of every message a tenant sends,
//! per user (the sender's local part: the PBX extension), as Maildir under
//! `archive_dir/TENANT/USER/` so standard tools and an IMAP server can read
//! it, plus a hash-chained journal (journal.rs) for verification and billing
//! (verify.rs, usage.rs). pbxmail never deletes from it except through
//! `archive prune`, which is journaled.
//!
//! Files are 0640 and folders 2750: the setgid bit hands the tenant's
//! `archive_group` down to everything below, so its administrators can read
//! it and nobody else can.

pub mod journal;
pub mod verify;

use crate::base::clock::now_secs;
use crate::base::fs::sync_dir;
use crate::base::names::MessageId;
use crate::base::names::TenantName;
use crate::spool::Spool;
use journal::Entry;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a tenant's archiving needs from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub root: PathBuf,
    /// Only these users (local parts) are archived; None = everyone.
    pub users: Option<Vec<String>>,
    pub group: Option<String>,
    pub hostname: String,
}

/// The folder of one tenant's archive.
pub fn tenant_dir(root: &Path, tenant: &TenantName) -> PathBuf {
    root.join(tenant.as_str())
}

pub fn journal_path(root: &Path, tenant: &TenantName) -> PathBuf {
    tenant_dir(root, tenant).join("journal")
}

/// Who a message is archived for: the envelope sender's local part, or for
/// a bounce (null sender) the local part of the user it is returned to.
pub fn user_of(sender: &str, recipients: &[String]) -> String {
    let address = if sender.is_empty() {
        recipients.first().map(String::as_str).unwrap_or("")
    } else {
        sender
    };
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    // A folder name: keep it to what is safe in a path.
    let safe: String = local
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match safe.as_str() {
        "" | "." | ".." => "_".to_string(),
        _ => safe,
    }
}

impl Policy {
    pub fn archives(&self, user: &str) -> bool {
        self.users
            .as_ref()
            .is_none_or(|users| users.iter().any(|u| u == user))
    }

    /// Copies a finished message into the archive and journals it, unless it
    /// already was (a retry after a crash between journaling and spool
    /// removal): exactly one copy and one record either way. Call before
    /// removing it from the spool.
    ///
    /// The Maildir name comes from the queue ID and a record is appended only
    /// once its file is in new/, so a missing file means no record: the
    /// common path never reads the journal. Only when the file is already
    /// there (a retry after a crash, before or after its record was written)
    /// is the whole journal searched, so a record far from its end is found.
    pub fn archive(
        &self,
        spool: &Spool,
        tenant: &TenantName,
        id: &MessageId,
        user: &str,
        queued_at_secs: u64,
    ) -> io::Result<()> {
        let tenant_dir = tenant_dir(&self.root, tenant);
        let journal = journal_path(&self.root, tenant);
        let gid = self
            .group
            .as_deref()
            .map(crate::accounts::group_id)
            .transpose()?;
        make_dir(&self.root, None)?;
        make_dir(&tenant_dir, gid)?;
        let user_dir = tenant_dir.join(user);
        for sub in ["", "tmp", "new", "cur"] {
            make_dir(&user_dir.join(sub), gid)?;
        }
        // The name comes from the queue ID, so a retry finds its own copy.
        let name = format!("{queued_at_secs}.P{id}.{}", self.hostname);
        let final_path = user_dir.join("new").join(&name);
        if final_path.try_exists()? {
            if journal::has_archived(&journal, &id.to_string())? {
                return Ok(());
            }
        } else {
            let tmp = user_dir.join("tmp").join(&name);
            let mut source = spool.open_message(tenant, id).map_err(io::Error::other)?;
            copy_durably(&mut source, &tmp)?;
            fs::rename(&tmp, &final_path)?;
            sync_dir(&user_dir.join("new"))?;
        }
        let mut file = File::open(&final_path)?;
        let scan = crate::spool::scan_message(&mut file)?;
        let entry = Entry::Archived {
            queue_id: id.to_string(),
            message_id: message_id_header(&final_path),
            user: user.to_string(),
            file: format!("{user}/new/{name}"),
            size: file.metadata()?.len(),
            sha256: scan.sha256,
        };
        journal::append(&journal, entry, now_secs())?;
        Ok(())
    }
}

fn copy_durably(source: &mut File, to: &Path) -> io::Result<()> {
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(to)?;
    io::copy(source, &mut out)?;
    out.sync_all()
}

fn make_dir(path: &Path, gid: Option<u32>) -> io::Result<()> {
    if !path.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(path)?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        // setgid: files and folders below get the folder's group.
        fs::set_permissions(path, fs::Permissions::from_mode(0o2750))?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Who runs an admin command that changes the archive, for its journal
/// record: the real user ID is what counts; the names help a reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub uid: u32,
    /// The user ID's name in /etc/passwd.
    pub user_name: Option<String>,
    /// `SUDO_USER`: who ran it through sudo (as root or `sudo -u pbxmail`).
    pub sudo_user: Option<String>,
}

impl Operator {
    pub fn current() -> Operator {
        let uid = rustix::process::getuid().as_raw();
        Operator {
            uid,
            user_name: crate::accounts::user_name(uid),
            sudo_user: std::env::var("SUDO_USER").ok().filter(|u| !u.is_empty()),
        }
    }
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {}", self.uid)?;
        if let Some(name) = &self.user_name {
            write!(f, " ({name})")?;
        }
        if let Some(sudo) = &self.sudo_user {
            write!(f, " via sudo by {sudo}")?;
        }
        Ok(())
    }
}

fn message_id_header(path: &Path) -> Option<String> {
    let file = File::open(path).ok()?;
    let reader = BufReader::new(file.take(64 * 1024));
    reader
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.trim_end().is_empty())
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("Message-ID")
                .then(|| value.trim().to_string())
        })
}

/// A spool and an archive under one temp folder, for this module's tests.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;
    use std::io::Write;

    pub(crate) struct Scene {
        pub(crate) base: PathBuf,
        pub(crate) spool: Spool,
        pub(crate) policy: Policy,
    }

    impl Scene {
        /// Fresh folders named for the test (`pbxmail-NAME-PID`).
        pub(crate) fn new(name: &str) -> Scene {
            let base = std::env::temp_dir().join(format!("pbxmail-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&base);
            let spool = Spool::new(&base.join("spool"));
            spool.create_layout().unwrap();
            let policy = Policy {
                root: base.join("archive"),
                users: None,
                group: None,
                hostname: "pbx".into(),
            };
            Scene {
                base,
                spool,
                policy,
            }
        }

        /// Queues `message` for tenant acme from extension 101 and archives it.
        pub(crate) fn archive(&self, message: &[u8]) -> MessageId {
            let mut sub = self.spool.begin_submission().unwrap();
            sub.write_all(message).unwrap();
            let id = sub
                .commit(
                    &TenantName::parse("acme").unwrap(),
                    "101@acme.example",
                    &["a@x.example".into()],
                )
                .unwrap();
            self.archive_again(&id);
            id
        }

        /// Archives a queued message once more, as a retry would.
        pub(crate) fn archive_again(&self, id: &MessageId) {
            self.policy
                .archive(
                    &self.spool,
                    &TenantName::parse("acme").unwrap(),
                    id,
                    "101",
                    1,
                )
                .unwrap();
        }
    }

    impl Drop for Scene {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::Scene;
    use super::*;

    #[test]
    fn users_are_extensions_and_safe_folder_names() {
        assert_eq!(user_of("101@acme.example", &[]), "101");
        assert_eq!(user_of("", &["102@acme.example".into()]), "102");
        assert_eq!(user_of("../x@acme.example", &[]), ".._x");
        assert_eq!(user_of("..@acme.example", &[]), "_");
    }

    #[test]
    fn archiving_twice_keeps_one_copy_and_one_record() {
        let scene = Scene::new("archive");
        let (base, policy) = (&scene.base, &scene.policy);
        let id = scene.archive(b"Message-ID: <m1@x>\r\nSubject: vm\r\n\r\nbody\r\n");
        scene.archive_again(&id);
        let files: Vec<_> = fs::read_dir(base.join("archive/acme/101/new"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1);
        let records = journal::read_all(&journal_path(
            &policy.root,
            &TenantName::parse("acme").unwrap(),
        ))
        .unwrap();
        assert_eq!(records.len(), 1);
        let mode = fs::metadata(base.join("archive/acme/101"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o2750);
    }

    /// The old check read only the journal's last 256 KiB: a retry after
    /// that much more archiving journaled the message a second time.
    #[test]
    fn a_retry_after_a_long_journal_adds_no_second_record() {
        let scene = Scene::new("archive-long");
        let base = &scene.base;
        let journal = journal_path(&scene.policy.root, &TenantName::parse("acme").unwrap());
        let id = scene.archive(b"Message-ID: <m1@x>\r\n\r\nbody\r\n");
        journal::pad(&journal, 2000).unwrap();
        assert!(fs::metadata(&journal).unwrap().len() > 512 * 1024);
        scene.archive_again(&id);
        let records = journal::read_all(&journal).unwrap();
        assert_eq!(records.len(), 2001);
        let ours = records
            .iter()
            .filter_map(|line| match line {
                journal::Line::Record(r) => Some(&r.entry),
                journal::Line::Damaged { .. } => None,
            })
            .filter(
                |e| matches!(e, Entry::Archived { queue_id, .. } if *queue_id == id.to_string()),
            )
            .count();
        assert_eq!(ours, 1);
        assert_eq!(
            fs::read_dir(base.join("archive/acme/101/new"))
                .unwrap()
                .count(),
            1
        );
    }
}
