//! Start-up and shut-down order of the daemon: take the spool's lock, recover
//! the spool, start the dispatcher (which starts one thread per tenant), and
//! on SIGTERM stop within a bounded grace period. The spool makes an
//! unfinished stop safe.
//!
//! Threads: this one becomes the dispatcher once READY=1 is sent (no disk
//! I/O from then on); `tenant:NAME` per tenant; `intake-write` and
//! `intake-commit` for `listen`; `offload` for the dispatcher's file work.

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
        // No rescan comes for a tenant without a thread: its lost envelopes
        // are found here, so that `queue` shows them.
        quarantine_orphans(&spool, orphan);
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
    notify_systemd("READY=1");
    dispatcher.run(STOP_GRACE)?;
    log::info!("stopped");
    Ok(())
}

/// Quarantines a folder's committed messages whose envelope was lost
/// (spool recovery.rs), with the reason; a configured tenant's rescan does it
/// for its own folder.
fn quarantine_orphans(spool: &Spool, tenant: &crate::base::names::TenantName) {
    let orphans = match spool.sweep_unpaired(tenant) {
        Ok(found) => found.orphans,
        Err(e) => {
            log::warn!("spool: cannot sweep {tenant}: {e}");
            return;
        }
    };
    for id in orphans {
        let reason = crate::spool::recovery::ORPHAN_REASON;
        log::error!("{id} tenant={tenant}: quarantined: {reason}");
        if let Err(e) = spool.quarantine(tenant, &id, reason) {
            log::error!("{id} tenant={tenant}: cannot quarantine: {e}");
        }
    }
}

/// sd_notify(3) for `Type=notify`: one datagram to $NOTIFY_SOCKET, which may
/// be in the abstract namespace ('@'). Without systemd it does nothing.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        log::warn!("cannot tell systemd {state}: {e}");
    }
}
