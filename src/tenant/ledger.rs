//! What a tenant knows about its mail: the pure queue (queue.rs) kept in step
//! with the spool, which stays the truth. It rebuilds the queue from the
//! spool, applies admin jobs, and records every recipient's verdict durably:
//! a message with recipients pending is retried later, a finished one is
//! settled (settle.rs: removed, archived, bounced or kept failed). It judges
//! nothing itself: outcomes come from the judge (outcome.rs).

use super::admin::{Admin, AdminJob, AdminReport};
use super::delivery_log::DeliveryLine;
use super::queue::Queue;
use super::settings::{Pacing, Policy};
use super::settle::Settle;
use super::{Job, TenantState, TenantStatus};
use crate::base::clock::Clock;
use crate::base::names::MessageId;
use crate::base::names::TenantName;
use crate::outcome::Outcome;
use crate::spool::envelope::{Envelope, RcptResult, RcptStatus, Record};
use crate::spool::{self, Spool};
use std::collections::BTreeMap;

/// A recipient's outcome in one attempt: (index in the envelope, address, outcome).
pub type RcptOutcome = (usize, String, Outcome);

/// Whether a recipient's result goes to the delivery log (info), or only to
/// debug, being a repeat of a tenant-wide failure the log has already told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    Each,
    Repeat,
}

pub struct Ledger {
    name: TenantName,
    policy: Policy,
    spool: Spool,
    clock: Clock,
    queue: Queue,
    /// Results the relay gave that could not be written yet (disk full).
    unrecorded: BTreeMap<MessageId, Record>,
    /// Delivered/bounced counts and last events, for `status`.
    counters: TenantStatus,
    /// When this tenant last swept `tmp/` (sweep_tmp_on_hint).
    last_tmp_sweep_ms: Option<u64>,
    /// A rescan that could not list the folder for a reason of the moment
    /// is due again at this time (the worker wakes for it).
    rescan_due_ms: Option<u64>,
}

/// At most one `tmp/` sweep a minute per tenant: a killed `sendmail`'s files
/// cost only disk space, so a minute late is soon enough.
const TMP_SWEEP_INTERVAL_MS: u64 = 60_000;

impl Ledger {
    pub fn new(
        name: TenantName,
        policy: Policy,
        pacing: Pacing,
        spool: Spool,
        clock: Clock,
        counters: TenantStatus,
    ) -> Ledger {
        let queue = Queue::new(
            pacing.backoff,
            pacing.rate_limit,
            pacing.messages_per_session,
            clock.now_ms(),
        );
        Ledger {
            name,
            policy,
            spool,
            clock,
            queue,
            unrecorded: BTreeMap::new(),
            counters,
            last_tmp_sweep_ms: None,
            rescan_due_ms: None,
        }
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    pub fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The relay itself is failing: the tenant backs off from now.
    pub fn back_off_tenant(&mut self) {
        let now = self.now();
        self.queue.back_off_tenant(now);
    }

    /// What `pbxmail status` shows now.
    pub fn status(&mut self, in_session: bool) -> TenantStatus {
        let now = self.now();
        self.counters.state = if in_session {
            TenantState::Sending
        } else if self.queue.backing_off(now) {
            TenantState::Backoff
        } else {
            TenantState::Idle
        };
        let counts = self.queue.counts();
        self.counters.queued = counts.queued;
        self.counters.deferred = counts.deferred;
        self.counters.held = counts.held;
        self.counters.failed = counts.failed;
        self.counters.clone()
    }

    /// Counts an outcome for `status` (per recipient attempt).
    fn count(&mut self, outcome: &Outcome) {
        let now = crate::base::time::rfc3339(self.now() / 1000);
        match outcome {
            Outcome::Delivered { .. } => {
                self.counters.delivered += 1;
                self.counters.last_success = Some(now);
            }
            Outcome::Bounce { reason } => {
                self.counters.bounced += 1;
                self.counters.last_error = Some(reason.clone());
            }
            Outcome::Retry { reason, .. } => self.counters.last_error = Some(reason.clone()),
        }
    }

    /// Applies a hint or an admin's command; a reported command's report
    /// is sent once its results are on disk.
    pub fn apply(&mut self, job: Job) {
        match job {
            Job::Queued(id) => {
                self.queue.note_queued(&id);
                self.sweep_tmp_on_hint();
            }
            Job::Flush => self.queue.flush(),
            Job::Admin(AdminJob {
                action,
                target,
                done,
            }) => {
                let results = self.admin().apply(action, &target);
                // The caller may have given up waiting; the effect stands.
                let _ = done.send(AdminReport { action, results });
            }
        }
    }

    fn admin(&mut self) -> Admin<'_> {
        Admin {
            name: &self.name,
            spool: &self.spool,
            queue: &mut self.queue,
        }
    }

    /// Rebuilds the queue from the tenant's spool folder.
    pub fn rescan(&mut self) {
        let Some(ids) = self.list_queued() else {
            return;
        };
        for id in ids {
            if self.queue.knows(&id) {
                continue;
            }
            match self.spool.load_envelope(&self.name, &id) {
                // Finished, but a crash came before it was bounced or removed.
                Ok(env) if env.is_done() => self.finish_done(&id, &env, false),
                Ok(env) if env.held => self.queue.insert_held(&id),
                Ok(env) => {
                    self.queue
                        .schedule(&id, env.next_attempt_ms.unwrap_or(0), env.attempts > 0)
                }
                // Removed meanwhile (delivered by an admin's command, say).
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_damage() => self.quarantine(&id, &e.to_string()),
                Err(e) => self.retry_later(&id, false, &e.to_string()),
            }
        }
        self.quarantine_orphans();
        self.quarantine_strays();
        log::debug!(
            "tenant {}: {} messages queued",
            self.name(),
            self.queue.len()
        );
    }

    /// The IDs queued in the tenant's folder. A problem of the moment
    /// (EMFILE while every other tenant holds a session, say) schedules the
    /// rescan again after backoff.min, as for an entry that cannot load now;
    /// the worker wakes for it and keeps its thread until it has run.
    fn list_queued(&mut self) -> Option<Vec<MessageId>> {
        match self.spool.message_ids(&self.name) {
            Ok(ids) => {
                self.rescan_due_ms = None;
                Some(ids)
            }
            Err(e) if !e.is_damage() && !e.is_not_found() => {
                let at = self.queue.retry_soon(self.now());
                log::warn!(
                    "tenant {}: cannot read its spool folder now, will retry: {e}",
                    self.name()
                );
                self.rescan_due_ms = Some(at);
                None
            }
            Err(e) => {
                log::error!("tenant {}: cannot read its spool folder: {e}", self.name());
                self.rescan_due_ms = None;
                None
            }
        }
    }

    /// When a rescan that failed for a reason of the moment is due again.
    pub fn rescan_due(&self) -> Option<u64> {
        self.rescan_due_ms
    }

    /// A problem of the moment (no descriptor left, no memory, an I/O error)
    /// kept an entry from loading: it is tried again after backoff.min,
    /// never quarantined, since nothing says its files are bad.
    fn retry_later(&mut self, id: &MessageId, attempted: bool, why: &str) {
        let at = self.queue.retry_soon(self.now());
        log::warn!(
            "{id} tenant={}: cannot load it now, will retry: {why}",
            self.name()
        );
        self.queue.schedule(id, at, attempted);
    }

    /// `.msg` files without an `.env`: abandoned submissions go, committed
    /// messages whose envelope was lost are quarantined (spool recovery.rs
    /// tells the two apart by the commit's order).
    fn quarantine_orphans(&mut self) {
        let found = match self.spool.sweep_unpaired(&self.name) {
            Ok(found) => found,
            Err(e) => {
                log::warn!("tenant {}: cannot sweep its folder: {e}", self.name());
                return;
            }
        };
        if found.removed > 0 {
            log::info!(
                "tenant {}: removed {} abandoned partial submissions",
                self.name(),
                found.removed
            );
        }
        for id in found.orphans {
            self.quarantine(&id, spool::recovery::ORPHAN_REASON);
        }
    }

    /// A submission hint says `sendmail`s are at work: the leftovers of any
    /// that were killed are swept from `tmp/` now, at most once a minute.
    /// No timer needed: leftovers only appear where submissions happen, and
    /// `tmp/` holds only submissions in flight, so the sweep is small.
    fn sweep_tmp_on_hint(&mut self) {
        let now = self.now();
        if self
            .last_tmp_sweep_ms
            .is_some_and(|at| now.saturating_sub(at) < TMP_SWEEP_INTERVAL_MS)
        {
            return;
        }
        self.last_tmp_sweep_ms = Some(now);
        match self.spool.sweep_tmp() {
            Ok(0) => {}
            Ok(n) => log::info!("spool: removed {n} abandoned partial submissions"),
            Err(e) => log::warn!("spool: cannot sweep tmp/: {e}"),
        }
    }

    /// Files in the tenant's folder that are no spool entry are moved aside.
    fn quarantine_strays(&self) {
        let strays = self.spool.stray_files(&self.name).unwrap_or_default();
        for path in &strays {
            let reason = "not a spool file (unknown name or type)";
            log::error!(
                "tenant {}: quarantined {}: {reason}",
                self.name(),
                path.display()
            );
            if let Err(e) = self.spool.quarantine_stray(&self.name, path, reason) {
                log::error!(
                    "tenant {}: cannot quarantine {}: {e}",
                    self.name(),
                    path.display()
                );
            }
        }
    }

    pub fn quarantine(&mut self, id: &MessageId, reason: &str) {
        self.queue.remove(id);
        self.queue.unfail(id);
        log::error!("{id} tenant={}: quarantined: {reason}", self.name());
        if let Err(e) = self.spool.quarantine(&self.name, id, reason) {
            log::error!("{id} tenant={}: cannot quarantine: {e}", self.name());
        }
    }

    /// A message's envelope, ready for an attempt: a result left unwritten
    /// is written first. None when it is not to be tried now (still cannot
    /// record, deleted meanwhile, or unreadable and quarantined).
    pub fn load_for_attempt(&mut self, id: &MessageId) -> Option<Envelope> {
        if !self.write_unrecorded(id) {
            return None;
        }
        match self.spool.load_envelope(&self.name, id) {
            // Held on disk, though queued as waiting (a rescan that could not
            // read it then retried it): the disk wins, it is not sent.
            Ok(env) if env.held => {
                self.queue.remove(id);
                self.queue.insert_held(id);
                None
            }
            Ok(env) => Some(env),
            Err(e) if e.is_not_found() => {
                self.queue.remove(id); // deleted by an admin meanwhile
                None
            }
            Err(e) if e.is_damage() => {
                self.quarantine(id, &e.to_string());
                None
            }
            Err(e) => {
                self.retry_later(id, true, &e.to_string());
                None
            }
        }
    }

    /// Opens the message file and checks it against the SHA-256 in its
    /// envelope; the same pass notes whether it has 8-bit content. None when
    /// it is not to be sent now: damaged (missing beside its envelope, or a
    /// checksum mismatch) and quarantined, or unreadable for the moment
    /// (EMFILE, EIO...) and retried later.
    pub fn open_verified(
        &mut self,
        id: &MessageId,
        envelope: &Envelope,
    ) -> Option<(std::fs::File, bool)> {
        let opened = self
            .spool
            .open_message(&self.name, id)
            .and_then(|mut file| {
                let scan =
                    spool::scan_message(&mut file).map_err(|source| spool::SpoolError::Io {
                        path: self.spool.tenant_dir(&self.name).join(format!("{id}.msg")),
                        source,
                    })?;
                Ok((file, scan))
            });
        match opened {
            Ok((file, scan)) if scan.sha256 == envelope.sha256 => Some((file, scan.eight_bit)),
            Ok((_, scan)) => {
                let why = format!(
                    "message file checksum mismatch (SHA-256 {}, envelope says {})",
                    scan.sha256, envelope.sha256
                );
                self.quarantine(id, &why);
                None
            }
            // Its envelope is here: the message file is lost, not in transit.
            Err(e) if e.is_not_found() => {
                self.quarantine(id, &format!("message file missing: {e}"));
                None
            }
            Err(e) => {
                self.retry_later(
                    id,
                    envelope.attempts > 0,
                    &format!("message file unreadable: {e}"),
                );
                None
            }
        }
    }

    /// Gives every pending recipient of each message the same verdict (a
    /// session that failed or could not be had). A verdict that refuses the
    /// tenant backs it off first.
    pub fn defer_all(
        &mut self,
        ids: &[MessageId],
        relay: &str,
        outcome: &Outcome,
        announce: Announce,
    ) {
        if outcome.refuses_tenant() {
            self.back_off_tenant();
        }
        for id in ids {
            let Some(envelope) = self.load_for_attempt(id) else {
                continue;
            };
            let outcomes = envelope
                .pending()
                .map(|(i, r)| (i, r.address.clone(), outcome.clone()))
                .collect();
            let error = Some(outcome.reason().to_string());
            self.record(id, &envelope, relay, outcomes, error, announce);
        }
    }

    /// Logs one line per recipient, appends the attempt durably, and settles
    /// the message. The judge turns a retry past max_queue_lifetime into a bounce.
    pub fn record(
        &mut self,
        id: &MessageId,
        envelope: &Envelope,
        relay: &str,
        outcomes: Vec<RcptOutcome>,
        error: Option<String>,
        announce: Announce,
    ) {
        let now = self.now();
        let age_ms = now.saturating_sub(envelope.queued_at_ms);
        let mut results = Vec::with_capacity(outcomes.len());
        let mut still_pending = 0usize;
        let mut last_problem = error;
        for (rcpt, address, outcome) in outcomes {
            let outcome = outcome.expire(age_ms, self.policy.max_queue_lifetime);
            let level = match (&outcome, announce) {
                // A possible duplicate is always told.
                (
                    Outcome::Retry {
                        unconfirmed: false, ..
                    },
                    Announce::Repeat,
                ) => log::Level::Debug,
                _ => log::Level::Info,
            };
            let line = DeliveryLine {
                id,
                tenant: self.name(),
                address: &address,
                relay,
                delay_ms: age_ms,
                outcome: &outcome,
            };
            log::log!(level, "{line}");
            let status = match &outcome {
                Outcome::Delivered { .. } => RcptStatus::Sent,
                Outcome::Retry { .. } => {
                    still_pending += 1;
                    RcptStatus::Pending
                }
                Outcome::Bounce { .. } => RcptStatus::Failed,
            };
            self.count(&outcome);
            if status != RcptStatus::Sent {
                last_problem = Some(outcome.reason().to_string());
            }
            results.push(RcptResult {
                rcpt,
                status,
                reply: outcome.reason().to_string(),
            });
        }
        let pending_before = envelope.pending().count();
        still_pending += pending_before.saturating_sub(results.len());
        let next_attempt_ms = (still_pending > 0).then(|| {
            self.queue
                .retry_at(now, envelope.attempts.saturating_add(1))
        });
        let record = Record::Attempt {
            at_ms: now,
            results,
            next_attempt_ms,
            error: last_problem,
        };
        if let Err(e) = self.spool.append(&self.name, id, &record) {
            // Keep the result in memory and write it before this message is
            // touched again: re-sending what the relay already took (the disk
            // is full, say) would deliver it once per retry.
            log::error!(
                "{id} tenant={}: cannot record the delivery result, will retry: {e}",
                self.name()
            );
            self.unrecorded.insert(id.clone(), record);
            let retry = self.queue.retry_soon(now);
            self.queue.schedule(id, retry, true);
            return;
        }
        match next_attempt_ms {
            Some(at) => self.queue.schedule(id, at, true),
            None => {
                self.queue.remove(id);
                match self.spool.load_envelope(&self.name, id) {
                    Ok(done) => self.finish_done(id, &done, true),
                    Err(e) => log::error!(
                        "{id} tenant={}: cannot re-read the envelope: {e}",
                        self.name()
                    ),
                }
            }
        }
    }

    /// A message with no recipient pending: removed, bounced or kept as
    /// failed (settle.rs). `announce` logs the "kept" case (not on rescans).
    pub fn finish_done(&mut self, id: &MessageId, envelope: &Envelope, announce: bool) {
        let now = self.now();
        Settle {
            name: &self.name,
            policy: &self.policy,
            spool: &self.spool,
            queue: &mut self.queue,
            counters: &mut self.counters,
            now,
        }
        .finish_done(id, envelope, announce);
    }

    /// Writes a result that could not be written before. False if it still cannot.
    fn write_unrecorded(&mut self, id: &MessageId) -> bool {
        let Some(record) = self.unrecorded.get(id) else {
            return true;
        };
        if let Err(e) = self.spool.append(&self.name, id, record) {
            log::error!(
                "{id} tenant={}: still cannot record the delivery result: {e}",
                self.name()
            );
            let retry = self.queue.retry_soon(self.now());
            self.queue.schedule(id, retry, true);
            return false;
        }
        self.unrecorded.remove(id);
        true
    }
}
