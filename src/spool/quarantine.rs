//! Damaged entries and stray files, moved aside with a note of why: never
//! deleted, never sent, listed for an admin by `queue` and `fsck`.

use super::envelope::{self, Envelope};
use super::layout::{list_dir, sync_dir};
use super::{MessageId, Result, Spool, SpoolError};
use crate::base::names::TenantName;
use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::Path;

impl Spool {
    /// Moves a damaged entry aside with a note of why; never deletes it.
    pub fn quarantine(&self, tenant: &TenantName, id: &MessageId, reason: &str) -> Result<()> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        for (from, ext) in [
            (self.message_path(tenant, id), "msg"),
            (self.envelope_path(tenant, id), "env"),
        ] {
            let to = dir.join(format!("{tenant}-{id}.{ext}"));
            match fs::rename(&from, &to) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SpoolError::io(&from)(e))
                }
                _ => {}
            }
        }
        let note = dir.join(format!("{tenant}-{id}.reason"));
        fs::write(&note, format!("{reason}\n")).map_err(SpoolError::io(&note))?;
        sync_dir(&dir)?;
        sync_dir(&self.tenant_dir(tenant))
    }

    /// Moves a file that is not a spool entry into quarantine, with the reason.
    pub fn quarantine_stray(&self, tenant: &TenantName, path: &Path, reason: &str) -> Result<()> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("unnamed");
        let base = format!("{tenant}-stray.{name}");
        fs::rename(path, dir.join(&base)).map_err(SpoolError::io(path))?;
        let note = dir.join(format!("{base}.reason"));
        fs::write(&note, format!("{reason}\n")).map_err(SpoolError::io(&note))?;
        sync_dir(&dir)?;
        sync_dir(&self.tenant_dir(tenant))
    }

    /// Entries moved aside as damaged, with the reason recorded for each.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>> {
        let mut entries = Vec::new();
        for path in list_dir(&self.quarantine_dir())? {
            if path.extension().is_none_or(|e| e != "reason") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            // A note describes a quarantined message (stem.env / stem.msg) or
            // stray (stem itself); a stray whose own name ends in .reason is not one.
            let describes = |suffix: &str| path.with_file_name(format!("{stem}{suffix}")).exists();
            if !(describes("") || describes(".env") || describes(".msg")) {
                continue;
            }
            // TENANT-ID or TENANT-stray.NAME: an ID has no '-', a tenant name may.
            let (tenant, id) = match stem.find("-stray.") {
                Some(at) => (
                    stem.get(..at).unwrap_or_default(),
                    stem.get(at.saturating_add(1)..).unwrap_or_default(),
                ),
                None => stem.rsplit_once('-').unwrap_or(("", stem)),
            };
            let reason = fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_string();
            let envelope = File::open(path.with_extension("env"))
                .ok()
                .and_then(|f| envelope::read_envelope(&mut BufReader::new(f)).ok());
            entries.push(Quarantined {
                tenant: tenant.to_string(),
                id: id.to_string(),
                reason,
                envelope,
            });
        }
        entries.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
        Ok(entries)
    }
}

/// A quarantined entry as `queue` and `fsck` show it.
#[derive(Debug)]
pub struct Quarantined {
    pub tenant: String,
    /// The message ID, or `stray.NAME` for a file that was never a message.
    pub id: String,
    pub reason: String,
    /// The envelope, if it is still readable.
    pub envelope: Option<Envelope>,
}
