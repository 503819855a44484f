//! Start-up and shut-down order of the daemon: take the spool's lock, recover
//! the spool, start the dispatcher (which starts one thread per tenant), and
//! on SIGTERM stop within a bounded grace period. The spool makes an
//! unfinished stop safe.

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::spool::Spool;
use crate::tls;
use std::time::Duration;

/// How long SIGTERM waits for sessions in progress before exiting anyway.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let spool = Spool::new(&config.daemon.spool_dir);
    spool.create_layout()?;
    // Held until the process exits: one daemon per spool.
    let _lock = spool.lock_for_daemon()?;
    let removed = spool.remove_abandoned()?;
    if removed > 0 {
        log::info!("spool: removed {removed} abandoned partial submissions");
    }

    let configured: Vec<&str> = config.tenants.iter().map(|t| t.name.as_str()).collect();
    for orphan in spool
        .tenants()?
        .iter()
        .filter(|t| !configured.contains(&t.as_str()))
    {
        let count = spool.message_ids(orphan).map(|ids| ids.len()).unwrap_or(0);
        if count > 0 {
            log::warn!("spool holds {count} messages for tenant {orphan:?}, which is not configured; they stay queued");
        }
    }

    let dispatcher = Dispatcher::start(&config, &spool, tls::system_roots())?;
    log::info!(
        "pbxmail {} started: {} tenants, spool {}",
        env!("CARGO_PKG_VERSION"),
        dispatcher.tenant_count(),
        spool.root().display()
    );
    dispatcher.run(STOP_GRACE)?;
    log::info!("stopped");
    Ok(())
}
