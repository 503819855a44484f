//! One queued entry's life after commit: read its envelope and message,
//! append delivery records, check it (fsck), remove it when done.

use super::envelope::{self, Envelope, Record};
use super::layout::sync_dir;
use super::scan::scan_message;
use super::{MessageId, Result, Spool, SpoolError};
use crate::base::framing::cut_torn_tail;
use crate::base::names::TenantName;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader};

impl Spool {
    pub fn load_envelope(&self, tenant: &TenantName, id: &MessageId) -> Result<Envelope> {
        let path = self.envelope_path(tenant, id);
        let file = File::open(&path).map_err(SpoolError::io(&path))?;
        envelope::read_envelope(&mut BufReader::new(file))
            .map_err(|source| SpoolError::Envelope { path, source })
    }

    pub fn open_message(&self, tenant: &TenantName, id: &MessageId) -> Result<File> {
        let path = self.message_path(tenant, id);
        File::open(&path).map_err(SpoolError::io(&path))
    }

    /// Appends a record and waits until it is on stable storage. A torn
    /// final record (a crash mid-append) is cut off first: nothing acted on
    /// it, and appending after it would fuse the two into one bad line.
    pub fn append(&self, tenant: &TenantName, id: &MessageId, record: &Record) -> Result<()> {
        let path = self.envelope_path(tenant, id);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(SpoolError::io(&path))?;
        cut_torn_tail(&mut file).map_err(SpoolError::io(&path))?;
        envelope::write_record(&mut file, record).map_err(SpoolError::io(&path))?;
        file.sync_data().map_err(SpoolError::io(&path))
    }

    /// Removes a finished message. The envelope leaves `queue/` first, into
    /// `tmp/`: from that rename on, the `.msg` left behind is visibly in
    /// transit (its `.env` is in `tmp/`), which recovery removes, never an
    /// orphan (a `.msg` whose envelope vanished after commit) that it must
    /// quarantine. Sweeps (recovery.rs) may finish the job meanwhile, so a
    /// file already gone is no error after the first rename.
    pub fn remove(&self, tenant: &TenantName, id: &MessageId) -> Result<()> {
        let env = self.envelope_path(tenant, id);
        let leaving = self.tmp_dir().join(format!("{id}.env"));
        fs::rename(&env, &leaving).map_err(SpoolError::io(&env))?;
        let msg = self.message_path(tenant, id);
        remove_if_present(&msg)?;
        sync_dir(&self.tenant_dir(tenant))?;
        // Not synced: should it come back after a crash, its `.msg` is gone
        // and recovery removes it as the leftover it is.
        remove_if_present(&leaving)
    }

    /// fsck's check of one entry: envelope records and the message checksum.
    /// `Ok(Some(reason))` when it is damaged; `Err` when it cannot be checked
    /// now (a transient error, `SpoolError::is_damage`), which is no verdict.
    pub fn verify(&self, tenant: &TenantName, id: &MessageId) -> Result<Option<String>> {
        let envelope = match self.load_envelope(tenant, id) {
            Ok(envelope) => envelope,
            Err(e) if e.is_damage() => return Ok(Some(e.to_string())),
            Err(e) => return Err(e),
        };
        let mut file = match self.open_message(tenant, id) {
            Ok(file) => file,
            // Unless the daemon removed the whole entry meanwhile.
            Err(e) if e.is_not_found() && !self.envelope_path(tenant, id).exists() => {
                return Err(e)
            }
            Err(e) if e.is_not_found() => {
                return Ok(Some(format!("message file missing or unreadable: {e}")))
            }
            Err(e) => return Err(e),
        };
        let path = self.message_path(tenant, id);
        let scan = scan_message(&mut file).map_err(SpoolError::io(&path))?;
        if scan.sha256 != envelope.sha256 {
            return Ok(Some(format!(
                "message file checksum mismatch (SHA-256 {}, envelope says {})",
                scan.sha256, envelope.sha256
            )));
        }
        Ok(None)
    }
}

/// Unlinks `path`; already gone is fine.
fn remove_if_present(path: &std::path::Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SpoolError::io(path)(e)),
        _ => Ok(()),
    }
}
