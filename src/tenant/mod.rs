//! One OS thread per tenant. `TenantHandle` is what the dispatcher holds:
//! it never blocks on the tenant. The worker (worker.rs) owns the tenant's
//! queue index and runs blocking SMTP sessions (delivery.rs) with the
//! tenant's own timeouts and pacing (pacing.rs), so a slow or dead relay
//! stalls only this thread. A worker that panics is restarted from the spool.

mod delivery;
mod pacing;
mod set;
mod worker;

pub use set::TenantSet;

use crate::config::{DaemonConfig, RateLimit, TenantConfig, TenantName};
use crate::smtp::client::ClientSettings;
use crate::spool::{MessageId, Spool};
use crossbeam_channel::{bounded, Sender, TrySendError};

/// Called once from the tenant's thread as it ends.
pub type OnFinish = Box<dyn FnOnce(TenantName) + Send>;
use pacing::Backoff;
use rustls::RootCertStore;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use worker::TenantWorker;

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
    Hold(Target),
    Release(Target),
    Delete(Target),
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
}

/// Everything a worker needs that comes from the configuration.
#[derive(Clone)]
struct Settings {
    name: TenantName,
    /// Err when the tenant's TLS settings are unusable: mail waits, with this reason.
    client: Result<ClientSettings, String>,
    envelope_from: Option<String>,
    messages_per_session: usize,
    backoff: Backoff,
    max_queue_lifetime: Duration,
    rate_limit: Option<RateLimit>,
    postmaster: Option<String>,
    hostname: String,
    /// `auth = xoauth2`: where tokens come from (Err: why they cannot).
    oauth: Option<Result<crate::oauth::Endpoints, String>>,
    ca_file: Option<std::path::PathBuf>,
    /// `archive = yes`: where and for whom to journal sent mail.
    archive: Option<crate::archive::Policy>,
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
    /// Starts the tenant's thread; `on_finish` runs when it ends.
    pub fn spawn(
        tenant: &TenantConfig,
        daemon: &DaemonConfig,
        spool: Spool,
        roots: &Arc<RootCertStore>,
        on_finish: OnFinish,
    ) -> io::Result<TenantHandle> {
        let client = ClientSettings::for_tenant(tenant, daemon, roots);
        if let Err(e) = &client {
            log::error!(
                "tenant {}: {e}; its mail stays queued until the configuration is fixed",
                tenant.name
            );
        }
        let settings = Settings {
            name: tenant.name.clone(),
            client: client.map_err(|e| e.to_string()),
            envelope_from: tenant.envelope_from.clone(),
            messages_per_session: tenant.messages_per_session.max(1) as usize,
            backoff: Backoff {
                min: daemon.retry_min,
                max: daemon.retry_max,
            },
            max_queue_lifetime: daemon.max_queue_lifetime,
            rate_limit: tenant.rate_limit,
            postmaster: daemon.postmaster.clone(),
            hostname: daemon.hostname.clone(),
            oauth: (tenant.auth == crate::config::AuthMode::XOAuth2)
                .then(|| crate::oauth::Endpoints::for_tenant(tenant).map_err(|e| e.to_string())),
            ca_file: tenant.ca_file.clone(),
            archive: tenant.archive.then(|| crate::archive::Policy {
                root: daemon.archive_dir.clone(),
                users: match &tenant.archive_users {
                    crate::config::ArchiveUsers::All => None,
                    crate::config::ArchiveUsers::List(users) => Some(users.clone()),
                },
                group: tenant.archive_group.clone(),
                hostname: daemon.hostname.clone(),
            }),
        };
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
        let thread = std::thread::Builder::new()
            .name(format!("tenant:{}", tenant.name))
            .stack_size(STACK_SIZE)
            .spawn(move || {
                let name = settings.name.clone();
                loop {
                    // Each (re)start rebuilds the queue index from the spool.
                    thread_rescan.store(true, Ordering::Release);
                    let worker = TenantWorker::new(
                        settings.clone(),
                        spool.clone(),
                        receiver.clone(),
                        Arc::clone(&thread_rescan),
                        Arc::clone(&thread_stop),
                        Arc::clone(&thread_status),
                    );
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
