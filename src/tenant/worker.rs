//! The tenant worker's loop: rebuild the queue index from the spool, deliver
//! what is due, then sleep until a hint arrives or the next message, the end
//! of a tenant backoff or the next rate-limit token is due. No polling.

use super::pacing::RateBucket;
use super::{Job, Settings, Target, TenantState, TenantStatus};
use crate::outcome::Outcome;
use crate::spool::envelope::Record;
use crate::spool::{self, MessageId, Spool};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the worker keeps in memory per queued message; the rest is on disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Queued {
    /// Unix ms when it may be tried.
    pub(super) due: u64,
    /// Tried before (deferred), as opposed to new (queued).
    pub(super) attempted: bool,
}

pub(super) struct TenantWorker {
    pub(super) settings: Settings,
    pub(super) spool: Spool,
    jobs: Receiver<Job>,
    rescan: Arc<AtomicBool>,
    pub(super) stop: Arc<AtomicBool>,
    /// Messages waiting to be sent.
    pub(super) queue: BTreeMap<MessageId, Queued>,
    /// On hold by an admin: not sent until released.
    pub(super) held: BTreeSet<MessageId>,
    /// Finished with failures that nobody could take; kept on disk for the admin.
    pub(super) failed: BTreeSet<MessageId>,
    /// Results the relay gave that could not be written yet (disk full).
    pub(super) unrecorded: BTreeMap<MessageId, spool::envelope::Record>,
    /// When the relay itself failed: (failures in a row, no session before this time).
    pub(super) tenant_backoff: Option<(u32, u64)>,
    pub(super) rate: Option<RateBucket>,
    /// Set when the rate limit ended a session: no new session before this time.
    pub(super) rate_wait_until: u64,
    pub(super) in_session: bool,
    /// Access tokens for `auth = xoauth2`, made on first use.
    pub(super) tokens: Option<crate::oauth::TokenSource>,
    /// "Sign in again" has been logged since the last good token (say it once).
    pub(super) sign_in_logged: bool,
    /// What `pbxmail status` shows; the dispatcher reads it without waiting on us.
    status: Arc<Mutex<TenantStatus>>,
    counters: TenantStatus,
}

enum Wake {
    Work,
    Stop,
}

impl TenantWorker {
    pub(super) fn new(
        settings: Settings,
        spool: Spool,
        jobs: Receiver<Job>,
        rescan: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
        status: Arc<Mutex<TenantStatus>>,
    ) -> TenantWorker {
        // Counters survive a restart after a panic.
        let counters = status.lock().map(|s| s.clone()).unwrap_or_default();
        let rate = settings
            .rate_limit
            .map(|limit| RateBucket::new(limit, spool::unix_millis()));
        TenantWorker {
            settings,
            spool,
            jobs,
            rescan,
            stop,
            queue: BTreeMap::new(),
            held: BTreeSet::new(),
            failed: BTreeSet::new(),
            unrecorded: BTreeMap::new(),
            tenant_backoff: None,
            rate,
            rate_wait_until: 0,
            in_session: false,
            tokens: None,
            sign_in_logged: false,
            status,
            counters,
        }
    }

    /// Puts a message in the index (or moves it) with its next due time.
    pub(super) fn schedule(&mut self, id: &MessageId, due: u64, attempted: bool) {
        self.queue.insert(id.clone(), Queued { due, attempted });
    }

    /// Counts an outcome for `status` (per recipient attempt).
    pub(super) fn count(&mut self, outcome: &Outcome) {
        let now = crate::time::rfc3339(spool::unix_millis() / 1000);
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

    /// A problem `status` should show that is not a delivery outcome.
    pub(super) fn note_error(&mut self, problem: String) {
        self.counters.last_error = Some(problem);
    }

    /// Makes the current state visible to `pbxmail status`.
    pub(super) fn publish(&mut self) {
        let now = spool::unix_millis();
        self.counters.state = if self.in_session {
            TenantState::Sending
        } else if self.tenant_backoff.is_some_and(|(_, until)| now < until) {
            TenantState::Backoff
        } else {
            TenantState::Idle
        };
        self.counters.queued = self.queue.values().filter(|q| !q.attempted).count();
        self.counters.deferred = self.queue.len() - self.counters.queued;
        self.counters.held = self.held.len();
        self.counters.failed = self.failed.len();
        if let Ok(mut shared) = self.status.lock() {
            *shared = self.counters.clone();
        }
    }

    pub(super) fn name(&self) -> &str {
        self.settings.name.as_str()
    }

    pub(super) fn run(mut self) {
        log::debug!("tenant {}: worker started", self.name());
        injected_panic(self.name());
        loop {
            // The rescan flag starts set, so the first pass loads what the spool holds.
            if self.rescan.swap(false, Ordering::AcqRel) {
                self.rescan_spool();
            }
            self.deliver_due();
            self.publish();
            if self.stopping() {
                break;
            }
            if let Wake::Stop = self.wait() {
                break;
            }
        }
        log::debug!("tenant {}: worker stopped", self.name());
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Blocks until a job arrives or the next thing is due.
    fn wait(&mut self) -> Wake {
        let first = match self.next_wakeup() {
            Some(at) => {
                let wait = Duration::from_millis(at.saturating_sub(spool::unix_millis()));
                match self.jobs.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Wake::Stop,
                }
            }
            None => match self.jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return Wake::Stop,
            },
        };
        if let Some(job) = first {
            self.handle(job);
        }
        self.take_waiting_jobs();
        Wake::Work
    }

    /// Takes every hint already waiting, so back-to-back mail shares sessions.
    pub(super) fn take_waiting_jobs(&mut self) {
        while let Ok(job) = self.jobs.try_recv() {
            self.handle(job);
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Queued(id) => {
                if !self.queue.contains_key(&id) && !self.held.contains(&id) {
                    self.schedule(&id, 0, false);
                }
            }
            Job::Flush => {
                self.tenant_backoff = None;
                self.queue.values_mut().for_each(|q| q.due = 0);
            }
            Job::Hold(target) => {
                for id in self.targets(&target, |w| w.queue.keys().cloned().collect()) {
                    if self.queue.contains_key(&id) && self.mark(&id, &Record::Held) {
                        self.queue.remove(&id);
                        self.held.insert(id);
                    }
                }
            }
            Job::Release(target) => {
                for id in self.targets(&target, |w| w.held.iter().cloned().collect()) {
                    if self.held.contains(&id) && self.mark(&id, &Record::Released) {
                        self.held.remove(&id);
                        let attempted = self
                            .spool
                            .load_envelope(self.name(), &id)
                            .map_or(true, |env| env.attempts > 0);
                        self.schedule(&id, 0, attempted);
                    }
                }
            }
            Job::Delete(target) => {
                let all = |w: &TenantWorker| {
                    let mut ids: Vec<MessageId> = w.queue.keys().cloned().collect();
                    ids.extend(w.held.iter().cloned());
                    ids.extend(w.failed.iter().cloned());
                    ids
                };
                for id in self.targets(&target, all) {
                    match self.spool.remove(self.name(), &id) {
                        Ok(()) => {
                            log::info!("{id} tenant={}: deleted by an administrator", self.name())
                        }
                        Err(e) => log::warn!("{id} tenant={}: cannot delete: {e}", self.name()),
                    }
                    self.queue.remove(&id);
                    self.held.remove(&id);
                    self.failed.remove(&id);
                }
            }
        }
    }

    fn targets(
        &self,
        target: &Target,
        all: impl Fn(&TenantWorker) -> Vec<MessageId>,
    ) -> Vec<MessageId> {
        match target {
            Target::All => all(self),
            Target::Ids(ids) => ids.clone(),
        }
    }

    /// Appends an admin's record durably; false (logged) if it cannot.
    fn mark(&self, id: &MessageId, record: &Record) -> bool {
        match self.spool.append(self.name(), id, record) {
            Ok(()) => true,
            Err(e) => {
                log::error!("{id} tenant={}: cannot record {record:?}: {e}", self.name());
                false
            }
        }
    }

    /// The earliest time anything may happen: a message due, but not before
    /// a tenant backoff or a rate-limit pause ends.
    fn next_wakeup(&self) -> Option<u64> {
        let earliest = self.queue.values().map(|q| q.due).min()?;
        let backoff = self.tenant_backoff.map_or(0, |(_, until)| until);
        Some(earliest.max(backoff).max(self.rate_wait_until))
    }

    /// Rebuilds the index from the tenant's spool folder.
    fn rescan_spool(&mut self) {
        let ids = match self.spool.message_ids(self.name()) {
            Ok(ids) => ids,
            Err(e) => {
                log::error!("tenant {}: cannot read its spool folder: {e}", self.name());
                return;
            }
        };
        for id in ids {
            if self.queue.contains_key(&id) || self.held.contains(&id) || self.failed.contains(&id)
            {
                continue;
            }
            match self.spool.load_envelope(self.name(), &id) {
                // Finished, but a crash came before it was bounced or removed.
                Ok(env) if env.is_done() => self.finish_done(&id, &env, false),
                Ok(env) if env.held => {
                    self.held.insert(id);
                }
                Ok(env) => self.schedule(&id, env.next_attempt_ms.unwrap_or(0), env.attempts > 0),
                Err(e) => self.quarantine(&id, &e.to_string()),
            }
        }
        self.quarantine_strays();
        log::debug!(
            "tenant {}: {} messages queued",
            self.name(),
            self.queue.len()
        );
    }

    /// Files in the tenant's folder that are no spool entry are moved aside.
    fn quarantine_strays(&self) {
        let strays = self.spool.stray_files(self.name()).unwrap_or_default();
        for path in &strays {
            let reason = "not a spool file (unknown name or type)";
            log::error!(
                "tenant {}: quarantined {}: {reason}",
                self.name(),
                path.display()
            );
            if let Err(e) = self.spool.quarantine_stray(self.name(), path, reason) {
                log::error!(
                    "tenant {}: cannot quarantine {}: {e}",
                    self.name(),
                    path.display()
                );
            }
        }
    }

    pub(super) fn quarantine(&mut self, id: &MessageId, reason: &str) {
        self.queue.remove(id);
        self.failed.remove(id);
        log::error!("{id} tenant={}: quarantined: {reason}", self.name());
        if let Err(e) = self.spool.quarantine(self.name(), id, reason) {
            log::error!("{id} tenant={}: cannot quarantine: {e}", self.name());
        }
    }

    /// Up to messages_per_session due messages, earliest first.
    pub(super) fn due_batch(&self, now: u64) -> Vec<MessageId> {
        let mut due: Vec<(u64, &MessageId)> = self
            .queue
            .iter()
            .filter(|(_, q)| q.due <= now)
            .map(|(id, q)| (q.due, id))
            .collect();
        due.sort();
        due.into_iter()
            .take(self.settings.messages_per_session)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// The earliest-due message not yet tried in this session.
    pub(super) fn next_due(&self, tried: &HashSet<MessageId>) -> Option<MessageId> {
        let now = spool::unix_millis();
        self.queue
            .iter()
            .filter(|(id, q)| q.due <= now && !tried.contains(*id))
            .min_by_key(|(_, q)| q.due)
            .map(|(id, _)| id.clone())
    }

    /// Runs sessions until nothing is due, the relay fails, we are paced, or told to stop.
    fn deliver_due(&mut self) {
        loop {
            let now = spool::unix_millis();
            if self.tenant_backoff.is_some_and(|(_, until)| now < until)
                || now < self.rate_wait_until
            {
                return;
            }
            let batch = self.due_batch(now);
            if batch.is_empty() || self.stopping() {
                return;
            }
            if !self.run_session(&batch) {
                return;
            }
        }
    }

    /// The relay itself is failing: no session before the backoff has passed.
    pub(super) fn back_off_tenant(&mut self) {
        let failures = self.tenant_backoff.map_or(0, |(n, _)| n) + 1;
        let until = spool::unix_millis() + self.settings.backoff.after(failures).as_millis() as u64;
        self.tenant_backoff = Some((failures, until));
    }

    /// Takes a rate-limit token for one more message; without one, notes
    /// when the next comes and says no.
    pub(super) fn may_send_now(&mut self) -> bool {
        let now = spool::unix_millis();
        let Some(bucket) = self.rate.as_mut() else {
            return true;
        };
        if bucket.try_take(now) {
            return true;
        }
        self.rate_wait_until = bucket.next_token_at(now);
        false
    }
}

/// Test builds only: `PBXMAIL_DEBUG_PANIC_ONCE=TENANT` makes that tenant's
/// first worker panic, so tests can show the restart loses nothing.
#[cfg(debug_assertions)]
fn injected_panic(tenant: &str) {
    use std::sync::atomic::AtomicBool;
    static DONE: AtomicBool = AtomicBool::new(false);
    if std::env::var("PBXMAIL_DEBUG_PANIC_ONCE").is_ok_and(|t| t == tenant)
        && !DONE.swap(true, Ordering::AcqRel)
    {
        panic!("injected by PBXMAIL_DEBUG_PANIC_ONCE");
    }
}

#[cfg(not(debug_assertions))]
fn injected_panic(_tenant: &str) {}
