//! The tenant worker's loop: rebuild the queue index from the spool, deliver
//! what is due, then sleep until a hint arrives or the next message, the end
//! of a tenant backoff or the next rate-limit token is due. No polling.

use super::pacing::RateBucket;
use super::{Job, Settings};
use crate::spool::{self, MessageId, Spool};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) struct TenantWorker {
    pub(super) settings: Settings,
    pub(super) spool: Spool,
    jobs: Receiver<Job>,
    rescan: Arc<AtomicBool>,
    pub(super) stop: Arc<AtomicBool>,
    /// Queued message → when it is due (unix ms). Small on purpose: the rest is on disk.
    pub(super) queue: BTreeMap<MessageId, u64>,
    /// Results the relay gave that could not be written yet (disk full).
    pub(super) unrecorded: BTreeMap<MessageId, spool::envelope::Record>,
    /// When the relay itself failed: (failures in a row, no session before this time).
    pub(super) tenant_backoff: Option<(u32, u64)>,
    pub(super) rate: Option<RateBucket>,
    /// Set when the rate limit ended a session: no new session before this time.
    pub(super) rate_wait_until: u64,
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
    ) -> TenantWorker {
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
            unrecorded: BTreeMap::new(),
            tenant_backoff: None,
            rate,
            rate_wait_until: 0,
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
                self.queue.entry(id).or_insert(0);
            }
        }
    }

    /// The earliest time anything may happen: a message due, but not before
    /// a tenant backoff or a rate-limit pause ends.
    fn next_wakeup(&self) -> Option<u64> {
        let earliest = self.queue.values().min().copied()?;
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
            if self.queue.contains_key(&id) {
                continue;
            }
            match self.spool.load_envelope(self.name(), &id) {
                // Finished, but a crash came before it was bounced or removed.
                Ok(env) if env.is_done() => self.finish_done(&id, &env, false),
                Ok(env) => {
                    self.queue.insert(id, env.next_attempt_ms.unwrap_or(0));
                }
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
            .filter(|(_, &at)| at <= now)
            .map(|(id, &at)| (at, id))
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
            .filter(|(id, &at)| at <= now && !tried.contains(*id))
            .min_by_key(|(_, &at)| at)
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
