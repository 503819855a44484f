//! Damaged entries and stray files, moved aside with a note of why: never
//! deleted, never sent, listed for an admin by `queue` and `fsck`.

use super::envelope::{self, Envelope};
use super::layout::{list_dir, sync_dir};
use super::{MessageId, Result, Spool, SpoolError};
use crate::base::names::TenantName;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::Path;

impl Spool {
    /// Moves a damaged entry aside with a note of why; never deletes it.
    /// The note is written (and synced) before anything moves, so no file
    /// reaches quarantine without its reason; the envelope moves first, so
    /// the entry leaves the queue in one step. A failed move is rolled back.
    pub fn quarantine(&self, tenant: &TenantName, id: &MessageId, reason: &str) -> Result<()> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        let note = dir.join(format!("{tenant}-{id}.reason"));
        add_note(&note, reason)?;
        let env = (
            self.envelope_path(tenant, id),
            dir.join(format!("{tenant}-{id}.env")),
        );
        let msg = (
            self.message_path(tenant, id),
            dir.join(format!("{tenant}-{id}.msg")),
        );
        let env_moved = move_if_present(&env.0, &env.1)?;
        if let Err(e) = move_if_present(&msg.0, &msg.1) {
            if env_moved {
                let _ = fs::rename(&env.1, &env.0);
            }
            return Err(e);
        }
        sync_dir(&dir)?;
        sync_dir(&self.tenant_dir(tenant))
    }

    /// Moves a file that is not a spool entry into quarantine, with the reason
    /// (written first, removed again if the move fails).
    pub fn quarantine_stray(&self, tenant: &TenantName, path: &Path, reason: &str) -> Result<()> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("unnamed");
        let base = format!("{tenant}-stray.{name}");
        let note = dir.join(format!("{base}.reason"));
        add_note(&note, reason)?;
        if let Err(e) = fs::rename(path, dir.join(&base)) {
            let _ = fs::remove_file(&note);
            return Err(SpoolError::io(path)(e));
        }
        sync_dir(&dir)?;
        sync_dir(&self.tenant_dir(tenant))
    }

    /// Everything in quarantine, one entry per message or stray, whether or
    /// not it has a reason note (a file put there by hand, or by an older
    /// pbxmail that moved before it wrote, is listed all the same). A note
    /// alone describes a move that never happened: its entry is still queued.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>> {
        // Entry name (TENANT-ID or TENANT-stray.NAME) → whether it has a note.
        let mut found: BTreeMap<String, bool> = BTreeMap::new();
        for path in list_dir(&self.quarantine_dir())? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            match entry_of(name) {
                Some((base, true)) => {
                    if let Some(seen) = found.get_mut(base) {
                        *seen = true;
                    }
                }
                Some((base, false)) => {
                    let noted = path.with_file_name(format!("{base}.reason")).exists();
                    found.insert(base.to_string(), noted);
                }
                None => {}
            }
        }
        let dir = self.quarantine_dir();
        let mut entries = Vec::with_capacity(found.len());
        for (base, noted) in found {
            // TENANT-ID or TENANT-stray.NAME: an ID has no '-', a tenant name may.
            let (tenant, id) = match base.find("-stray.") {
                Some(at) => (
                    base.get(..at).unwrap_or_default(),
                    base.get(at.saturating_add(1)..).unwrap_or_default(),
                ),
                None => base.rsplit_once('-').unwrap_or(("", &base)),
            };
            let reason = if noted {
                fs::read_to_string(dir.join(format!("{base}.reason")))
                    .unwrap_or_default()
                    .trim()
                    .replace('\n', "; ")
            } else {
                String::new()
            };
            let reason = if reason.is_empty() {
                NO_REASON.to_string()
            } else {
                reason
            };
            let envelope = File::open(dir.join(format!("{base}.env")))
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

/// What `queue` and `fsck` say of a quarantined file that has no note.
pub const NO_REASON: &str = "no reason recorded";

/// The entry a file in quarantine belongs to, and whether it is the note:
/// `B.reason` notes entry `B`; `T-stray.NAME` is its own entry (whatever
/// NAME ends in); `T-ID.msg` / `T-ID.env` belong to `T-ID`; any other file
/// (put there by hand) is an entry of its own.
fn entry_of(name: &str) -> Option<(&str, bool)> {
    if let Some(base) = name.strip_suffix(".reason") {
        return Some((base, true));
    }
    if name.contains("-stray.") {
        return Some((name, false));
    }
    let base = name
        .strip_suffix(".msg")
        .or_else(|| name.strip_suffix(".env"))
        .unwrap_or(name);
    Some((base, false))
}

/// Appends a reason line to an entry's note and syncs it: a second
/// quarantine of the same entry (its `.msg` found later, say) keeps the first.
fn add_note(note: &Path, reason: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(note)
        .map_err(SpoolError::io(note))?;
    file.write_all(format!("{reason}\n").as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(SpoolError::io(note))
}

/// Renames `from` to `to`; true if it moved, false if `from` was not there.
fn move_if_present(from: &Path, to: &Path) -> Result<bool> {
    match fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SpoolError::io(from)(e)),
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
