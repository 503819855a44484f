//! One OS thread per tenant. `TenantHandle` is what the dispatcher holds:
//! it never blocks on the tenant, and builds nothing from disk for it: the
//! tenant's thread builds its own settings (settings.rs). On that thread the
//! worker (worker.rs) drives the pure queue (queue.rs, kept in step with the
//! spool by ledger.rs, which settles finished mail in settle.rs, applies
//! admin commands in admin.rs and logs results in delivery_log.rs) and a
//! `Delivery` (delivery.rs; SMTP in smtp_delivery.rs, OAuth tokens in
//! tokens.rs) with the tenant's own timeouts and pacing (pacing.rs),
//! so a slow or dead relay stalls only this thread. The judge (outcome.rs)
//! decides what every failure means. A worker that panics is restarted from
//! the spool. A tenant with nothing waiting has no thread: it retires after
//! an idle while and the next job starts one; what must survive (counters,
//! relay backoff, rate bucket, token source) stays in the handle.

mod admin;
mod delivery;
mod delivery_log;
mod ledger;
mod pacing;
mod queue;
mod set;
mod settings;
mod settle;
mod slots;
mod smtp_delivery;
#[cfg(test)]
mod tests;
mod tokens;
mod worker;

pub use admin::{Action, AdminJob, AdminReport, Applied};
pub use set::TenantSet;
pub use settings::client_settings;
pub use slots::SessionSlots;
pub use tokens::Tokens;

use crate::base::names::MessageId;
use crate::base::names::TenantName;
use crate::config::{DaemonConfig, TenantConfig};
use crate::spool::Spool;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

/// Called once when the tenant has stopped: from its thread as it ends, or
/// from `stop` when no thread ran.
pub type OnFinish = Box<dyn FnOnce(TenantName) + Send>;
use crate::base::clock::Clock;
use ledger::Ledger;
use queue::Carry;
use rustls::RootCertStore;
use settings::Settings;
use smtp_delivery::SmtpDelivery;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use worker::{End, Shared, TenantWorker};

/// Reserved, not used: after STARTTLS and implicit-TLS sessions with AUTH a
/// tenant thread had touched 40 KiB of it (release build, /proc/PID/smaps),
/// so this leaves ample room for deeper paths (OAuth over HTTPS, bounces).
const STACK_SIZE: usize = 512 * 1024;
/// Hints waiting for a busy worker; past this the worker rescans its folder instead.
const JOB_CAPACITY: usize = 1024;
/// Pause before restarting a worker that panicked, so a panic at start cannot spin.
const RESTART_PAUSE: Duration = Duration::from_secs(1);
/// A tenant with nothing waiting keeps its thread this long for more mail.
const IDLE: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub enum Job {
    /// A message was spooled for this tenant (a hint; the spool is the truth).
    Queued(MessageId),
    /// Retry everything now, backoff or not (`pbxmail flush`).
    Flush,
    /// Hold, release or delete, reported back once durable (admin.rs).
    Admin(AdminJob),
}

/// What an admin command acts on.
#[derive(Debug, Clone)]
pub enum Target {
    All,
    Ids(Vec<MessageId>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantState {
    #[default]
    Idle,
    Sending,
    Backoff,
}

/// One tenant as `pbxmail status` shows it (the interface's JSON shape).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TenantStatus {
    pub name: String,
    pub relay: String,
    pub state: TenantState,
    pub queued: usize,
    pub deferred: usize,
    pub held: usize,
    pub failed: usize,
    pub delivered: u64,
    pub bounced: u64,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    /// The message being sent right now: a hold or delete of it applies
    /// only once this attempt ends, and the control side can say so. Not
    /// part of the status JSON.
    #[serde(skip)]
    pub sending: Option<MessageId>,
}

pub struct TenantHandle {
    home: Arc<Home>,
    jobs: Option<Sender<Job>>,
    /// The tenant's latest thread, if one was started; a retired one has
    /// ended or is about to.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What outlives the tenant's threads: its settings, the state `status`
/// shows, the carried queue state and the delivery with its token source.
struct Home {
    name: TenantName,
    config: TenantConfig,
    daemon: DaemonConfig,
    spool: Spool,
    roots: Arc<RootCertStore>,
    slots: Arc<SessionSlots>,
    status: Arc<Mutex<TenantStatus>>,
    /// Held here too, so jobs sent while no thread runs wait for the next one.
    jobs: Receiver<Job>,
    rescan: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// A thread runs (or is being started, or `on_finish` was claimed by
    /// `stop`). Whoever turns it from false to true owns the tenant's work.
    running: AtomicBool,
    kept: Mutex<Kept>,
    on_finish: Mutex<Option<OnFinish>>,
}

/// Built by the first thread (it reads ca_file and secret files), then
/// handed from one thread to the next.
#[derive(Default)]
struct Kept {
    settings: Option<Settings>,
    delivery: Option<SmtpDelivery>,
    carry: Carry,
}

impl TenantHandle {
    /// Starts the tenant's thread for its first rescan; it retires once it
    /// has been idle a while with nothing waiting, and `send` starts it again.
    /// `on_finish` runs once the tenant has stopped. The thread builds the
    /// tenant's settings (it reads ca_file and secret files), so the caller,
    /// the dispatcher, does no disk I/O here. `earlier`: the status of the
    /// tenant's previous handle (a reload that changed it), whose counters
    /// carry on.
    pub fn spawn(
        tenant: &TenantConfig,
        daemon: &DaemonConfig,
        spool: Spool,
        roots: &Arc<RootCertStore>,
        slots: &Arc<SessionSlots>,
        on_finish: OnFinish,
        earlier: Option<TenantStatus>,
    ) -> io::Result<TenantHandle> {
        let earlier = earlier.unwrap_or_default();
        let status = Arc::new(Mutex::new(TenantStatus {
            name: tenant.name.as_str().to_string(),
            relay: tenant.relay.to_string(),
            delivered: earlier.delivered,
            bounced: earlier.bounced,
            last_success: earlier.last_success,
            last_error: earlier.last_error,
            ..TenantStatus::default()
        }));
        let (jobs, receiver) = bounded(JOB_CAPACITY);
        let home = Arc::new(Home {
            name: tenant.name.clone(),
            config: tenant.clone(),
            daemon: daemon.clone(),
            spool,
            roots: Arc::clone(roots),
            slots: Arc::clone(slots),
            status,
            jobs: receiver,
            rescan: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
            running: AtomicBool::new(true),
            kept: Mutex::new(Kept::default()),
            on_finish: Mutex::new(Some(on_finish)),
        });
        let thread = start_thread(&home)?;
        Ok(TenantHandle {
            home,
            jobs: Some(jobs),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Never blocks: a full channel turns into a rescan request, and a
    /// tenant with no thread gets one.
    pub fn send(&self, job: Job) {
        let Some(jobs) = &self.jobs else { return };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.home.rescan.store(true, Ordering::SeqCst),
            Err(TrySendError::Disconnected(_)) => {
                log::error!(
                    "tenant {}: worker thread is gone; mail stays queued",
                    self.home.name
                );
                return;
            }
        }
        self.wake();
    }

    /// Starts a thread unless one runs. The job is in the channel before
    /// this looks, and a retiring thread looks at the channel after it
    /// clears `running`, so one of the two always takes it.
    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self
            .home
            .running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        // Each start rebuilds the queue index from the spool, the truth.
        self.home.rescan.store(true, Ordering::SeqCst);
        match start_thread(&self.home) {
            // The thread before it, if any, has retired: let it end alone.
            Ok(thread) => *self.thread_slot() = Some(thread),
            Err(e) => {
                self.home.running.store(false, Ordering::SeqCst);
                log::error!(
                    "tenant {}: cannot start its thread: {e}; its mail stays queued \
                     until the next job for it",
                    self.home.name
                );
            }
        }
    }

    fn thread_slot(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        match self.thread.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The tenant's last published state; never waits on the worker for long
    /// (it holds the lock only to copy a small struct).
    pub fn status(&self) -> TenantStatus {
        match self.home.status.lock() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Asks the worker to stop after the message it is sending; a tenant
    /// with no thread has stopped already and reports it now.
    pub fn stop(&mut self) {
        self.home.stop.store(true, Ordering::SeqCst);
        self.jobs = None; // disconnecting wakes a worker waiting for jobs
        if self
            .home
            .running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.home.finish();
        }
    }

    /// Waits for the thread; call after `stop` and once `on_finish` reported it.
    pub fn join(&mut self) {
        let thread = self.thread_slot().take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                log::error!("tenant {}: worker thread ended abnormally", self.home.name);
            }
        }
    }
}

impl Home {
    /// Runs `on_finish`, once.
    fn finish(&self) {
        let taken = match self.on_finish.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(on_finish) = taken {
            on_finish(self.name.clone());
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        match self.kept.lock() {
            Ok(kept) => kept,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// After a worker retired: clear `running`, then look again for what
    /// may have come meanwhile. True if this thread must go on working.
    fn retire(&self) -> bool {
        self.running.store(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let pending = !self.jobs.is_empty()
            || self.rescan.load(Ordering::SeqCst)
            || self.stop.load(Ordering::SeqCst);
        // Losing the race means a sender (or `stop`) took over.
        pending
            && self
                .running
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// The tenant's thread: workers, one after another (after a panic, or a
    /// job that came as the last one retired), until it retires or stops.
    fn run(&self) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                self.finish();
                break;
            }
            let (settings, delivery, carry) = {
                let mut kept = self.kept();
                let carry = std::mem::take(&mut kept.carry);
                (kept.settings.take(), kept.delivery.take(), carry)
            };
            let settings = settings
                .unwrap_or_else(|| Settings::from_config(&self.config, &self.daemon, &self.roots));
            let name = settings.name.clone();
            // Each (re)start rebuilds the queue index from the spool.
            self.rescan.store(true, Ordering::SeqCst);
            // Counters survive a restart, as do the relay's backoff and
            // the rate bucket.
            let counters = match self.status.lock() {
                Ok(s) => s.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            let mut ledger = Ledger::new(
                name.clone(),
                settings.policy.clone(),
                settings.pacing,
                self.spool.clone(),
                Clock::system(),
                counters,
            );
            ledger.queue_mut().restore(carry);
            let delivery =
                delivery.unwrap_or_else(|| SmtpDelivery::new(name.clone(), settings.smtp.clone()));
            let shared = Shared {
                jobs: self.jobs.clone(),
                rescan: Arc::clone(&self.rescan),
                stop: Arc::clone(&self.stop),
                status: Arc::clone(&self.status),
                idle: idle_time(),
                slots: Arc::clone(&self.slots),
                // Host names are case-blind: one relay, one count.
                relay: self.config.relay.to_string().to_ascii_lowercase(),
            };
            let mut worker = TenantWorker::new(ledger, delivery, shared);
            match catch_unwind(AssertUnwindSafe(|| worker.run())) {
                Ok(End::Stop) => {
                    self.finish();
                    break;
                }
                Ok(End::Retire) => {
                    // Everything is put back before `running` clears: the
                    // next thread may start the moment it does.
                    let carry = worker.carry();
                    let delivery = worker.into_delivery();
                    *self.kept() = Kept {
                        settings: Some(settings),
                        delivery: Some(delivery),
                        carry,
                    };
                    if !self.retire() {
                        log::debug!("tenant {name}: idle; its thread retires");
                        break;
                    }
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    log::error!(
                        "tenant {name}: worker panicked ({what}); restarting it from the spool"
                    );
                    self.kept().settings = Some(settings);
                    if !self.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(RESTART_PAUSE);
                    }
                }
            }
        }
    }
}

fn start_thread(home: &Arc<Home>) -> io::Result<JoinHandle<()>> {
    let home = Arc::clone(home);
    std::thread::Builder::new()
        .name(format!("tenant:{}", home.name))
        .stack_size(STACK_SIZE)
        .spawn(move || home.run())
}

/// How long a tenant with nothing to send keeps its thread. Debug builds
/// take `PBXMAIL_DEBUG_IDLE_MS`, so tests need not wait a minute.
fn idle_time() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("PBXMAIL_DEBUG_IDLE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Duration::from_millis(ms);
    }
    IDLE
}

impl Drop for TenantHandle {
    fn drop(&mut self) {
        self.stop();
        self.join();
    }
}
