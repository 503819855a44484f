//! Where things are in a spool, its folders, and what they hold: the paths of
//! every entry, `create_layout`, and the listings of tenants, IDs and strays.

use super::{MessageId, Result, Spool, SpoolError};
use crate::base::fs::{self, make_dir};
use crate::base::names::TenantName;
use std::path::{Path, PathBuf};

impl Spool {
    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(super) fn queue_dir(&self) -> PathBuf {
        self.root.join("queue")
    }

    pub(super) fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    pub fn tenant_dir(&self, tenant: &TenantName) -> PathBuf {
        self.queue_dir().join(tenant.as_str())
    }

    pub(super) fn message_path(&self, tenant: &TenantName, id: &MessageId) -> PathBuf {
        self.tenant_dir(tenant).join(format!("{id}.msg"))
    }

    pub(super) fn envelope_path(&self, tenant: &TenantName, id: &MessageId) -> PathBuf {
        self.tenant_dir(tenant).join(format!("{id}.env"))
    }

    /// Creates the folders if missing (the daemon at start; packages make them too).
    /// Submitters write as members of the spool's group (sendmail is setgid),
    /// so tmp/ and queue/ are group-writable and setgid: what is made inside
    /// keeps the group.
    pub fn create_layout(&self) -> Result<()> {
        for (dir, mode) in [
            (self.root.clone(), 0o2750),
            (self.tmp_dir(), 0o2770),
            (self.queue_dir(), 0o2770),
            (self.quarantine_dir(), 0o2750),
        ] {
            make_dir(&dir, mode).map_err(SpoolError::io(&dir))?;
        }
        Ok(())
    }

    /// Tenant folders present in the spool (configured or not). pbxmail only
    /// ever makes folders named by a `TenantName`; a folder whose name is not
    /// one was made by hand, holds nothing we queued, and is skipped (logged).
    pub fn tenants(&self) -> Result<Vec<TenantName>> {
        let mut names: Vec<TenantName> = list_dir(&self.queue_dir())?
            .iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| {
                let folder = p.file_name()?.to_string_lossy();
                match TenantName::parse(&folder) {
                    Ok(name) => Some(name),
                    Err(e) => {
                        log::warn!("spool: skipping folder {}: {e}", p.display());
                        None
                    }
                }
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// The tenant folder holding message `id`, if any.
    pub fn tenant_of(&self, id: &MessageId) -> Option<TenantName> {
        self.tenants()
            .ok()?
            .into_iter()
            .find(|t| self.envelope_path(t, id).exists())
    }

    /// IDs of the messages queued for one tenant (those with an envelope).
    pub fn message_ids(&self, tenant: &TenantName) -> Result<Vec<MessageId>> {
        let mut ids: Vec<MessageId> = list_dir(&self.tenant_dir(tenant))?
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "env"))
            .filter_map(|p| MessageId::parse(p.file_stem()?.to_str()?))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Files in a tenant's folder that are not ID.msg / ID.env: they do not
    /// belong in the spool and are never acted on. (An ID.msg without its
    /// .env is judged by recovery.rs: in transit, abandoned, or orphaned.)
    pub fn stray_files(&self, tenant: &TenantName) -> Result<Vec<PathBuf>> {
        Ok(list_dir(&self.tenant_dir(tenant))?
            .into_iter()
            .filter(|p| {
                let known_ext = p.extension().is_some_and(|e| e == "msg" || e == "env");
                let valid_id = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(MessageId::parse)
                    .is_some();
                !(p.is_file() && known_ext && valid_id)
            })
            .collect())
    }
}

/// A folder's entries (none if it is missing), an error naming the folder.
pub(super) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    fs::list_dir(dir).map_err(SpoolError::io(dir))
}

/// Makes a rename or unlink in `dir` durable, an error naming the folder.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    fs::sync_dir(dir).map_err(SpoolError::io(dir))
}
