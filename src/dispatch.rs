//! The dispatcher: one mio loop that turns outside events (pickup hints from
//! `sendmail`, signals) into jobs for tenant threads. It never blocks: no
//! DNS, no fsync, no network I/O here; sends to tenants are `try_send`.

use crate::spool::{MessageId, Spool};
use crate::tenant::{Job, TenantHandle};
use mio::net::UnixDatagram;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;

const PICKUP: Token = Token(0);
const SIGNALS: Token = Token(1);

pub struct Dispatcher {
    poll: Poll,
    pickup: UnixDatagram,
    signals: Signals,
    tenants: BTreeMap<String, TenantHandle>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT: stop taking work and shut down.
    Terminate,
}

impl Dispatcher {
    pub fn new(spool: &Spool, tenants: BTreeMap<String, TenantHandle>) -> io::Result<Dispatcher> {
        let path = spool.pickup_socket();
        // A socket file left by a daemon that died is in the way; no live daemon
        // can be using it because the spool has one daemon (systemd's unit).
        let _ = std::fs::remove_file(&path);
        let mut pickup = UnixDatagram::bind(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
        })?;
        // Any local submitter may hint; a hint only makes a tenant look at its own folder.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut pickup, PICKUP, Interest::READABLE)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        Ok(Dispatcher {
            poll,
            pickup,
            signals,
            tenants,
        })
    }

    /// Runs until told to stop; hands the tenants back for an orderly shutdown.
    pub fn run(mut self) -> io::Result<(Exit, BTreeMap<String, TenantHandle>)> {
        let mut events = Events::with_capacity(64);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    PICKUP => self.read_hints(),
                    SIGNALS => {
                        if let Some(exit) = self.read_signals() {
                            return Ok((exit, self.tenants));
                        }
                    }
                    _ => {}
                }
            }
        }
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
        match (self.tenants.get(tenant), MessageId::parse(id)) {
            (Some(handle), Some(id)) => handle.send(Job::Queued(id)),
            (None, _) => log::warn!("pickup: message {id} is for tenant {tenant:?}, which is not configured; it stays queued"),
            (_, None) => log::debug!("pickup: ignored hint with bad id {id:?}"),
        }
    }

    fn read_signals(&mut self) -> Option<Exit> {
        for signal in self.signals.pending() {
            match signal {
                SIGTERM | SIGINT => return Some(Exit::Terminate),
                SIGHUP => log::warn!("SIGHUP: reloading the configuration is not supported by this version yet; restart the daemon"),
                _ => {}
            }
        }
        None
    }
}
