//! Start-up recovery: removes what a dead submitter or a crash mid-commit
//! left behind, sparing every file a live submitter still holds locked.

use super::layout::list_dir;
use super::{Result, Spool};
use std::fs::{self, File};
use std::io;
use std::path::Path;

impl Spool {
    /// Start-up recovery: removes abandoned temp files and message files whose
    /// envelope never arrived. Neither was ever acknowledged to a submitter,
    /// and a submitter still at work holds a lock that keeps its files safe.
    pub fn remove_abandoned(&self) -> Result<usize> {
        let mut removed = 0;
        for path in list_dir(&self.tmp_dir())? {
            if remove_if_abandoned(&path, || true) {
                removed += 1;
            }
        }
        for tenant in self.tenants()? {
            for path in list_dir(&self.tenant_dir(&tenant))? {
                let orphan = path.extension().is_some_and(|e| e == "msg")
                    && !path.with_extension("env").exists();
                let env = path.with_extension("env");
                if orphan && remove_if_abandoned(&path, || !env.exists()) {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Removes `path` if no submitter holds its lock (it died or finished).
/// The lock is held while unlinking, so a submitter that takes it next sees
/// its file gone (link count 0) and starts over. A `.env` in tmp/ belongs to
/// the `.msg` beside it and follows its lock.
/// `still_removable` is checked again under the lock: a submitter may have
/// finished its commit between the caller's look and the lock.
fn remove_if_abandoned(path: &Path, still_removable: impl Fn() -> bool) -> bool {
    let lock_holder = if path.extension().is_some_and(|e| e == "env") {
        path.with_extension("msg")
    } else {
        path.to_path_buf()
    };
    let _lock = match File::open(&lock_holder) {
        Ok(file) => match file.try_lock() {
            Ok(()) => Some(file),
            Err(_) => return false,
        },
        // The .msg is gone: the .env is left over from a finished or failed commit.
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(_) => return false,
    };
    still_removable() && fs::remove_file(path).is_ok()
}
