//! The tenant worker's loop: rebuild the queue from the spool, deliver what
//! is due through a `Delivery` (SMTP in the daemon, a fake in tests), then
//! sleep until a hint arrives or the next message, the end of a tenant
//! backoff or the next rate-limit token is due. No polling. With nothing
//! waiting (held and failed mail need no thread) it retires after an idle
//! while; a first pass that finds nothing retires at once. What each reply
//! or failure means is the judge's (outcome.rs); the ledger records it.

use super::delivery::{Delivery, OpenError};
use super::ledger::{Announce, Ledger, RcptOutcome};
use super::queue::Carry;
use super::slots::{RelayKey, SessionSlots, Ticket};
use super::{Job, TenantStatus};
use crate::base::names::MessageId;
use crate::outcome::{self, RcptJudgement};
use crate::smtp::transaction::Outgoing;
use crate::smtp::SessionError;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::HashSet;
use std::io::{BufReader, Seek};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the worker shares with its `TenantHandle`.
pub struct Shared {
    pub jobs: Receiver<Job>,
    /// Set when hints were lost (a full channel): rescan the spool.
    pub rescan: Arc<AtomicBool>,
    pub stop: Arc<AtomicBool>,
    /// What `pbxmail status` shows; the dispatcher reads it without waiting on us.
    pub status: Arc<Mutex<TenantStatus>>,
    /// How long a worker with an empty queue waits for a job before it retires.
    pub idle: Duration,
    /// The session budget all tenants share.
    pub slots: Arc<SessionSlots>,
    /// What the budget counts this tenant's sessions by.
    pub relay: RelayKey,
}

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Told to stop (or the handle is gone).
    Stop,
    /// Nothing waits and no job came within the idle time.
    Retire,
}

pub struct TenantWorker<D: Delivery> {
    ledger: Ledger,
    delivery: D,
    shared: Shared,
    in_session: bool,
    /// The message in a transaction now, published for the control side.
    sending: Option<MessageId>,
    /// Mail or a job came since this thread started. A thread whose first
    /// pass finds nothing retires at once (cost follows work, from start-up
    /// on); one that worked waits the idle time for more first.
    worked: bool,
    /// Due mail waits for a session slot: our place in line.
    ticket: Option<Ticket>,
}

enum Wake {
    Work,
    Stop,
    Retire,
}

/// How a session's run of messages ended.
enum SessionEnd {
    /// Nothing more due, or messages_per_session reached: QUIT.
    Done,
    /// The rate limit says wait: QUIT, and no new session until the next token.
    Paced,
    /// The session failed; `tenant_failing` when the relay itself is the problem.
    Broken { tenant_failing: bool },
}

/// A session that broke while one message was being sent.
struct SessionBroke {
    error: SessionError,
    /// The message's results are already recorded (some recipients were
    /// answered before the break); there is nothing left to defer.
    recorded: bool,
}

impl<D: Delivery> TenantWorker<D> {
    pub fn new(ledger: Ledger, delivery: D, shared: Shared) -> TenantWorker<D> {
        TenantWorker {
            ledger,
            delivery,
            shared,
            in_session: false,
            sending: None,
            worked: false,
            ticket: None,
        }
    }

    #[cfg(test)]
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// What the next worker of this tenant takes over from this one.
    pub fn carry(&self) -> Carry {
        self.ledger.queue().carry()
    }

    pub fn into_delivery(self) -> D {
        self.delivery
    }

    fn name(&self) -> &str {
        self.ledger.name()
    }

    pub fn run(&mut self) -> End {
        log::debug!("tenant {}: worker started", self.name());
        injected_panic(self.name());
        let end = loop {
            // The rescan flag starts set, so the first pass loads what the spool holds.
            self.step();
            if self.stopping() {
                break End::Stop;
            }
            match self.wait() {
                Wake::Work => {}
                Wake::Stop => break End::Stop,
                Wake::Retire => break End::Retire,
            }
        };
        log::debug!("tenant {}: worker ended ({end:?})", self.name());
        end
    }

    /// One pass: rescan if asked, take waiting jobs, deliver what is due,
    /// publish the state. The rescan comes first so that what the spool
    /// says about a message (deferred until, held) wins over a hint.
    pub(super) fn step(&mut self) {
        let retry_rescan = self
            .ledger
            .rescan_due()
            .is_some_and(|at| at <= self.ledger.now());
        if self.shared.rescan.swap(false, Ordering::AcqRel) || retry_rescan {
            let _turn = self.shared.slots.scan();
            self.ledger.rescan();
        }
        self.take_waiting_jobs();
        self.worked |= self.ledger.queue().len() > 0;
        self.deliver_due();
        self.publish();
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// Makes the current state visible to `pbxmail status`.
    fn publish(&mut self) {
        let mut status = self.ledger.status(self.in_session);
        status.sending = self.sending.clone();
        if let Ok(mut shared) = self.shared.status.lock() {
            *shared = status;
        }
    }

    /// Blocks until a job arrives or the next thing is due.
    fn wait(&mut self) -> Wake {
        if self.ticket.is_some() {
            return self.wait_for_a_slot();
        }
        // A rescan to retry is a wake-up like a due message.
        let next = match (self.ledger.queue().next_wakeup(), self.ledger.rescan_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let first = match next {
            Some(at) => {
                let wait = Duration::from_millis(at.saturating_sub(self.ledger.now()));
                match self.shared.jobs.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Wake::Stop,
                }
            }
            // Nothing waits: held and failed mail need no thread. A relay
            // backoff still running is waited out first, so the state
            // `status` keeps for a retired tenant is not a stale "backoff".
            None => {
                let now = self.ledger.now();
                let backoff_end = self
                    .ledger
                    .queue()
                    .tenant_backoff()
                    .map(|b| b.until)
                    .filter(|until| *until > now);
                let (wait, then) = match backoff_end {
                    Some(until) => (Duration::from_millis(until.saturating_sub(now)), Wake::Work),
                    None if self.worked => (self.shared.idle, Wake::Retire),
                    None => (Duration::ZERO, Wake::Retire),
                };
                match self.shared.jobs.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => return then,
                    Err(RecvTimeoutError::Disconnected) => return Wake::Stop,
                }
            }
        };
        if let Some(job) = first {
            self.worked = true;
            self.ledger.apply(job);
        }
        self.take_waiting_jobs();
        Wake::Work
    }

    /// Due mail waits for a session slot: blocks until one may be free, a
    /// job comes (answered meanwhile) or a rescan is due. Not on a timer:
    /// what is due stays due until the slot comes.
    fn wait_for_a_slot(&mut self) -> Wake {
        let Some(wake) = self.ticket.as_ref().map(|t| t.wake.clone()) else {
            return Wake::Work;
        };
        let rescan_in = self
            .ledger
            .rescan_due()
            .map(|at| Duration::from_millis(at.saturating_sub(self.ledger.now())));
        let job = match rescan_in {
            Some(timeout) => crossbeam_channel::select! {
                recv(self.shared.jobs) -> job => job.map(Some),
                recv(wake) -> _ => Ok(None),
                default(timeout) => Ok(None),
            },
            None => crossbeam_channel::select! {
                recv(self.shared.jobs) -> job => job.map(Some),
                recv(wake) -> _ => Ok(None),
            },
        };
        match job {
            Ok(Some(job)) => {
                self.worked = true;
                self.ledger.apply(job);
            }
            Ok(None) => {}
            Err(_) => return Wake::Stop,
        }
        self.take_waiting_jobs();
        Wake::Work
    }

    /// Takes every hint already waiting, so back-to-back mail shares sessions.
    fn take_waiting_jobs(&mut self) {
        while let Ok(job) = self.shared.jobs.try_recv() {
            self.worked = true;
            self.ledger.apply(job);
        }
    }

    /// Runs sessions until nothing is due, the relay fails, we are paced,
    /// told to stop, or no session slot is free (then `ticket` holds our
    /// place in line; any other end gives the place up).
    fn deliver_due(&mut self) {
        loop {
            let now = self.ledger.now();
            if self.ledger.queue().paused(now) {
                break;
            }
            let batch = self.ledger.queue().due_batch(now);
            if batch.is_empty() || self.stopping() {
                break;
            }
            if !self.run_session(&batch) {
                if self.ticket.is_some() {
                    return;
                }
                break;
            }
        }
        self.ticket = None;
    }

    /// One session: up to messages_per_session due messages, the first of
    /// them `batch` (deferred together if no session can be had). Returns
    /// false when the relay failed or pacing ended the session.
    fn run_session(&mut self, batch: &[MessageId]) -> bool {
        // Held until the session ends, however it ends.
        let Some(_slot) = self.shared.slots.take(&self.shared.relay, &mut self.ticket) else {
            log::debug!("tenant {}: waiting for a session slot", self.name());
            return false;
        };
        let now = self.ledger.now();
        if !self.ledger.queue_mut().may_send_now(now) {
            return false;
        }
        let opened = match self.delivery.open() {
            Ok(opened) => opened,
            Err(OpenError::Unavailable {
                relay,
                reason,
                repeat,
            }) => {
                // "Sign in again" is logged once, not once per message.
                let announce = if repeat {
                    Announce::Repeat
                } else {
                    Announce::Each
                };
                let verdict = outcome::of_unavailable_session(&reason);
                self.ledger.defer_all(batch, &relay, &verdict, announce);
                return false;
            }
            Err(OpenError::Failed { peer, error }) => {
                log::warn!("tenant {}: relay {peer}: {error}", self.name());
                let verdict = outcome::of_failed_open(&error);
                self.ledger
                    .defer_all(batch, &peer, &verdict, Announce::Each);
                return false;
            }
        };
        self.ledger.queue_mut().tenant_ok();
        self.in_session = true;
        self.publish();
        let end = self.send_due_messages(&opened.peer);
        self.in_session = false;
        match end {
            SessionEnd::Done => {
                self.delivery.close();
                !self.ledger.queue().tenant_failing()
            }
            SessionEnd::Paced => {
                self.delivery.close();
                false
            }
            SessionEnd::Broken { tenant_failing } => {
                self.delivery.abandon();
                !tenant_failing
            }
        }
    }

    /// Sends due messages over an open session, up to messages_per_session.
    fn send_due_messages(&mut self, peer: &str) -> SessionEnd {
        let mut tried = HashSet::new();
        while tried.len() < self.ledger.queue().messages_per_session() && !self.stopping() {
            // Mail submitted meanwhile rides this session too.
            self.take_waiting_jobs();
            let now = self.ledger.now();
            let Some(id) = self.ledger.queue().next_due(now, &tried) else {
                break;
            };
            if !tried.is_empty() && !self.ledger.queue_mut().may_send_now(now) {
                return SessionEnd::Paced;
            }
            tried.insert(id.clone());
            self.sending = Some(id.clone());
            self.publish();
            let delivered = self.deliver_one(peer, &id);
            self.sending = None;
            self.publish();
            if let Err(broke) = delivered {
                let error = &broke.error;
                log::warn!("tenant {}: relay {peer}: {error}", self.name());
                let verdict = outcome::of_session_error(error).outcome;
                let tenant_failing = verdict.refuses_tenant();
                if broke.recorded {
                    if tenant_failing {
                        self.ledger.back_off_tenant();
                    }
                } else {
                    self.ledger.defer_all(
                        std::slice::from_ref(&id),
                        peer,
                        &verdict,
                        Announce::Each,
                    );
                }
                return SessionEnd::Broken { tenant_failing };
            }
            if self.ledger.queue().tenant_failing() {
                // A reply showed the tenant's login is refused: stop here.
                break;
            }
        }
        SessionEnd::Done
    }

    /// Sends one message over the open session and records every recipient's verdict.
    fn deliver_one(&mut self, peer: &str, id: &MessageId) -> Result<(), SessionBroke> {
        let Some(envelope) = self.ledger.load_for_attempt(id) else {
            return Ok(());
        };
        // Damaged: quarantined; unreadable for now: retried later.
        let Some((mut file, eight_bit)) = self.ledger.open_verified(id, &envelope) else {
            return Ok(());
        };
        let mut pending: Vec<(usize, String)> = envelope
            .pending()
            .map(|(i, r)| (i, r.address.clone()))
            .collect();
        if pending.is_empty() {
            self.ledger.finish_done(id, &envelope, true);
            return Ok(());
        }
        let mail_from = self
            .ledger
            .policy()
            .envelope_from
            .clone()
            .unwrap_or_else(|| envelope.sender.clone());
        let mut outcomes: Vec<RcptOutcome> = Vec::with_capacity(pending.len());
        // The judge may ask for some recipients to be sent again in a
        // following transaction (a 452 split); loop until none are.
        while !pending.is_empty() {
            let rcpts: Vec<String> = pending.iter().map(|(_, a)| a.clone()).collect();
            let message = Outgoing {
                mail_from: &mail_from,
                recipients: &rcpts,
                size: envelope.size,
                eight_bit,
            };
            let sent = file
                .rewind()
                .map_err(|e| SessionError::Local(format!("cannot rewind the spooled message: {e}")))
                .and_then(|()| self.delivery.send(&message, &mut BufReader::new(&mut file)));
            let replies = match sent {
                Ok(replies) => replies,
                Err(error) if outcomes.is_empty() => {
                    return Err(SessionBroke {
                        error,
                        recorded: false,
                    })
                }
                Err(error) => {
                    // A later transaction broke: what the relay already took
                    // stands (sending it again would duplicate it); only the
                    // recipients still unanswered get the broken session's verdict.
                    let verdict = outcome::of_session_error(&error).outcome;
                    let reason = verdict.reason().to_string();
                    outcomes.extend(
                        pending
                            .into_iter()
                            .map(|(index, address)| (index, address, verdict.clone())),
                    );
                    self.ledger
                        .record(id, &envelope, peer, outcomes, Some(reason), Announce::Each);
                    return Err(SessionBroke {
                        error,
                        recorded: true,
                    });
                }
            };
            let mut again = Vec::new();
            let judged = outcome::of_transaction(&replies);
            for ((index, address), judgement) in pending.into_iter().zip(judged) {
                match judgement {
                    RcptJudgement::SendAgain => again.push((index, address)),
                    RcptJudgement::Final(verdict) => {
                        outcomes.push((index, address, verdict.outcome))
                    }
                }
            }
            pending = again;
        }
        let tenant_refused = outcomes.iter().any(|(_, _, o)| o.refuses_tenant());
        self.ledger
            .record(id, &envelope, peer, outcomes, None, Announce::Each);
        if tenant_refused {
            self.ledger.back_off_tenant();
        }
        Ok(())
    }
}

/// Test builds only: `PBXMAIL_DEBUG_PANIC_ONCE=TENANT` makes that tenant's
/// first worker panic, so tests can show the restart loses nothing.
#[cfg(debug_assertions)]
fn injected_panic(tenant: &str) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if std::env::var("PBXMAIL_DEBUG_PANIC_ONCE").is_ok_and(|t| t == tenant)
        && !DONE.swap(true, Ordering::AcqRel)
    {
        panic!("injected by PBXMAIL_DEBUG_PANIC_ONCE");
    }
}

#[cfg(not(debug_assertions))]
fn injected_panic(_tenant: &str) {}
