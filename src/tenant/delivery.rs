//! The cut between the tenant's queue loop and the protocol (KumoMTA's
//! QueueDispatcher): open a session, run one transaction per message (a
//! reply per recipient, or why the session broke), close it. The worker
//! judges what comes back; the real SMTP side is smtp_delivery.rs, and tests
//! put a scripted fake here.

use crate::smtp::reply::Reply;
use crate::smtp::transaction::Body;
use crate::smtp::transaction::Outgoing;
use crate::smtp::SessionError;

pub trait Delivery {
    /// Opens a ready-to-send session (greeting, TLS, AUTH done).
    fn open(&mut self) -> Result<Opened, OpenError>;
    /// One transaction over the open session: a reply per recipient in
    /// order, or the error that ended the session. The body is at its
    /// start; it seeks, as a downgrade to 7 bits reads it more than once.
    fn send(
        &mut self,
        message: &Outgoing<'_>,
        body: &mut dyn Body,
    ) -> Result<Vec<Reply>, SessionError>;
    /// Ends the open session politely (QUIT).
    fn close(&mut self);
    /// Drops a broken session without another word.
    fn abandon(&mut self);
}

/// A session that is open.
#[derive(Debug, Clone)]
pub struct Opened {
    /// `host[ip]:port`, as the delivery log line shows it.
    pub peer: String,
}

/// Why no session could be opened.
#[derive(Debug)]
pub enum OpenError {
    /// None was tried: the settings are unusable or there is no access token.
    Unavailable {
        /// What the delivery log line names as the relay.
        relay: String,
        reason: String,
        /// The reason is logged once already (a sign-in is needed): the
        /// deferrals it causes go to the debug log only.
        repeat: bool,
    },
    /// The relay could not be reached, or refused the session.
    Failed { peer: String, error: SessionError },
}
