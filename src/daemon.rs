//! Start-up and shut-down order of the daemon: spool recovery, one thread per
//! tenant, the dispatcher loop, then an orderly stop that waits a bounded
//! time for sessions in progress. The spool makes an unfinished stop safe.

use crate::config::{Config, TenantName};
use crate::dispatch::Dispatcher;
use crate::spool::Spool;
use crate::tenant::TenantHandle;
use crate::tls;
use crossbeam_channel::unbounded;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long SIGTERM waits for sessions in progress before exiting anyway.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let spool = Spool::new(&config.daemon.spool_dir);
    spool.create_layout()?;
    let removed = spool.remove_abandoned()?;
    if removed > 0 {
        log::info!("spool: removed {removed} abandoned partial submissions");
    }

    let roots = tls::system_roots();
    let (finished_tx, finished_rx) = unbounded::<TenantName>();
    let mut tenants = BTreeMap::new();
    for tenant in &config.tenants {
        if !tenant.tls_verify {
            log::warn!(
                "tenant {}: tls_verify = no: the relay's certificate is not checked",
                tenant.name
            );
        }
        let handle = TenantHandle::spawn(
            tenant,
            &config.daemon,
            spool.clone(),
            &roots,
            finished_tx.clone(),
        )?;
        tenants.insert(tenant.name.as_str().to_string(), handle);
    }
    drop(finished_tx);
    for orphan in spool
        .tenants()?
        .iter()
        .filter(|t| !tenants.contains_key(*t))
    {
        let count = spool.message_ids(orphan).map(|ids| ids.len()).unwrap_or(0);
        if count > 0 {
            log::warn!("spool holds {count} messages for tenant {orphan:?}, which is not configured; they stay queued");
        }
    }

    let dispatcher = Dispatcher::new(&spool, tenants)?;
    log::info!(
        "pbxmail {} started: {} tenants, spool {}",
        env!("CARGO_PKG_VERSION"),
        config.tenants.len(),
        spool.root().display()
    );
    let (_exit, mut tenants) = dispatcher.run()?;

    log::info!("stopping: waiting up to {STOP_GRACE:?} for sessions in progress");
    for handle in tenants.values_mut() {
        handle.stop();
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut running = tenants.len();
    while running > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match finished_rx.recv_timeout(left) {
            Ok(name) => {
                if let Some(mut handle) = tenants.remove(name.as_str()) {
                    handle.join();
                }
                running -= 1;
            }
            Err(_) => break,
        }
    }
    for (name, handle) in std::mem::take(&mut tenants) {
        // Still in a blocking session: leave it; its message stays queued and
        // is retried at the next start.
        log::warn!("tenant {name}: still busy at exit; its current message stays queued");
        std::mem::forget(handle);
    }
    log::info!("stopped");
    Ok(())
}
