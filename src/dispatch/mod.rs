//! The dispatcher: one mio loop that turns outside events (pickup hints from
//! `sendmail`, local SMTP submissions, control requests, signals, tenant
//! threads ending) into work for the tenant set.
//! Once running it never blocks and does no disk I/O (start-up binds its
//! sockets first; tests/dispatcher_io.rs checks the rest): no DNS, no file,
//! no fsync here. Sends to tenants are `try_send`, the listener's disk work
//! runs on the intake writer's threads, and reading the config file or
//! finding which tenant holds a message ID runs on the offload thread
//! (offload.rs), whose result comes back through the Waker. Hold, release
//! and delete are answered once their tenants reported them durable
//! (admin.rs), again through the Waker. Here: the loop and the routing of
//! its events; control requests are carried out in control.rs.

mod admin;
mod control;
mod offload;

use crate::base::names::MessageId;
use crate::config::Config;
use crate::control::ControlServer;
use crate::intake::server::IntakeServer;
use crate::spool::Spool;
use crate::tenant::{Job, TenantSet};
use admin::AdminWaits;
use control::Awaiting;
use mio::net::UnixDatagram;
use mio::{Events, Interest, Poll, Token, Waker};
use offload::{Offload, Ticket};
use rustls::RootCertStore;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PICKUP: Token = Token(0);
const SIGNALS: Token = Token(1);
/// Another thread has news: a tenant thread ended, the intake writer
/// answered, or the offload thread finished a chore.
const WAKE: Token = Token(2);
const CONTROL: Token = Token(3);
const INTAKE: Token = Token(4);
/// Control connections get tokens from here on.
const CONTROL_CONNECTIONS: usize = 1000;
/// Local submission connections get tokens from here on.
const INTAKE_CONNECTIONS: usize = 2_000_000;

pub struct Dispatcher {
    poll: Poll,
    pickup: UnixDatagram,
    pickup_path: PathBuf,
    signals: Signals,
    control: ControlServer,
    intake: Option<IntakeServer>,
    config: Config,
    tenants: TenantSet,
    offload: Offload,
    /// Who waits for each chore on the offload thread.
    awaiting: HashMap<Ticket, Awaiting>,
    next_ticket: Ticket,
    /// A SIGHUP found the offload thread busy: reload once it answers.
    reload_wanted: bool,
    /// Hold, release and delete waiting for their tenants' reports.
    admin: AdminWaits,
}

impl Dispatcher {
    /// Binds the pickup socket and starts every tenant.
    pub fn start(
        config: &Config,
        spool: &Spool,
        roots: Arc<RootCertStore>,
    ) -> io::Result<Dispatcher> {
        let poll = Poll::new()?;
        // mio allows one Waker per Poll: tenants, the intake writer and the
        // offload thread share it.
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let tenant_waker = Arc::clone(&waker);
        let wake = Arc::new(move || {
            let _ = tenant_waker.wake();
        });
        // Signals first: from here on SIGTERM is an orderly stop, never a kill.
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let mut tenants = TenantSet::new(&config.daemon, spool.clone(), roots, wake);
        tenants.start_all(&config.tenants);

        let control = ControlServer::bind(
            &config.daemon.control_socket,
            poll.registry(),
            CONTROL,
            CONTROL_CONNECTIONS,
        )?;
        let offload = Offload::start(spool.clone(), Arc::clone(&waker))?;
        let admin = AdminWaits::new(Arc::clone(&waker));
        let intake = match &config.daemon.listen {
            Some(addr) => Some(
                IntakeServer::bind(
                    addr,
                    config,
                    spool,
                    poll.registry(),
                    INTAKE,
                    INTAKE_CONNECTIONS,
                    waker,
                )
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr:?}: {e}")))?,
            ),
            None => None,
        };

        // The pickup socket last: its appearance tells the world we are ready.
        let path = spool.pickup_socket();
        // The daemon holds the spool's lock, so a socket file here is left
        // over from one that died.
        let _ = std::fs::remove_file(&path);
        let mut pickup = UnixDatagram::bind(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
        })?;
        // Any local submitter may hint; a hint only makes a tenant look at its own folder.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        poll.registry()
            .register(&mut pickup, PICKUP, Interest::READABLE)?;
        Ok(Dispatcher {
            poll,
            pickup,
            pickup_path: path,
            signals,
            control,
            intake,
            config: config.clone(),
            tenants,
            offload,
            awaiting: HashMap::new(),
            next_ticket: 0,
            reload_wanted: false,
            admin,
        })
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// Runs until SIGTERM or SIGINT, then stops the tenants within `grace`.
    pub fn run(mut self, grace: Duration) -> io::Result<()> {
        let mut events = Events::with_capacity(64);
        'serve: loop {
            // Idle means idle: with no submission client connected, no timeout at all.
            let idle = self.config.daemon.listen_limits.idle_timeout;
            let registry = self.poll.registry();
            let timeout = match self.intake.as_mut() {
                // Clients with unread input: look at new events, then come back at once.
                Some(intake) if intake.has_backlog() => Some(Duration::ZERO),
                Some(intake) => intake.expire_idle(registry, idle),
                None => None,
            };
            // Idle admin connections are closed at their deadline, the
            // earliest of which bounds the wait as well.
            let control = self.control.expire_idle(registry, Instant::now());
            let timeout = earliest(timeout, control);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(intake) = self.intake.as_mut() {
                intake.serve_backlog(self.poll.registry(), &self.config);
            }
            for event in events.iter() {
                match event.token() {
                    PICKUP => self.read_hints(),
                    WAKE => {
                        self.tenants.reap();
                        self.take_submissions();
                        self.take_offloaded();
                        self.take_admin_reports();
                    }
                    SIGNALS if self.read_signals() => break 'serve,
                    token if self.control.owns(token) => self.serve_control(token),
                    token if self.intake.as_ref().is_some_and(|i| i.owns(token)) => {
                        if let Some(intake) = self.intake.as_mut() {
                            intake.ready(self.poll.registry(), token, &self.config);
                        }
                    }
                    _ => {}
                }
            }
        }
        log::info!("stopping: waiting up to {grace:?} for sessions in progress");
        let _ = std::fs::remove_file(&self.pickup_path);
        self.control.remove_socket();
        self.tenants.stop_all(grace);
        Ok(())
    }

    /// Submissions the committer made durable go to their tenant at once.
    fn take_submissions(&mut self) {
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        for (tenant, id) in intake.wake(self.poll.registry(), &self.config) {
            self.tenants.route(&tenant, Job::Queued(id));
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
            self.start_reload(None);
        }
        stop
    }
}

/// The sooner of two poll timeouts; none means no timeout.
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
