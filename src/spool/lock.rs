//! The daemon's claim on a spool: one daemon per spool, enforced by a lock.

use super::{Result, Spool, SpoolError};
use std::fs::{File, OpenOptions};
use std::io;

impl Spool {
    /// The daemon's claim on this spool: an exclusive lock on `daemon.lock`,
    /// held as long as the returned file is open. A second daemon is refused.
    pub fn lock_for_daemon(&self) -> Result<File> {
        let path = self.root.join("daemon.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(SpoolError::io(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(SpoolError::Io {
                path: path.clone(),
                source: io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another pbxmail daemon is already running on this spool; stop it first",
                ),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(SpoolError::io(&path)(e)),
        }
    }
}
