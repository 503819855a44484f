//! Recovery: removes what a killed submitter or a crash mid-commit left
//! behind, sparing every file a live submitter still holds locked, and tells
//! those leftovers from a committed `.msg` whose envelope was lost (damage,
//! for quarantine) by the order in which a commit moves its files.
//!
//! A commit renames `tmp/ID.msg` into `queue/TENANT/`, then `tmp/ID.env`
//! beside it; a removal renames `queue/TENANT/ID.env` back into `tmp/`
//! first. So a `queue/TENANT/ID.msg` without its `.env` is:
//! - locked: a submitter between its two renames; left alone;
//! - unlocked with `tmp/ID.env`: a commit that died between the renames
//!   (never acknowledged) or a removal under way: both files go;
//! - unlocked with no `.env` anywhere: committed, then its envelope was
//!   lost. That is damage, quarantined by the caller, never deleted.

use super::envelope;
use super::layout::list_dir;
use super::{MessageId, Result, Spool};
use crate::base::names::TenantName;
use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::Path;

impl Spool {
    /// Start-up recovery: sweeps `tmp/`, then each tenant folder's unpaired
    /// `.msg` files. Returns how many abandoned submissions it removed;
    /// orphans (committed, envelope lost) stay for the tenant's rescan or
    /// fsck to quarantine with their reason.
    pub fn remove_abandoned(&self) -> Result<usize> {
        let mut removed = self.sweep_tmp()?;
        for tenant in self.tenants()? {
            removed += self.sweep_unpaired(&tenant)?.removed;
        }
        Ok(removed)
    }

    /// Removes the leftovers of submitters that died (their lock is free)
    /// from `tmp/`, and a removal's envelope whose message is gone. Safe
    /// while submitters and the daemon work: every decision is taken under
    /// the lock of the `.msg` it concerns. Returns how many submissions went.
    pub fn sweep_tmp(&self) -> Result<usize> {
        let mut removed = 0;
        for path in list_dir(&self.tmp_dir())? {
            let Some(id) = id_of(&path) else {
                continue;
            };
            let ext = path.extension().and_then(|e| e.to_str());
            let beside = self.tmp_dir().join(format!("{id}.msg"));
            let gone = match ext {
                // The .env follows its .msg's lock (and goes with it below).
                Some("msg") => with_free_lock(&path, || {
                    remove_present(&path.with_extension("env"));
                    remove_present(&path)
                }),
                Some("env") if !beside.exists() => self.sweep_lone_envelope(&path, &id),
                _ => false,
            };
            removed += usize::from(gone);
        }
        Ok(removed)
    }

    /// A `tmp/ID.env` with no `tmp/ID.msg`: its message is in the tenant's
    /// folder (a commit or removal under way) or gone (a removal finished).
    pub(super) fn sweep_lone_envelope(&self, env: &Path, id: &MessageId) -> bool {
        let Some(msg) = self.queued_partner(env, id) else {
            return remove_present(env);
        };
        // The queued .msg's lock decides: held, its submitter is mid-commit.
        // Free, the envelope is looked at again under the lock: a commit that
        // finished since the listing has moved it out of tmp/, and its
        // message is queued mail, not a leftover.
        with_free_lock(&msg, || {
            if !env.exists() {
                return false;
            }
            remove_present(&msg);
            remove_present(env)
        })
    }

    /// Where the message of a lone `tmp/ID.env` is queued, if it is: the
    /// envelope names its tenant; an unreadable one makes us look in every
    /// tenant folder (rare: it was fsynced before it was renamed).
    fn queued_partner(&self, env: &Path, id: &MessageId) -> Option<std::path::PathBuf> {
        let named = File::open(env)
            .ok()
            .and_then(|f| envelope::read_tenant(&mut BufReader::new(f)))
            .and_then(|t| TenantName::parse(&t).ok());
        let candidates = match named {
            Some(tenant) => vec![tenant],
            None => self.tenants().ok()?,
        };
        candidates
            .iter()
            .map(|t| self.message_path(t, id))
            .find(|p| p.exists())
    }

    /// Sweeps one tenant folder's `.msg` files that have no `.env` beside
    /// them: removes abandoned submissions, returns the orphans (see the
    /// top of this file) for quarantine.
    pub fn sweep_unpaired(&self, tenant: &TenantName) -> Result<Unpaired> {
        let mut found = Unpaired::default();
        for path in list_dir(&self.tenant_dir(tenant))? {
            if path.extension().is_none_or(|e| e != "msg") || path.with_extension("env").exists() {
                continue;
            }
            let Some(id) = id_of(&path) else {
                continue;
            };
            let in_transit = self.tmp_dir().join(format!("{id}.env"));
            let mut orphan = false;
            // Looked at again under the lock: the submitter may have finished
            // its commit since the first look.
            let gone = with_free_lock(&path, || {
                if path.with_extension("env").exists() {
                    return false;
                }
                if in_transit.exists() {
                    remove_present(&path);
                    return remove_present(&in_transit);
                }
                orphan = true;
                false
            });
            found.removed += usize::from(gone);
            if orphan {
                found.orphans.push(id);
            }
        }
        Ok(found)
    }
}

/// What a sweep of a tenant folder did and found.
#[derive(Debug, Default)]
pub struct Unpaired {
    /// Abandoned submissions (or finished removals) removed.
    pub removed: usize,
    /// Committed messages whose envelope is lost: to be quarantined.
    pub orphans: Vec<MessageId>,
}

/// Why an orphan is quarantined, as its note says.
pub const ORPHAN_REASON: &str =
    "message file without its envelope: committed, then the envelope was lost";

fn id_of(path: &Path) -> Option<MessageId> {
    MessageId::parse(path.file_stem()?.to_str()?)
}

/// Runs `act` holding `path`'s lock if nobody else holds it (its submitter
/// died or finished). The lock is held while unlinking, so a submitter that
/// takes it next sees its file gone (link count 0) and starts over. False
/// when the lock is held, the file is gone, or `act` says so.
fn with_free_lock(path: &Path, act: impl FnOnce() -> bool) -> bool {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(_) => return false,
    };
    match file.try_lock() {
        Ok(()) => act(),
        Err(_) => false,
    }
}

/// Unlinks `path`; true if this call removed it.
fn remove_present(path: &Path) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            log::warn!("spool: cannot remove {}: {e}", path.display());
            false
        }
    }
}
