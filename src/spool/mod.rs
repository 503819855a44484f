//! The spool: the disk is the truth about every accepted message.
//!
//! Layout (see docs/spool.md):
//! ```text
//! SPOOL/tmp/ID.msg, ID.env         being written; never acted on
//! SPOOL/queue/TENANT/ID.msg        message, CRLF lines, not dot-stuffed
//! SPOOL/queue/TENANT/ID.env        envelope records (envelope.rs)
//! SPOOL/quarantine/TENANT-ID.*     damaged entries, kept for an admin
//! SPOOL/pickup.sock                datagram hints "TENANT ID" to the daemon
//! ```
//! A message is committed by fsync of both files, rename of `.msg` then `.env`
//! into the tenant's folder, and fsync of that folder: an `.env` in `queue/`
//! always has its `.msg` beside it. Removal renames the `.env` back into
//! `tmp/` first. A submitter holds an exclusive lock on its `.msg` until it is
//! done, so recovery removes only what nobody is writing, and tells a `.msg`
//! in transit from one whose envelope was lost (recovery.rs).
//!
//! This file holds only the `Spool` handle; each concept has its own module:
//! layout (paths, folders, listing), submission (tmp → commit), entries
//! (load, append, remove, verify), recovery, quarantine, lock, pickup
//! (hints to the daemon), space, scan (SHA-256 and 8-bit).

mod entries;
pub mod envelope;
mod error;
mod layout;
mod lock;
mod pickup;
pub mod quarantine;
pub mod recovery;
pub mod scan;
mod space;
mod submission;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use error::{Result, SpoolError};
pub use scan::scan_message;
pub use submission::Submission;

use crate::base::names::MessageId;

/// A spool on disk, named by its root folder. Cheap to clone; holds no file.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    pub fn new(root: &Path) -> Spool {
        Spool {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}
