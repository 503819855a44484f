//! One OS thread per tenant. `TenantHandle` is what the dispatcher holds;
//! `TenantWorker` owns the tenant's queue index and runs blocking SMTP
//! sessions with the tenant's own timeouts, so a slow or dead relay stalls
//! only this thread.
//!
//! The queue index is rebuilt from the spool at start; jobs on the channel
//! are hints, and a full channel just asks the worker to rescan its folder.

use crate::config::{DaemonConfig, TenantConfig, TenantName};
use crate::outcome::{self, Outcome, RetryScope};
use crate::smtp::client::{self, ClientSettings};
use crate::smtp::session::{Outgoing, Session, Timeouts};
use crate::smtp::SessionError;
use crate::spool::envelope::{Envelope, RcptResult, RcptStatus, Record};
use crate::spool::{self, MessageId, Spool};
use crate::tls::{self, Stream};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use rustls::RootCertStore;
use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufReader, Seek};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Enough for a TLS session and our buffers; measured need is far lower.
const STACK_SIZE: usize = 512 * 1024;
/// Hints waiting for a busy worker; past this the worker rescans its folder instead.
const JOB_CAPACITY: usize = 1024;

#[derive(Debug)]
pub enum Job {
    Queued(MessageId),
}

pub struct TenantHandle {
    name: TenantName,
    jobs: Option<Sender<Job>>,
    rescan: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TenantHandle {
    /// Starts the tenant's thread. `finished` receives the name when it ends.
    pub fn spawn(
        tenant: &TenantConfig,
        daemon: &DaemonConfig,
        spool: Spool,
        roots: &RootCertStore,
        finished: Sender<TenantName>,
    ) -> io::Result<TenantHandle> {
        let (jobs, receiver) = bounded(JOB_CAPACITY);
        let rescan = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let settings = tls::client_config(tenant, roots).map(|tls| ClientSettings {
            hostname: daemon.hostname.clone(),
            relay: tenant.relay.clone(),
            tls_mode: tenant.tls,
            tls,
            auth: tenant.auth,
            username: tenant.username.clone(),
            password: tenant.password.clone(),
            allow_plaintext_auth: tenant.allow_plaintext_auth,
            timeouts: Timeouts {
                connect: tenant.connect_timeout,
                command: tenant.command_timeout,
                data: tenant.data_timeout,
            },
        });
        if let Err(e) = &settings {
            log::error!(
                "tenant {}: {e}; its mail stays queued until the configuration is fixed",
                tenant.name
            );
        }
        let worker = TenantWorker {
            name: tenant.name.clone(),
            envelope_from: tenant.envelope_from.clone(),
            messages_per_session: tenant.messages_per_session.max(1) as usize,
            settings: settings.map_err(|e| e.to_string()),
            retry_min: daemon.retry_min,
            retry_max: daemon.retry_max,
            spool,
            jobs: receiver,
            rescan: Arc::clone(&rescan),
            stop: Arc::clone(&stop),
            queue: BTreeMap::new(),
            unrecorded: BTreeMap::new(),
            tenant_backoff: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("tenant:{}", tenant.name))
            .stack_size(STACK_SIZE)
            .spawn(move || {
                let name = worker.name.clone();
                worker.run();
                let _ = finished.send(name);
            })?;
        Ok(TenantHandle {
            name: tenant.name.clone(),
            jobs: Some(jobs),
            rescan,
            stop,
            thread: Some(thread),
        })
    }

    /// Never blocks: a full channel turns into a rescan request.
    pub fn send(&self, job: Job) {
        let Some(jobs) = &self.jobs else { return };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.rescan.store(true, Ordering::Release),
            Err(TrySendError::Disconnected(_)) => {
                log::error!(
                    "tenant {}: worker thread is gone; mail stays queued",
                    self.name
                )
            }
        }
    }

    /// Asks the worker to stop after the message it is sending.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.jobs = None; // disconnecting wakes a worker waiting for jobs
    }

    /// Waits for the thread; call after `stop` and once `finished` reported it.
    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("tenant {}: worker thread panicked", self.name);
            }
        }
    }
}

impl Drop for TenantHandle {
    fn drop(&mut self) {
        self.stop();
        self.join();
    }
}

struct TenantWorker {
    name: TenantName,
    envelope_from: Option<String>,
    messages_per_session: usize,
    /// Err when the tenant's TLS settings are unusable: mail waits, with this reason.
    settings: Result<ClientSettings, String>,
    retry_min: Duration,
    retry_max: Duration,
    spool: Spool,
    jobs: Receiver<Job>,
    rescan: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Queued message → when it is due (unix ms). Small on purpose: the rest is on disk.
    queue: BTreeMap<MessageId, u64>,
    /// Results the relay gave that could not be written yet (disk full).
    unrecorded: BTreeMap<MessageId, Record>,
    /// When the relay itself failed: (attempts in a row, no session before this time).
    tenant_backoff: Option<(u32, u64)>,
}

enum Wake {
    Work,
    Stop,
}

impl TenantWorker {
    fn run(mut self) {
        log::debug!("tenant {}: worker started", self.name);
        loop {
            // The rescan flag starts set, so the first pass loads what the spool holds.
            if self.rescan.swap(false, Ordering::AcqRel) {
                self.rescan_spool();
            }
            self.deliver_due();
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if let Wake::Stop = self.wait() {
                break;
            }
        }
        log::debug!("tenant {}: worker stopped", self.name);
    }

    /// Blocks until a job arrives or the next message is due.
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
        // Take every hint already waiting, so back-to-back mail shares sessions.
        if let Some(job) = first {
            self.handle(job);
        }
        while let Ok(job) = self.jobs.try_recv() {
            self.handle(job);
        }
        Wake::Work
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Queued(id) => {
                self.queue.entry(id).or_insert(0);
            }
        }
    }

    fn next_wakeup(&self) -> Option<u64> {
        let earliest = self.queue.values().min().copied()?;
        let not_before = self.tenant_backoff.map_or(0, |(_, until)| until);
        Some(earliest.max(not_before))
    }

    fn rescan_spool(&mut self) {
        let ids = match self.spool.message_ids(self.name.as_str()) {
            Ok(ids) => ids,
            Err(e) => {
                log::error!("tenant {}: cannot read its spool folder: {e}", self.name);
                return;
            }
        };
        for id in ids {
            if self.queue.contains_key(&id) {
                continue;
            }
            match self.spool.load_envelope(self.name.as_str(), &id) {
                Ok(env) if env.is_done() => {} // failed and kept for the admin
                Ok(env) => {
                    self.queue.insert(id, env.next_attempt_ms.unwrap_or(0));
                }
                Err(e) => self.quarantine(&id, &e.to_string()),
            }
        }
        self.quarantine_strays();
        log::debug!("tenant {}: {} messages queued", self.name, self.queue.len());
    }

    /// Files in the tenant's folder that are no spool entry are moved aside.
    fn quarantine_strays(&self) {
        let strays = self
            .spool
            .stray_files(self.name.as_str())
            .unwrap_or_default();
        for path in &strays {
            let reason = "not a spool file (unknown name or type)";
            log::error!(
                "tenant {}: quarantined {}: {reason}",
                self.name,
                path.display()
            );
            if let Err(e) = self
                .spool
                .quarantine_stray(self.name.as_str(), path, reason)
            {
                log::error!(
                    "tenant {}: cannot quarantine {}: {e}",
                    self.name,
                    path.display()
                );
            }
        }
    }

    fn due_batch(&self, now: u64) -> Vec<MessageId> {
        let mut due: Vec<(u64, &MessageId)> = self
            .queue
            .iter()
            .filter(|(_, &at)| at <= now)
            .map(|(id, &at)| (at, id))
            .collect();
        due.sort();
        due.into_iter()
            .take(self.messages_per_session)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Runs sessions until nothing is due, the relay fails, or we are told to stop.
    fn deliver_due(&mut self) {
        loop {
            let now = spool::unix_millis();
            if self.tenant_backoff.is_some_and(|(_, until)| now < until) {
                return;
            }
            let batch = self.due_batch(now);
            if batch.is_empty() || self.stop.load(Ordering::Acquire) {
                return;
            }
            if !self.run_session(&batch) {
                return;
            }
        }
    }

    /// One SMTP session: up to messages_per_session due messages, the first
    /// of them `batch` (deferred together if the relay cannot be reached).
    /// Returns false when the relay failed.
    fn run_session(&mut self, batch: &[MessageId]) -> bool {
        let settings = match &self.settings {
            Ok(settings) => settings.clone(),
            Err(why) => {
                let why = format!("tenant TLS settings unusable: {why}");
                self.defer_all(batch, "-", &why, RetryScope::Tenant);
                return false;
            }
        };
        let mut connected = match client::open(&settings) {
            Ok(connected) => connected,
            Err(failure) => {
                let outcome = outcome::of_session_error(&failure.error);
                log::warn!(
                    "tenant {}: relay {}: {}",
                    self.name,
                    failure.peer,
                    failure.error
                );
                self.defer_all(batch, &failure.peer, outcome.reason(), RetryScope::Tenant);
                return false;
            }
        };
        self.tenant_backoff = None;
        let mut tried = HashSet::new();
        while tried.len() < self.messages_per_session && !self.stop.load(Ordering::Acquire) {
            // Mail submitted meanwhile rides this session too.
            while let Ok(job) = self.jobs.try_recv() {
                self.handle(job);
            }
            let Some(id) = self.next_due(&tried) else {
                break;
            };
            tried.insert(id.clone());
            if let Err(e) = self.deliver_one(&mut connected.session, &connected.peer, &id) {
                let outcome = outcome::of_session_error(&e);
                log::warn!("tenant {}: relay {}: {e}", self.name, connected.peer);
                let scope = match outcome {
                    Outcome::Retry { scope, .. } => scope,
                    _ => RetryScope::Message,
                };
                self.defer_all(
                    std::slice::from_ref(&id),
                    &connected.peer,
                    outcome.reason(),
                    scope,
                );
                return scope != RetryScope::Tenant;
            }
            if self.tenant_backoff.is_some() {
                // A reply showed the tenant's login is refused: stop here.
                break;
            }
        }
        connected.session.quit();
        self.tenant_backoff.is_none()
    }

    /// The earliest-due message not yet tried in this session.
    fn next_due(&self, tried: &HashSet<MessageId>) -> Option<MessageId> {
        let now = spool::unix_millis();
        self.queue
            .iter()
            .filter(|(id, &at)| at <= now && !tried.contains(*id))
            .min_by_key(|(_, &at)| at)
            .map(|(id, _)| id.clone())
    }

    /// Sends one message over an open session and records every recipient's result.
    fn deliver_one(
        &mut self,
        session: &mut Session<Stream>,
        peer: &str,
        id: &MessageId,
    ) -> Result<(), SessionError> {
        if !self.write_unrecorded(id) {
            return Ok(());
        }
        let tenant = self.name.as_str().to_string();
        let envelope = match self.spool.load_envelope(&tenant, id) {
            Ok(env) => env,
            Err(e) if e.is_not_found() => {
                self.queue.remove(id); // deleted by an admin meanwhile
                return Ok(());
            }
            Err(e) => {
                self.quarantine(id, &e.to_string());
                return Ok(());
            }
        };
        let (mut file, eight_bit) = match self.open_verified(id, &envelope) {
            Ok(opened) => opened,
            Err(why) => {
                self.quarantine(id, &why);
                return Ok(());
            }
        };
        let mut pending: Vec<(usize, String)> = envelope
            .pending()
            .map(|(i, r)| (i, r.address.clone()))
            .collect();
        if pending.is_empty() {
            self.settle(id, None, envelope.any_failed());
            return Ok(());
        }
        let mail_from = self
            .envelope_from
            .clone()
            .unwrap_or_else(|| envelope.sender.clone());
        let mut outcomes: Vec<(usize, String, Outcome)> = Vec::with_capacity(pending.len());
        // A 452 "too many recipients" after some were accepted means: send the
        // rest in a following transaction (RFC 5321 §4.5.3.1.10).
        while !pending.is_empty() {
            let rcpts: Vec<String> = pending.iter().map(|(_, a)| a.clone()).collect();
            let message = Outgoing {
                mail_from: &mail_from,
                recipients: &rcpts,
                size: envelope.size,
                eight_bit,
            };
            file.rewind().map_err(|e| {
                SessionError::Local(format!("cannot rewind the spooled message: {e}"))
            })?;
            let result = session.transaction(&message, &mut BufReader::new(&mut file))?;
            let any_delivered = result.per_recipient.iter().any(|r| r.code.is_positive());
            let mut again = Vec::new();
            for ((index, address), reply) in pending.into_iter().zip(result.per_recipient.iter()) {
                if any_delivered && reply.code.0 == 452 {
                    again.push((index, address));
                } else {
                    outcomes.push((index, address, outcome::of_reply(reply)));
                }
            }
            pending = again;
        }
        let tenant_refused = outcomes.iter().any(|(_, _, o)| {
            matches!(
                o,
                Outcome::Retry {
                    scope: RetryScope::Tenant,
                    ..
                }
            )
        });
        self.record(id, &envelope, peer, outcomes, None);
        if tenant_refused {
            self.back_off_tenant();
        }
        Ok(())
    }

    /// Opens the message file and checks it against the SHA-256 in its
    /// envelope; the same pass notes whether it has 8-bit content.
    fn open_verified(
        &self,
        id: &MessageId,
        envelope: &Envelope,
    ) -> Result<(std::fs::File, bool), String> {
        let mut file = self
            .spool
            .open_message(self.name.as_str(), id)
            .map_err(|e| format!("message file unreadable: {e}"))?;
        let scan =
            spool::scan_message(&mut file).map_err(|e| format!("message file unreadable: {e}"))?;
        if scan.sha256 != envelope.sha256 {
            return Err(format!(
                "message file checksum mismatch (SHA-256 {}, envelope says {})",
                scan.sha256, envelope.sha256
            ));
        }
        Ok((file, scan.eight_bit))
    }

    /// Defers every pending recipient of each message after a session failure.
    fn defer_all(&mut self, ids: &[MessageId], relay: &str, reason: &str, scope: RetryScope) {
        if scope == RetryScope::Tenant {
            self.back_off_tenant();
        }
        for id in ids {
            if !self.write_unrecorded(id) {
                continue;
            }
            let envelope = match self.spool.load_envelope(self.name.as_str(), id) {
                Ok(env) => env,
                Err(e) if e.is_not_found() => {
                    self.queue.remove(id);
                    continue;
                }
                Err(e) => {
                    self.quarantine(id, &e.to_string());
                    continue;
                }
            };
            let outcomes = envelope
                .pending()
                .map(|(i, r)| {
                    let retry = Outcome::Retry {
                        scope,
                        reason: reason.to_string(),
                    };
                    (i, r.address.clone(), retry)
                })
                .collect();
            self.record(id, &envelope, relay, outcomes, Some(reason.to_string()));
        }
    }

    /// The relay itself is failing: no session before the backoff has passed.
    fn back_off_tenant(&mut self) {
        let failures = self.tenant_backoff.map_or(0, |(n, _)| n) + 1;
        let until = spool::unix_millis() + self.backoff(failures).as_millis() as u64;
        self.tenant_backoff = Some((failures, until));
    }

    /// Logs one line per recipient, appends the attempt durably, and updates the index.
    fn record(
        &mut self,
        id: &MessageId,
        envelope: &Envelope,
        relay: &str,
        outcomes: Vec<(usize, String, Outcome)>,
        error: Option<String>,
    ) {
        let now = spool::unix_millis();
        let delay = now.saturating_sub(envelope.queued_at_ms) as f64 / 1000.0;
        let mut results = Vec::with_capacity(outcomes.len());
        let mut still_pending = 0;
        let mut last_problem = error;
        for (rcpt, address, outcome) in outcomes {
            log::info!(
                "{id} tenant={} to=<{address}> relay={relay} delay={delay:.1}s status={} ({})",
                self.name,
                outcome.status(),
                outcome.reason()
            );
            let status = match &outcome {
                Outcome::Delivered { .. } => RcptStatus::Sent,
                Outcome::Retry { .. } => {
                    still_pending += 1;
                    RcptStatus::Pending
                }
                Outcome::Bounce { .. } => RcptStatus::Failed,
            };
            if status != RcptStatus::Sent {
                last_problem = Some(outcome.reason().to_string());
            }
            results.push(RcptResult {
                rcpt,
                status,
                reply: outcome.reason().to_string(),
            });
        }
        let untouched_pending =
            envelope.pending().count() - results.len().min(envelope.pending().count());
        still_pending += untouched_pending;
        let next_attempt_ms = (still_pending > 0)
            .then(|| now + self.backoff(envelope.attempts + 1).as_millis() as u64);
        let record = Record::Attempt {
            at_ms: now,
            results,
            next_attempt_ms,
            error: last_problem,
        };
        let tenant = self.name.as_str().to_string();
        if let Err(e) = self.spool.append(&tenant, id, &record) {
            // Keep the result in memory and write it before this message is
            // touched again: re-sending what the relay already took (the disk
            // is full, say) would deliver it once per retry.
            log::error!("{id} tenant={tenant}: cannot record the delivery result, will retry: {e}");
            self.unrecorded.insert(id.clone(), record);
            self.queue
                .insert(id.clone(), now + self.retry_min.as_millis() as u64);
            return;
        }
        let failed = envelope.any_failed() || record_has_failure(&record);
        self.settle(id, next_attempt_ms, failed);
    }

    /// Puts a message back in the index at its next attempt, or, with nothing
    /// pending, removes it (delivered) or leaves it on disk as failed.
    fn settle(&mut self, id: &MessageId, next_attempt_ms: Option<u64>, failed: bool) {
        if let Some(at) = next_attempt_ms {
            self.queue.insert(id.clone(), at);
            return;
        }
        self.queue.remove(id);
        let tenant = self.name.as_str().to_string();
        if failed {
            log::warn!("{id} tenant={tenant}: kept in the queue as failed");
        } else if let Err(e) = self.spool.remove(&tenant, id) {
            log::error!(
                "{id} tenant={tenant}: delivered, but cannot remove it from the spool: {e}"
            );
        }
    }

    /// Writes a result that could not be written before. False if it still cannot.
    fn write_unrecorded(&mut self, id: &MessageId) -> bool {
        let Some(record) = self.unrecorded.get(id) else {
            return true;
        };
        if let Err(e) = self.spool.append(self.name.as_str(), id, record) {
            log::error!(
                "{id} tenant={}: still cannot record the delivery result: {e}",
                self.name
            );
            let retry = spool::unix_millis() + self.retry_min.as_millis() as u64;
            self.queue.insert(id.clone(), retry);
            return false;
        }
        self.unrecorded.remove(id);
        true
    }

    /// Exponential backoff between retry_min and retry_max.
    fn backoff(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(20);
        self.retry_min
            .saturating_mul(1u32 << exponent)
            .min(self.retry_max)
    }

    fn quarantine(&mut self, id: &MessageId, reason: &str) {
        self.queue.remove(id);
        log::error!("{id} tenant={}: quarantined: {reason}", self.name);
        if let Err(e) = self.spool.quarantine(self.name.as_str(), id, reason) {
            log::error!("{id} tenant={}: cannot quarantine: {e}", self.name);
        }
    }
}

fn record_has_failure(record: &Record) -> bool {
    matches!(record, Record::Attempt { results, .. } if results.iter().any(|r| r.status == RcptStatus::Failed))
}
