//! An admin's hold, release or delete as the tenant thread reports it back:
//! what became of each message, sent once the effect is on disk (the Held or
//! Released record synced, the entry removed). The control side (dispatch)
//! answers the admin from this report instead of before anything was written.

use super::Target;
use crate::spool::MessageId;
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
