//! An admin's hold, release or delete on the tenant thread: applied to the
//! spool and the queue (`Admin`, borrowed from the ledger), and reported
//! back with what became of each message once the effect is on disk (the
//! Held or Released record synced, the entry removed). The control side
//! (dispatch) answers the admin from this report instead of before anything
//! was written.

use super::queue::Queue;
use super::Target;
use crate::base::names::{MessageId, TenantName};
use crate::spool::envelope::Record;
use crate::spool::Spool;
use crossbeam_channel::Sender;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Hold,
    Release,
    Delete,
}

/// A command whose caller waits for the report.
#[derive(Debug)]
pub struct AdminJob {
    pub action: Action,
    pub target: Target,
    /// Gets the report once every message's result is durable.
    pub done: Sender<AdminReport>,
}

/// What became of each message the command named (or, for a whole tenant,
/// each it acted on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminReport {
    pub action: Action,
    pub results: Vec<(MessageId, Applied)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Done and on disk.
    Done,
    /// Nothing to do: already held (hold), not held (release), or failed
    /// and kept for the admin (hold).
    Unchanged,
    /// Not in the queue any more: delivered, bounced or deleted before the
    /// command was applied.
    Gone,
    /// It could not be written; the message is as it was.
    Failed(String),
}

/// What applying a command touches, borrowed from the ledger.
pub(super) struct Admin<'a> {
    pub name: &'a TenantName,
    pub spool: &'a Spool,
    pub queue: &'a mut Queue,
}

impl Admin<'_> {
    /// Holds, releases or deletes; what became of each message.
    pub(super) fn apply(&mut self, action: Action, target: &Target) -> Vec<(MessageId, Applied)> {
        let ids = match action {
            Action::Hold => self.targets(target, Queue::waiting_ids),
            Action::Release => self.targets(target, Queue::held_ids),
            Action::Delete => self.targets(target, Queue::all_ids),
        };
        ids.into_iter()
            .map(|id| {
                let applied = match action {
                    Action::Hold => self.hold(&id),
                    Action::Release => self.release(&id),
                    Action::Delete => self.delete(&id),
                };
                (id, applied)
            })
            .collect()
    }

    fn hold(&mut self, id: &MessageId) -> Applied {
        self.catch_up(id);
        if !self.queue.is_waiting(id) {
            return self.unchanged_or_gone(id, self.queue.is_held(id));
        }
        match self.mark(id, &Record::Held) {
            Ok(()) => {
                self.queue.hold(id);
                Applied::Done
            }
            Err(why) => Applied::Failed(why),
        }
    }

    fn release(&mut self, id: &MessageId) -> Applied {
        self.catch_up(id);
        if !self.queue.is_held(id) {
            return self.unchanged_or_gone(id, self.queue.is_waiting(id));
        }
        match self.mark(id, &Record::Released) {
            Ok(()) => {
                let attempted = self
                    .spool
                    .load_envelope(self.name, id)
                    .map_or(true, |env| env.attempts > 0);
                self.queue.release(id, attempted);
                Applied::Done
            }
            Err(why) => Applied::Failed(why),
        }
    }

    /// A message the spool holds but the queue has not heard of yet (its
    /// hint was lost to a full job queue, or comes after this command) is
    /// taken in first, as the rescan would: answering `Gone` for it would
    /// let it be sent after the admin was told nothing was there.
    fn catch_up(&mut self, id: &MessageId) {
        if self.queue.knows(id) {
            return;
        }
        match self.spool.load_envelope(self.name, id) {
            Ok(env) if env.is_done() => {}
            Ok(env) if env.held => self.queue.insert_held(id),
            Ok(env) => self
                .queue
                .schedule(id, env.next_attempt_ms.unwrap_or(0), env.attempts > 0),
            // Not there (gone), or unreadable: the rescan deals with that.
            Err(_) => {}
        }
    }

    /// Unchanged when the queue has it in the state asked for (or kept as
    /// failed), else gone.
    fn unchanged_or_gone(&self, id: &MessageId, already: bool) -> Applied {
        if already || self.queue.knows(id) {
            Applied::Unchanged
        } else {
            Applied::Gone
        }
    }

    fn delete(&mut self, id: &MessageId) -> Applied {
        let applied = match self.spool.remove(self.name, id) {
            Ok(()) => {
                log::info!("{id} tenant={}: deleted by an administrator", self.name);
                Applied::Done
            }
            Err(e) if e.is_not_found() => Applied::Gone,
            Err(e) => {
                log::warn!("{id} tenant={}: cannot delete: {e}", self.name);
                Applied::Failed(e.to_string())
            }
        };
        self.queue.forget(id);
        applied
    }

    fn targets(&self, target: &Target, all: impl Fn(&Queue) -> Vec<MessageId>) -> Vec<MessageId> {
        match target {
            Target::All => all(self.queue),
            Target::Ids(ids) => ids.clone(),
        }
    }

    /// Appends an admin's record durably; Err (logged): why it cannot.
    fn mark(&self, id: &MessageId, record: &Record) -> Result<(), String> {
        self.spool.append(self.name, id, record).map_err(|e| {
            log::error!("{id} tenant={}: cannot record {record:?}: {e}", self.name);
            e.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::pacing::Backoff;
    use std::time::Duration;

    #[test]
    fn a_hold_of_a_spooled_message_whose_hint_has_not_come_holds_it_not_gone() {
        let dir = std::env::temp_dir().join(format!("pbxmail-admin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::new(&dir);
        spool.create_layout().unwrap();
        let name = TenantName::parse("acme").unwrap();
        let mut submission = spool.begin_submission().unwrap();
        std::io::Write::write_all(&mut submission, b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let id = submission
            .commit(&name, "a@acme.example", &["b@x.example".into()])
            .unwrap();
        let backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(3600));
        let mut queue = Queue::new(backoff, None, 10, 0);
        let mut admin = Admin {
            name: &name,
            spool: &spool,
            queue: &mut queue,
        };
        let held = admin.apply(Action::Hold, &Target::Ids(vec![id.clone()]));
        assert_eq!(held, [(id.clone(), Applied::Done)]);
        assert!(spool.load_envelope(&name, &id).unwrap().held);
        assert!(queue.is_held(&id));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
