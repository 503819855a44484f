//! The spool's one error type: an I/O error or a damaged envelope, each with
//! the path it concerns.

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
