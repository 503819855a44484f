//! Free space on the spool's filesystem, for refusing mail before it is full.

use super::{Result, Spool, SpoolError};

impl Spool {
    /// Bytes available to unprivileged writers, and the filesystem's size.
    pub fn free_space(&self) -> Result<(u64, u64)> {
        let stat =
            rustix::fs::statvfs(&self.root).map_err(|e| SpoolError::io(&self.root)(e.into()))?;
        Ok((
            stat.f_bavail.saturating_mul(stat.f_frsize),
            stat.f_blocks.saturating_mul(stat.f_frsize),
        ))
    }
}
