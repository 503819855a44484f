//! Writing a new message: into `tmp/` under a lock, hashed as it is written,
//! then committed (fsync, rename `.msg` then `.env` into the tenant's folder,
//! fsync the folder). Dropped without a commit, it leaves nothing behind.

use super::envelope::{self, Record};
use super::layout::sync_dir;
use super::{MessageId, Result, Spool, SpoolError};
use crate::base::clock::now_ms;
use crate::base::fs::{create_new, make_dir, write_new_file};
use crate::base::hex::hex;
use crate::base::names::TenantName;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// 0660 whatever the submitter's umask: the daemon (the spool's group) appends
/// delivery results to envelopes that a PBX user's sendmail created.
const GROUP_WRITABLE: u32 = 0o660;

impl Spool {
    /// Starts writing a new message into `tmp/`, locked against recovery.
    pub fn begin_submission(&self) -> Result<Submission> {
        // Recovery may remove a file between its creation and our lock; then
        // its link count is 0 and we start over with a new one.
        for _ in 0..8 {
            let (id, path, file) = self.create_locked_tmp()?;
            let linked = file
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::nlink(&m) > 0);
            if linked.map_err(SpoolError::io(&path))? {
                return Ok(self.submission(id, path, file));
            }
        }
        let tmp = self.tmp_dir();
        Err(SpoolError::io(&tmp)(io::Error::other(
            "new spool files keep disappearing; is a second recovery running?",
        )))
    }

    fn create_locked_tmp(&self) -> Result<(MessageId, PathBuf, File)> {
        let id = MessageId::generate();
        let path = self.tmp_dir().join(format!("{id}.msg"));
        let create = || create_new(&path, GROUP_WRITABLE);
        let file = match create() {
            // A spool the daemon has not run on yet: make its folders.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_layout()?;
                create()
            }
            other => other,
        }
        .map_err(SpoolError::io(&path))?;
        // Held until this process closes the file: recovery leaves it alone.
        file.lock().map_err(SpoolError::io(&path))?;
        Ok((id, path, file))
    }

    fn submission(&self, id: MessageId, path: PathBuf, file: File) -> Submission {
        Submission {
            spool: self.clone(),
            id,
            out: BufWriter::with_capacity(64 * 1024, file),
            sha256: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
            tmp_message: path,
            committed: false,
        }
    }
}

/// A message being written. Dropped without `commit`, it leaves nothing behind.
pub struct Submission {
    spool: Spool,
    id: MessageId,
    out: BufWriter<File>,
    sha256: ring::digest::Context,
    size: u64,
    tmp_message: PathBuf,
    committed: bool,
}

impl Write for Submission {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        if let Some(written) = buf.get(..n) {
            self.sha256.update(written);
        }
        self.size = self.size.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Submission {
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// Makes the message durable in `tenant`'s queue; on `Ok` it may be acknowledged.
    pub fn commit(
        self,
        tenant: &TenantName,
        sender: &str,
        recipients: &[String],
    ) -> Result<MessageId> {
        self.commit_as(tenant, sender, recipients, None)
    }

    /// `commit` for a bounce pbxmail made itself.
    pub fn commit_as(
        mut self,
        tenant: &TenantName,
        sender: &str,
        recipients: &[String],
        bounce: Option<envelope::BounceOf>,
    ) -> Result<MessageId> {
        let tmp_msg = self.tmp_message.clone();
        self.out.flush().map_err(SpoolError::io(&tmp_msg))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(SpoolError::io(&tmp_msg))?;

        let digest = self.sha256.clone().finish();
        let record = Record::Created {
            version: envelope::FORMAT_VERSION,
            tenant: tenant.to_string(),
            sender: sender.to_string(),
            recipients: recipients.to_vec(),
            queued_at_ms: now_ms(),
            size: self.size,
            sha256: hex(digest.as_ref()),
            bounce,
        };
        let tmp_env = self.tmp_message.with_extension("env");
        let result = write_new_file(&tmp_env, GROUP_WRITABLE, |f| {
            envelope::write_record(f, &record)
        })
        .map_err(SpoolError::io(&tmp_env))
        .and_then(|()| self.move_into_queue(tenant, &tmp_env));
        if result.is_err() {
            let _ = fs::remove_file(&tmp_env);
        }
        result?;
        self.committed = true;
        Ok(self.id.clone())
    }

    fn move_into_queue(&self, tenant: &TenantName, tmp_env: &Path) -> Result<()> {
        let dir = self.spool.tenant_dir(tenant);
        if !dir.is_dir() {
            make_dir(&dir, 0o2770).map_err(SpoolError::io(&dir))?;
            sync_dir(&self.spool.queue_dir())?;
        }
        let msg = self.spool.message_path(tenant, &self.id);
        let env = self.spool.envelope_path(tenant, &self.id);
        fs::rename(&self.tmp_message, &msg).map_err(SpoolError::io(&msg))?;
        if let Err(e) = fs::rename(tmp_env, &env) {
            let _ = fs::remove_file(&msg);
            return Err(SpoolError::io(&env)(e));
        }
        sync_dir(&dir)?;
        sync_dir(&self.spool.tmp_dir())
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp_message);
        }
    }
}
