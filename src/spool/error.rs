//! The spool's one error type: an I/O error or a damaged envelope, each with
//! the path it concerns, and the one place that tells damage (quarantine the
//! entry) from a problem of the moment (try again later).

use super::envelope::EnvelopeError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum SpoolError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    Envelope {
        path: PathBuf,
        source: EnvelopeError,
    },
}

impl SpoolError {
    pub(super) fn io(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
        move |source| SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the error says this file's content is bad, so the entry is
    /// quarantined. Every I/O error is not: EMFILE, ENFILE, ENOMEM, EAGAIN,
    /// EIO, a permission slip by an admin... say nothing about the entry,
    /// and moving healthy mail aside for them loses the promise. (A missing
    /// partner file is damage too, but only its caller knows it is missing
    /// for good: see `is_not_found`.)
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            SpoolError::Envelope {
                source: EnvelopeError::Corrupt(_),
                ..
            }
        )
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
            || matches!(self, SpoolError::Envelope { source: EnvelopeError::Io(e), .. } if e.kind() == io::ErrorKind::NotFound)
    }
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            SpoolError::Envelope { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpoolError::Io { source, .. } => Some(source),
            SpoolError::Envelope { source, .. } => Some(source),
        }
    }
}

pub type Result<T> = std::result::Result<T, SpoolError>;
