//! The dispatcher's errand thread: blocking chores the mio loop must not do
//! itself (re-reading the config file, finding which tenant folder holds a
//! message ID). Chores go out with `try_send` on a bounded channel; results
//! come back on another, followed by a wake of the loop's Waker, tagged with
//! the ticket the dispatcher gave so it knows who waits for them.

use crate::base::names::{MessageId, TenantName};
use crate::config::{self, Config, ConfigError};
use crate::spool::Spool;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use mio::Waker;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Chores in flight; the control socket serves at most 32 connections.
const CAPACITY: usize = 64;

/// Matches a result to the request that waits for it.
pub type Ticket = u64;

#[derive(Debug)]
pub enum Chore {
    /// Read and validate the configuration file.
    LoadConfig(PathBuf),
    /// The tenant folder of each listed ID, as the admin wrote them.
    Locate(Vec<String>),
}

/// Where an admin's message ID is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    Queued {
        tenant: TenantName,
        id: MessageId,
    },
    /// Not a valid ID, or no tenant folder holds it.
    Unknown,
}

#[derive(Debug)]
pub enum Done {
    Config(Box<Result<Config, ConfigError>>),
    /// One entry per requested ID, in order: (the ID as written, where it is).
    Located(Vec<(String, Located)>),
}

pub struct Offload {
    chores: Sender<(Ticket, Chore)>,
    done: Receiver<(Ticket, Done)>,
}

impl Offload {
    pub fn start(spool: Spool, waker: Arc<Waker>) -> io::Result<Offload> {
        let (chores, chores_rx) = bounded::<(Ticket, Chore)>(CAPACITY);
        let (done_tx, done) = bounded::<(Ticket, Done)>(CAPACITY);
        std::thread::Builder::new()
            .name("offload".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                for (ticket, chore) in chores_rx {
                    let result = match chore {
                        Chore::LoadConfig(path) => Done::Config(Box::new(config::load(&path))),
                        Chore::Locate(ids) => Done::Located(locate(&spool, ids)),
                    };
                    if done_tx.send((ticket, result)).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Offload { chores, done })
    }

    /// Never blocks; gives the chore back when the thread is busy or gone.
    pub fn try_send(&self, ticket: Ticket, chore: Chore) -> Result<(), Chore> {
        self.chores.try_send((ticket, chore)).map_err(|e| match e {
            TrySendError::Full((_, chore)) | TrySendError::Disconnected((_, chore)) => chore,
        })
    }

    pub fn try_recv(&self) -> Option<(Ticket, Done)> {
        self.done.try_recv().ok()
    }
}

fn locate(spool: &Spool, ids: Vec<String>) -> Vec<(String, Located)> {
    ids.into_iter()
        .map(|raw| {
            let found = MessageId::parse(&raw).and_then(|id| {
                spool
                    .tenant_of(&id)
                    .map(|tenant| Located::Queued { tenant, id })
            });
            (raw, found.unwrap_or(Located::Unknown))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_located_in_their_tenant_folder_or_unknown() {
        let dir = std::env::temp_dir().join(format!("pbxmail-offload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::new(&dir);
        spool.create_layout().unwrap();
        let mut submission = spool.begin_submission().unwrap();
        std::io::Write::write_all(&mut submission, b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let id = submission
            .commit(
                &TenantName::parse("acme").unwrap(),
                "a@acme.example",
                &["b@x.example".into()],
            )
            .unwrap();
        let located = locate(
            &spool,
            vec![id.to_string(), "0123ABC".into(), "not an id".into()],
        );
        assert_eq!(
            located,
            [
                (
                    id.to_string(),
                    Located::Queued {
                        tenant: TenantName::parse("acme").unwrap(),
                        id: id.clone()
                    }
                ),
                ("0123ABC".into(), Located::Unknown),
                ("not an id".into(), Located::Unknown),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
