//! The dispatcher: one mio loop that turns outside events (pickup hints from
//! `sendmail`, signals, tenant threads ending) into work for the tenant set.
//! It never blocks on a tenant: no DNS, no fsync, no network I/O here; sends
//! to tenants are `try_send`. Reading the config file on SIGHUP is the one
//! small read it does.

use crate::config::{self, Config};
use crate::spool::{MessageId, Spool};
use crate::tenant::{Job, TenantSet};
use mio::net::UnixDatagram;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::RootCertStore;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const PICKUP: Token = Token(0);
const SIGNALS: Token = Token(1);
const TENANT_ENDED: Token = Token(2);

pub struct Dispatcher {
    poll: Poll,
    pickup: UnixDatagram,
    pickup_path: PathBuf,
    signals: Signals,
    config_path: PathBuf,
    tenants: TenantSet,
}

impl Dispatcher {
    /// Binds the pickup socket and starts every tenant.
    pub fn start(config: &Config, spool: &Spool, roots: RootCertStore) -> io::Result<Dispatcher> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), TENANT_ENDED)?);
        let wake = Arc::new(move || {
            let _ = waker.wake();
        });
        let path = spool.pickup_socket();
        // The daemon holds the spool's lock, so a socket file here is left
        // over from one that died.
        let _ = std::fs::remove_file(&path);
        let mut pickup = UnixDatagram::bind(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
        })?;
        // Any local submitter may hint; a hint only makes a tenant look at its own folder.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut pickup, PICKUP, Interest::READABLE)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;

        let mut tenants = TenantSet::new(&config.daemon, spool.clone(), roots, wake);
        tenants.start_all(&config.tenants);
        Ok(Dispatcher {
            poll,
            pickup,
            pickup_path: path,
            signals,
            config_path: config.path.clone(),
            tenants,
        })
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// Runs until SIGTERM or SIGINT, then stops the tenants within `grace`.
    pub fn run(mut self, grace: Duration) -> io::Result<()> {
        let mut events = Events::with_capacity(64);
        'serve: loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    PICKUP => self.read_hints(),
                    TENANT_ENDED => self.tenants.reap(),
                    SIGNALS if self.read_signals() => break 'serve,
                    _ => {}
                }
            }
        }
        log::info!("stopping: waiting up to {grace:?} for sessions in progress");
        let _ = std::fs::remove_file(&self.pickup_path);
        self.tenants.stop_all(grace);
        Ok(())
    }

    fn read_hints(&mut self) {
        let mut buf = [0u8; 256];
        loop {
            match self.pickup.recv(&mut buf) {
                Ok(n) => self.route_hint(buf.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("pickup socket: {e}");
                    return;
                }
            }
        }
    }

    /// A hint is "TENANT ID"; anything else is ignored (it is only a hint).
    fn route_hint(&self, hint: &[u8]) {
        let text = String::from_utf8_lossy(hint);
        let mut words = text.split_ascii_whitespace();
        let (Some(tenant), Some(id), None) = (words.next(), words.next(), words.next()) else {
            log::debug!("pickup: ignored malformed hint {text:?}");
            return;
        };
        match MessageId::parse(id) {
            Some(id) => self.tenants.route(tenant, Job::Queued(id)),
            None => log::debug!("pickup: ignored hint with bad id {id:?}"),
        }
    }

    /// True when it is time to stop.
    fn read_signals(&mut self) -> bool {
        let mut stop = false;
        let mut reload = false;
        for signal in self.signals.pending() {
            match signal {
                SIGTERM | SIGINT => stop = true,
                SIGHUP => reload = true,
                _ => {}
            }
        }
        if reload && !stop {
            self.reload();
        }
        stop
    }

    /// Re-reads the configuration; an invalid one is refused and the old one kept.
    fn reload(&mut self) {
        match config::load(&self.config_path) {
            Ok(config) => {
                for warning in &config.warnings {
                    log::warn!("{warning}");
                }
                self.tenants.reload(&config);
                log::info!(
                    "reloaded {}: {} tenants",
                    self.config_path.display(),
                    self.tenants.len()
                );
            }
            Err(e) => {
                for problem in &e.problems {
                    log::error!("reload refused: {problem}");
                }
                log::error!("reload refused: the running configuration stays in force");
            }
        }
    }
}
