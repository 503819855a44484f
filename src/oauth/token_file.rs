//! The refresh token on disk (`oauth_token_file`): read it; replace it
//! atomically, readable by its owner only, who is the folder's owner when
//! root writes it; and remove the temporary files a crash left beside it.

use super::OAuthError;
use crate::base::secret::Secret;
use serde::Deserialize;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A temporary file this old is a crash's even when its writer's process ID
/// cannot be read from its name or was reused: a write takes milliseconds.
const STALE_AFTER: Duration = Duration::from_secs(10 * 60);

/// The refresh token as stored in `oauth_token_file`.
#[derive(serde::Serialize, Deserialize)]
struct TokenFileContent {
    refresh_token: String,
}

pub fn read_refresh_token(path: &Path) -> Result<Secret, OAuthError> {
    let text =
        crate::base::fs::read_small_file(path, crate::base::fs::MAX_SECRET_FILE).map_err(|e| {
            OAuthError::SignInNeeded(format!("no refresh token stored: {}: {e}", path.display()))
        })?;
    let content: TokenFileContent = serde_json::from_slice(&text).map_err(|e| {
        OAuthError::SignInNeeded(format!("{} is not a token file: {e}", path.display()))
    })?;
    Ok(Secret::new(content.refresh_token))
}

/// Who owns a token file just written, for the admin to check against the
/// user the daemon runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    /// The user ID's name in /etc/passwd, if it has one.
    pub name: Option<String>,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// Replaces the token file atomically (temp, fsync, rename, fsync folder),
/// readable by its owner only, so a crash leaves either the old or the new
/// token. Returns who owns the file now.
pub fn write_refresh_token(path: &Path, token: &Secret) -> Result<Owner, OAuthError> {
    let fail = |e: io::Error| {
        OAuthError::Config(format!(
            "cannot write {}: {e} (its folder must be writable by the user pbxmail runs as, \
             on a disk with room)",
            path.display()
        ))
    };
    let dir = folder_of(path);
    fs::create_dir_all(dir).map_err(fail)?;
    let folder = File::open(dir).map_err(fail)?;
    let tmp = dir.join(temp_name(path));
    let content = serde_json::to_vec(&TokenFileContent {
        refresh_token: token.expose().to_string(),
    })
    .map_err(|e| OAuthError::Config(e.to_string()))?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    let written = fill(&file, &folder, &content).and_then(|owner| {
        fs::rename(&tmp, path)?;
        Ok(owner)
    });
    let owner = match written {
        Ok(owner) => owner,
        Err(e) => {
            // It holds a refresh token: not left behind when the write failed.
            let _ = fs::remove_file(&tmp);
            return Err(fail(e));
        }
    };
    folder.sync_all().map_err(fail)?;
    Ok(Owner {
        name: crate::accounts::user_name(owner),
        uid: owner,
    })
}

/// The new temp file's owner (see `owner_for`), then its content, on disk;
/// returns its owner's uid.
fn fill(mut file: &File, folder: &File, content: &[u8]) -> io::Result<u32> {
    let root = rustix::process::geteuid().is_root();
    let dir = rustix::fs::fstat(folder)?;
    if let Some((uid, gid)) = owner_for(root, dir.st_uid, dir.st_gid) {
        rustix::fs::fchown(
            file,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
    }
    file.write_all(content)?;
    file.sync_all()?;
    Ok(rustix::fs::fstat(file)?.st_uid)
}

/// The owner and group a new token file is given: as root, its folder's.
/// The package makes the folder the daemon's, so a token that `sudo pbxmail
/// oauth login` stores is the daemon's to read and to replace when the
/// provider rotates it. Anyone else keeps the file as the kernel made it, the
/// writer's own (the daemon's, when the daemon rotates the token).
fn owner_for(writer_is_root: bool, folder_uid: u32, folder_gid: u32) -> Option<(u32, u32)> {
    writer_is_root.then_some((folder_uid, folder_gid))
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Stores the refresh token a sign-in got, and tells the admin where and
/// whose the file is: the daemon must be able to read it.
pub(super) fn store_sign_in(
    path: &Path,
    refresh: String,
    say: &mut dyn FnMut(&str),
) -> Result<(), OAuthError> {
    let owner = write_refresh_token(path, &Secret::new(refresh))?;
    say(&format!(
        "Signed in; refresh token stored in {}, owned by {owner}, mode 0600",
        path.display()
    ));
    if owner.uid == 0 && rustix::process::geteuid().is_root() {
        let dir = folder_of(path).display();
        say(&format!(
            "Note: {dir} belongs to root, so the token file does too. If the daemon runs as \
             another user (the package's runs as pbxmail), give it the folder and the file \
             (chown -R pbxmail: {dir}), or it cannot read the token."
        ));
    }
    Ok(())
}

/// `.NAME.PID.ID.tmp` beside the token file: unique (the daemon rotating a
/// token and `oauth login` never share one), hidden, and naming its writer so
/// a later start can tell a crash's leftover from a write in progress.
fn temp_name(path: &Path) -> String {
    format!(
        ".{}.{}.{}.tmp",
        file_name(path),
        std::process::id(),
        crate::base::names::MessageId::generate()
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What a temporary file's name says of its writer.
#[derive(Debug, PartialEq, Eq)]
enum Writer {
    /// `.NAME.PID.ID.tmp`.
    Process(u32),
    /// `.NAME.ID.tmp`, as versions before the process ID was added wrote.
    Unknown,
}

/// The writer of `name` if it is one of `token_name`'s temporary files.
fn temp_writer(name: &str, token_name: &str) -> Option<Writer> {
    let middle = name
        .strip_prefix('.')?
        .strip_prefix(token_name)?
        .strip_prefix('.')?
        .strip_suffix(".tmp")?;
    if middle.is_empty() {
        return None;
    }
    Some(match middle.split_once('.') {
        Some((pid, id)) if !id.is_empty() => pid.parse().map_or(Writer::Unknown, Writer::Process),
        _ => Writer::Unknown,
    })
}

/// True while a process with this ID runs (kill -0 succeeds or is refused).
fn is_running(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// Removes the temporary files an interrupted write left beside the token
/// file (each holds a refresh token): those whose writer no longer runs, and
/// any older than `STALE_AFTER`. Never the token file itself, nor a write in
/// progress. Returns what it removed; `Err` only if the folder is unreadable.
pub fn remove_stale_temps(path: &Path) -> io::Result<Vec<PathBuf>> {
    let token_name = file_name(path);
    let mut removed = Vec::new();
    let entries = match fs::read_dir(folder_of(path)) {
        Ok(entries) => entries,
        // No folder yet: nothing left over either.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(writer) = temp_writer(&name, &token_name) else {
            continue;
        };
        let temp = entry.path();
        // Only regular files (not a symlink or folder someone put there).
        let Ok(meta) = fs::symlink_metadata(&temp) else {
            continue;
        };
        if !meta.file_type().is_file() || temp == path {
            continue;
        }
        let old = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > STALE_AFTER);
        let orphan = matches!(writer, Writer::Process(pid) if !is_running(pid));
        if (old || orphan) && fs::remove_file(&temp).is_ok() {
            removed.push(temp);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pbxmail-oauth-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn temps(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn token_file_is_private_and_replaced_whole() {
        let dir = scratch("replace");
        let path = dir.join("acme.json");
        write_refresh_token(&path, &Secret::new("first".into())).unwrap();
        let owner = write_refresh_token(&path, &Secret::new("second".into())).unwrap();
        assert_eq!(read_refresh_token(&path).unwrap().expose(), "second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(owner.uid, fs::metadata(&path).unwrap().uid());
        assert!(temps(&dir).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_token_file_means_sign_in() {
        let err = read_refresh_token(Path::new("/nonexistent/pbxmail/token.json")).unwrap_err();
        assert!(matches!(err, OAuthError::SignInNeeded(_)));
    }

    /// Read on the tenant thread: a FIFO or device named as the token file
    /// must neither block it nor fill its memory.
    #[test]
    fn a_token_file_that_is_not_a_regular_file_means_sign_in_at_once() {
        let dir = scratch("fifo");
        let fifo = dir.join("token.json");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        for path in [fifo.as_path(), Path::new("/dev/zero")] {
            match read_refresh_token(path) {
                Err(OAuthError::SignInNeeded(why)) => {
                    assert!(why.contains("not a regular file"), "{why}")
                }
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("{} read as a token", path.display()),
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_root_hands_the_file_to_the_folders_owner() {
        assert_eq!(owner_for(true, 998, 997), Some((998, 997)));
        assert_eq!(owner_for(true, 0, 0), Some((0, 0)));
        assert_eq!(owner_for(false, 998, 997), None);
    }

    #[test]
    fn written_as_root_the_file_belongs_to_the_folders_owner() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root (owner_for is tested without)");
            return;
        }
        let dir = scratch("owner");
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let path = dir.join("acme.json");
        let owner = write_refresh_token(&path, &Secret::new("t".into())).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(owner.uid, 65534);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_keeps_the_old_token_and_leaves_no_temp_file() {
        let dir = scratch("failed");
        // The temp file's name is ~35 bytes longer than the token file's:
        // past NAME_MAX (255), so the write fails even for root.
        let path = dir.join(format!("{}.json", "a".repeat(225)));
        fs::write(&path, r#"{"refresh_token":"old"}"#).unwrap();
        let err = write_refresh_token(&path, &Secret::new("new".into())).unwrap_err();
        assert!(matches!(err, OAuthError::Config(_)), "{err:?}");
        assert!(err.to_string().contains("writable"), "{err}");
        assert_eq!(read_refresh_token(&path).unwrap().expose(), "old");
        assert!(temps(&dir).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn temp_names_are_recognised_with_their_writer() {
        let name = temp_name(Path::new("/x/acme.json"));
        assert_eq!(
            temp_writer(&name, "acme.json"),
            Some(Writer::Process(std::process::id()))
        );
        assert_eq!(
            temp_writer(".acme.json.06B03E181B954E001FA6001.tmp", "acme.json"),
            Some(Writer::Unknown)
        );
        for other in [
            "acme.json",
            ".acme.json.tmp",
            ".acme.json..tmp",
            ".shop.json.1.X.tmp",
            ".acme.jsonx.1.X.tmp",
            "acme.json.1.X.tmp",
        ] {
            assert_eq!(temp_writer(other, "acme.json"), None, "{other}");
        }
    }

    #[test]
    fn stale_temps_go_and_the_token_file_and_live_writes_stay() {
        let dir = scratch("stale");
        let path = dir.join("acme.json");
        write_refresh_token(&path, &Secret::new("live".into())).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        let files = [
            (format!(".acme.json.{dead}.X1.tmp"), false),
            (format!(".acme.json.{mine}.X2.tmp"), true),
            (".acme.json.06B03E181B954E001FA6001.tmp".to_string(), true),
            (".acme.json.06B03E181B954E001FA6002.tmp".to_string(), false),
            (format!(".shop.json.{dead}.X3.tmp"), true),
        ];
        for (name, _) in &files {
            fs::write(dir.join(name), "{}").unwrap();
        }
        // An hour old: a crash's, whoever wrote it.
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(dir.join(".acme.json.06B03E181B954E001FA6002.tmp"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let removed = remove_stale_temps(&path).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        for (name, kept) in &files {
            assert_eq!(dir.join(name).exists(), *kept, "{name}");
        }
        assert_eq!(read_refresh_token(&path).unwrap().expose(), "live");
        assert!(remove_stale_temps(&dir.join("none").join("x.json"))
            .unwrap()
            .is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
