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
//! the spool.

mod admin;
mod delivery;
mod delivery_log;
mod ledger;
mod pacing;
mod queue;
mod set;
mod settings;
mod settle;
mod smtp_delivery;
#[cfg(test)]
mod tests;
mod tokens;
mod worker;

pub use admin::{Action, AdminJob, AdminReport, Applied};
pub use set::TenantSet;
pub use settings::client_settings;
pub use tokens::Tokens;

use crate::base::names::MessageId;
use crate::base::names::TenantName;
use crate::config::{DaemonConfig, TenantConfig};
use crate::spool::Spool;
use crossbeam_channel::{bounded, Sender, TrySendError};

/// Called once from the tenant's thread as it ends.
pub type OnFinish = Box<dyn FnOnce(TenantName) + Send>;
use crate::base::clock::Clock;
use ledger::Ledger;
use rustls::RootCertStore;
use settings::Settings;
use smtp_delivery::SmtpDelivery;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use worker::{Shared, TenantWorker};

/// Reserved, not used: after STARTTLS and implicit-TLS sessions with AUTH a
/// tenant thread had touched 40 KiB of it (release build, /proc/PID/smaps),
/// so this leaves ample room for deeper paths (OAuth over HTTPS, bounces).
const STACK_SIZE: usize = 512 * 1024;
/// Hints waiting for a busy worker; past this the worker rescans its folder instead.
const JOB_CAPACITY: usize = 1024;
/// Pause before restarting a worker that panicked, so a panic at start cannot spin.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

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
    name: TenantName,
    status: Arc<Mutex<TenantStatus>>,
    jobs: Option<Sender<Job>>,
    rescan: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TenantHandle {
    /// Starts the tenant's thread; `on_finish` runs when it ends. The thread
    /// builds the tenant's settings (it reads ca_file and secret files), so
    /// the caller, the dispatcher, does no disk I/O here.
    pub fn spawn(
        tenant: &TenantConfig,
        daemon: &DaemonConfig,
        spool: Spool,
        roots: &Arc<RootCertStore>,
        on_finish: OnFinish,
    ) -> io::Result<TenantHandle> {
        let status = Arc::new(Mutex::new(TenantStatus {
            name: tenant.name.as_str().to_string(),
            relay: tenant.relay.to_string(),
            ..TenantStatus::default()
        }));
        let thread_status = Arc::clone(&status);
        let (jobs, receiver) = bounded(JOB_CAPACITY);
        let rescan = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_rescan, thread_stop) = (Arc::clone(&rescan), Arc::clone(&stop));
        let (config, daemon, roots) = (tenant.clone(), daemon.clone(), Arc::clone(roots));
        let thread = std::thread::Builder::new()
            .name(format!("tenant:{}", tenant.name))
            .stack_size(STACK_SIZE)
            .spawn(move || {
                let settings = Settings::from_config(&config, &daemon, &roots);
                let name = settings.name.clone();
                loop {
                    // Each (re)start rebuilds the queue index from the spool.
                    thread_rescan.store(true, Ordering::Release);
                    // Counters survive a restart after a panic.
                    let counters = thread_status
                        .lock()
                        .map(|s| s.clone())
                        .unwrap_or_default();
                    let ledger = Ledger::new(
                        name.clone(),
                        settings.policy.clone(),
                        settings.pacing,
                        spool.clone(),
                        Clock::system(),
                        counters,
                    );
                    let delivery = SmtpDelivery::new(name.clone(), settings.smtp.clone());
                    let shared = Shared {
                        jobs: receiver.clone(),
                        rescan: Arc::clone(&thread_rescan),
                        stop: Arc::clone(&thread_stop),
                        status: Arc::clone(&thread_status),
                    };
                    let worker = TenantWorker::new(ledger, delivery, shared);
                    match catch_unwind(AssertUnwindSafe(|| worker.run())) {
                        Ok(()) => break,
                        Err(panic) => {
                            let what = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_default();
                            log::error!("tenant {name}: worker panicked ({what}); restarting it from the spool");
                            if thread_stop.load(Ordering::Acquire) {
                                break;
                            }
                            std::thread::sleep(RESTART_PAUSE);
                        }
                    }
                }
                on_finish(name);
            })?;
        Ok(TenantHandle {
            name: tenant.name.clone(),
            status,
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

    /// The tenant's last published state; never waits on the worker for long
    /// (it holds the lock only to copy a small struct).
    pub fn status(&self) -> TenantStatus {
        match self.status.lock() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Asks the worker to stop after the message it is sending.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.jobs = None; // disconnecting wakes a worker waiting for jobs
    }

    /// Waits for the thread; call after `stop` and once `on_finish` reported it.
    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("tenant {}: worker thread ended abnormally", self.name);
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
