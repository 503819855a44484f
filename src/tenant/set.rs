//! The running tenants as a whole: start them, route jobs, apply a reloaded
//! configuration (added, removed, changed tenants) without a restart, and
//! stop them all within a grace period. A changed tenant's new thread starts
//! only after the old one has finished, so one message is never in two
//! sessions at once.

use super::slots::{self, SessionSlots};
use super::{Job, TenantHandle};
use crate::base::names::TenantName;
use crate::config::{Config, DaemonConfig, TenantConfig};
use crate::spool::Spool;
use crossbeam_channel::{unbounded, Receiver, Sender};
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Called from a tenant thread when it ends (after sending on the channel),
/// so the dispatcher's loop wakes up to reap it.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

pub struct TenantSet {
    daemon: DaemonConfig,
    spool: Spool,
    roots: Arc<RootCertStore>,
    /// The session budget all tenants share.
    slots: Arc<SessionSlots>,
    running: BTreeMap<String, (TenantConfig, TenantHandle)>,
    /// Stopped, waiting for their thread to finish.
    stopping: BTreeMap<String, TenantHandle>,
    /// To start once the old thread of the same name has finished.
    waiting: BTreeMap<String, TenantConfig>,
    finished_tx: Sender<TenantName>,
    finished_rx: Receiver<TenantName>,
    wake: Wake,
}

impl TenantSet {
    pub fn new(
        daemon: &DaemonConfig,
        spool: Spool,
        roots: Arc<RootCertStore>,
        wake: Wake,
    ) -> TenantSet {
        let (finished_tx, finished_rx) = unbounded();
        TenantSet {
            daemon: daemon.clone(),
            spool,
            roots,
            slots: SessionSlots::new(session_limits(daemon)),
            running: BTreeMap::new(),
            stopping: BTreeMap::new(),
            waiting: BTreeMap::new(),
            finished_tx,
            finished_rx,
            wake,
        }
    }

    /// Tenants running or about to (a changed tenant between its old and new thread).
    pub fn len(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    pub fn start_all(&mut self, tenants: &[TenantConfig]) {
        for tenant in tenants {
            self.start(tenant.clone(), None);
        }
    }

    /// `earlier`: the status of the tenant's previous thread, whose counters carry on.
    fn start(&mut self, tenant: TenantConfig, earlier: Option<super::TenantStatus>) {
        if !tenant.tls_verify {
            log::warn!(
                "tenant {}: tls_verify = no: the relay's certificate is not checked",
                tenant.name
            );
        }
        let notify = self.finished_tx.clone();
        let wake = Arc::clone(&self.wake);
        let on_finish = move |name: TenantName| {
            let _ = notify.send(name);
            wake();
        };
        match TenantHandle::spawn(
            &tenant,
            &self.daemon,
            self.spool.clone(),
            &self.roots,
            &self.slots,
            Box::new(on_finish),
            earlier,
        ) {
            Ok(handle) => {
                self.running
                    .insert(tenant.name.as_str().to_string(), (tenant, handle));
            }
            Err(e) => log::error!(
                "tenant {}: cannot start its thread: {e}; its mail stays queued",
                tenant.name
            ),
        }
    }

    /// Never blocks: a full channel becomes a rescan; an unknown tenant is logged.
    pub fn route(&self, tenant: &str, job: Job) {
        match self.running.get(tenant) {
            Some((_, handle)) => handle.send(job),
            None => log::warn!(
                "pickup: mail for tenant {tenant:?}, which is not configured; it stays queued"
            ),
        }
    }

    pub fn is_running(&self, tenant: &str) -> bool {
        self.running.contains_key(tenant)
    }

    /// The message `tenant` is sending right now, if any.
    pub fn sending(&self, tenant: &str) -> Option<crate::base::names::MessageId> {
        self.running
            .get(tenant)
            .and_then(|(_, handle)| handle.status().sending)
    }

    pub fn route_all(&self, job: impl Fn() -> Job) {
        for (_, handle) in self.running.values() {
            handle.send(job());
        }
    }

    /// What `pbxmail status` shows, tenant by tenant.
    pub fn status(&self) -> Vec<super::TenantStatus> {
        self.running
            .values()
            .map(|(_, handle)| handle.status())
            .collect()
    }

    /// Applies a new, valid configuration.
    pub fn reload(&mut self, config: &Config) {
        let daemon_changed = !same_for_tenants(&self.daemon, &config.daemon);
        if config.daemon.spool_dir != self.daemon.spool_dir {
            log::warn!("reload: spool_dir changes take effect after a restart");
        }
        self.daemon = DaemonConfig {
            spool_dir: self.daemon.spool_dir.clone(),
            ..config.daemon.clone()
        };
        log::set_max_level(config.daemon.log_level);
        // Sessions open stay open; new ones follow the new limits.
        self.slots.set_limits(session_limits(&self.daemon));

        let wanted: BTreeMap<String, &TenantConfig> = config
            .tenants
            .iter()
            .map(|t| (t.name.as_str().to_string(), t))
            .collect();
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            let keep = wanted.get(&name).is_some_and(|new| {
                !daemon_changed
                    && self
                        .running
                        .get(&name)
                        .is_some_and(|(old, _)| same_tenant(old, new))
            });
            if keep {
                continue;
            }
            if let Some((_, mut handle)) = self.running.remove(&name) {
                if wanted.contains_key(&name) {
                    log::info!("reload: stopping tenant {name}");
                } else {
                    // No disk I/O here (this is the dispatcher): no count.
                    log::warn!(
                        "reload: tenant {name} removed; any mail it has queued stays in the spool, \
                         unsent, until [tenant:{name}] is configured again"
                    );
                }
                handle.stop();
                self.stopping.insert(name.clone(), handle);
            }
        }
        for (name, tenant) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            if self.stopping.contains_key(&name) {
                self.waiting.insert(name, tenant.clone());
            } else {
                log::info!("reload: starting tenant {name}");
                self.start(tenant.clone(), None);
            }
        }
        self.reap();
    }

    /// Joins tenants whose threads have finished and starts their successors.
    pub fn reap(&mut self) {
        while let Ok(name) = self.finished_rx.try_recv() {
            let name = name.as_str().to_string();
            let earlier = self.stopping.remove(&name).map(|mut handle| {
                handle.join();
                handle.status()
            });
            if let Some(tenant) = self.waiting.remove(&name) {
                log::info!("reload: starting tenant {name} with its new settings");
                self.start(tenant, earlier);
            }
        }
    }

    /// Stops every tenant, waiting at most `grace` for sessions in progress.
    pub fn stop_all(&mut self, grace: Duration) {
        self.waiting.clear();
        for (name, (_, mut handle)) in std::mem::take(&mut self.running) {
            handle.stop();
            self.stopping.insert(name, handle);
        }
        // A grace past what an Instant holds waits as long as it takes.
        let deadline = Instant::now().checked_add(grace);
        while !self.stopping.is_empty() {
            let left = deadline.map_or(grace, |d| d.saturating_duration_since(Instant::now()));
            match self.finished_rx.recv_timeout(left) {
                Ok(name) => {
                    if let Some(mut handle) = self.stopping.remove(name.as_str()) {
                        handle.join();
                    }
                }
                Err(_) => break,
            }
        }
        for (name, handle) in std::mem::take(&mut self.stopping) {
            // Still in a blocking session: leave it; its message stays queued
            // and is retried at the next start.
            log::warn!("tenant {name}: still busy at exit; its current message stays queued");
            std::mem::forget(handle);
        }
    }
}

/// A tenant whose settings are unchanged (its place in the file may move).
fn same_tenant(old: &TenantConfig, new: &TenantConfig) -> bool {
    TenantConfig {
        line: old.line,
        ..new.clone()
    } == *old
}

/// The daemon settings every tenant worker copies; a change restarts them all.
/// The configured session limits, lowered to fit the open file limit.
fn session_limits(daemon: &DaemonConfig) -> crate::config::SessionLimits {
    slots::fit_to_open_files(
        daemon.sessions,
        slots::open_file_limit(),
        daemon.listen_limits.max_connections,
    )
}

fn same_for_tenants(old: &DaemonConfig, new: &DaemonConfig) -> bool {
    old.hostname == new.hostname
        && old.retry_min == new.retry_min
        && old.retry_max == new.retry_max
        && old.max_queue_lifetime == new.max_queue_lifetime
        && old.postmaster == new.postmaster
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_all_with_the_largest_grace_does_not_overflow() {
        let config = crate::config::parse(
            std::path::Path::new("test.ini"),
            "[tenant:acme]\ndomains = acme.example\nrelay = 127.0.0.1:1\ntls = none\n",
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("pbxmail-set-grace-{}", std::process::id()));
        let mut set = TenantSet::new(
            &config.daemon,
            Spool::new(&dir),
            Arc::new(RootCertStore::empty()),
            Arc::new(|| {}),
        );
        // Nothing running: it returns at once rather than panic on Instant + MAX.
        set.stop_all(Duration::MAX);
        assert_eq!(set.len(), 0);
    }
}
