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
//! (admin.rs), again through the Waker.

mod admin;
mod offload;

use crate::base::names::MessageId;
use crate::config::{Config, ConfigError};
use crate::control::{self, ControlServer, Request, Response, Selection};
use crate::intake::server::IntakeServer;
use crate::spool::Spool;
use crate::tenant::{Action, Job, Target, TenantSet};
use admin::{AdminWaits, Asked};
use mio::net::UnixDatagram;
use mio::{Events, Interest, Poll, Token, Waker};
use offload::{Chore, Done, Located, Offload, Ticket};
use rustls::RootCertStore;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::collections::{BTreeMap, HashMap};
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

/// What to do with an offloaded chore's result.
enum Awaiting {
    /// Apply the loaded configuration; answer the control connection, if any.
    Reload(Option<Token>),
    /// Hand the command to the tenants holding the IDs; answer the
    /// connection once they reported.
    Select(Token, Action),
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

    /// Hands a chore to the offload thread and notes who waits for it; the
    /// chore comes back when that thread is busy.
    fn offload(&mut self, chore: Chore, awaiting: Awaiting) -> Result<(), Chore> {
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        self.offload.try_send(ticket, chore)?;
        self.awaiting.insert(ticket, awaiting);
        Ok(())
    }

    /// Re-reads the configuration off this thread; `reply_to` gets the outcome.
    fn start_reload(&mut self, reply_to: Option<Token>) {
        let chore = Chore::LoadConfig(self.config.path.clone());
        if self.offload(chore, Awaiting::Reload(reply_to)).is_err() {
            match reply_to {
                Some(token) => self.respond(token, &busy()),
                // Not lost: it runs once the offload thread answers.
                None => self.reload_wanted = true,
            }
        }
    }

    /// Results of offloaded chores: apply them and answer who waits.
    fn take_offloaded(&mut self) {
        while let Some((ticket, done)) = self.offload.try_recv() {
            let Some(awaiting) = self.awaiting.remove(&ticket) else {
                continue;
            };
            match (awaiting, done) {
                (Awaiting::Reload(reply_to), Done::Config(loaded)) => {
                    let response = match self.apply_reload(*loaded) {
                        Ok(()) => {
                            Response::ok(serde_json::json!({ "tenants": self.tenants.len() }))
                        }
                        Err(problems) => Response::error(format!(
                            "the new configuration was refused; the old one stays in force:\n{}",
                            problems.join("\n")
                        )),
                    };
                    if let Some(token) = reply_to {
                        self.respond(token, &response);
                    }
                }
                (Awaiting::Select(token, action), Done::Located(found)) => {
                    if let Some(response) = self.act_on(token, found, action) {
                        self.respond(token, &response);
                    }
                }
                (Awaiting::Reload(reply_to), _) => {
                    if let Some(token) = reply_to {
                        self.respond(token, &Response::error("internal error: wrong reply"));
                    }
                }
                (Awaiting::Select(token, _), _) => {
                    self.respond(token, &Response::error("internal error: wrong reply"));
                }
            }
        }
        if std::mem::take(&mut self.reload_wanted) {
            self.start_reload(None);
        }
    }

    /// Applies a configuration the offload thread loaded; an invalid one is
    /// refused and the old one kept. Returns the problems that made it refuse.
    fn apply_reload(&mut self, loaded: Result<Config, ConfigError>) -> Result<(), Vec<String>> {
        match loaded {
            Ok(config) => {
                for warning in &config.warnings {
                    log::warn!("{warning}");
                }
                self.tenants.reload(&config);
                if config.daemon.listen != self.config.daemon.listen {
                    log::warn!("reload: a change of listen takes effect after a restart");
                }
                self.config = config;
                let path = self.config.path.display();
                log::info!("reloaded {path}: {} tenants", self.tenants.len());
                Ok(())
            }
            Err(e) => {
                for problem in &e.problems {
                    log::error!("reload refused: {problem}");
                }
                log::error!("reload refused: the running configuration stays in force");
                Err(e.problems.iter().map(|p| p.to_string()).collect())
            }
        }
    }

    fn respond(&mut self, token: Token, response: &Response) {
        self.control.respond(self.poll.registry(), token, response);
    }

    fn serve_control(&mut self, token: Token) {
        for event in self.control.ready(self.poll.registry(), token) {
            if let control::Event::Request(token, request) = event {
                if let Some(response) = self.execute(token, request) {
                    self.respond(token, &response);
                }
            }
        }
    }

    /// Carries out an admin's request. Work on messages is handed to their
    /// tenant's thread, which records it durably; this only routes. None
    /// when the answer comes later, from the offload thread.
    fn execute(&mut self, token: Token, request: Request) -> Option<Response> {
        let response = match request {
            Request::Status => {
                Response::ok(serde_json::json!({ "tenants": self.tenants.status() }))
            }
            Request::Flush { tenant } => match tenant {
                Some(tenant) => self.to_tenant(&tenant, Job::Flush),
                None => {
                    self.tenants.route_all(|| Job::Flush);
                    Response::ok(serde_json::json!({ "tenants": self.tenants.len() }))
                }
            },
            Request::Hold(selection) => return self.select(token, selection, Action::Hold),
            Request::Release(selection) => return self.select(token, selection, Action::Release),
            Request::Delete(selection) => return self.select(token, selection, Action::Delete),
            Request::Reload => {
                self.start_reload(Some(token));
                return None;
            }
        };
        Some(response)
    }

    fn to_tenant(&self, tenant: &str, job: Job) -> Response {
        if !self.tenants.is_running(tenant) {
            return Response::error(format!("no tenant named {tenant:?} is running"));
        }
        self.tenants.route(tenant, job);
        Response::ok(serde_json::json!({ "tenant": tenant }))
    }

    /// A whole tenant at once; listed IDs once the offload thread found
    /// which tenant's folder holds each (that stats spool files). None: the
    /// answer comes once the tenants reported (admin.rs).
    fn select(&mut self, token: Token, selection: Selection, action: Action) -> Option<Response> {
        if let Some(tenant) = selection.tenant {
            if !self.tenants.is_running(&tenant) {
                return Some(Response::error(format!(
                    "no tenant named {tenant:?} is running"
                )));
            }
            return self.ask(token, action, vec![(tenant, Target::All)]);
        }
        if selection.ids.is_empty() {
            return Some(Response::error("name message IDs, or --tenant T"));
        }
        match self.offload(
            Chore::Locate(selection.ids),
            Awaiting::Select(token, action),
        ) {
            Ok(()) => None,
            Err(_) => Some(busy()),
        }
    }

    /// Hands the command to each tenant, noting the message each is
    /// sending now; None: the answer comes with their reports.
    fn ask(
        &mut self,
        token: Token,
        action: Action,
        targets: Vec<(String, Target)>,
    ) -> Option<Response> {
        let asked = targets
            .into_iter()
            .map(|(tenant, target)| Asked {
                sending: self.tenants.sending(&tenant),
                tenant,
                target,
            })
            .collect();
        self.admin.start(&self.tenants, token, action, asked).err()
    }

    /// Reports from tenants that complete a request: answer it.
    fn take_admin_reports(&mut self) {
        for (token, response) in self.admin.take() {
            self.respond(token, &response);
        }
    }

    /// Listed IDs grouped by the tenant whose folder holds them.
    fn act_on(
        &mut self,
        token: Token,
        found: Vec<(String, Located)>,
        action: Action,
    ) -> Option<Response> {
        let mut by_tenant: BTreeMap<String, Vec<MessageId>> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut orphaned = Vec::new();
        for (raw, located) in found {
            match located {
                Located::Queued { tenant, id } if self.tenants.is_running(tenant.as_str()) => {
                    by_tenant.entry(tenant.to_string()).or_default().push(id)
                }
                Located::Queued { tenant, .. } => orphaned.push(format!("{raw} (tenant {tenant})")),
                Located::Unknown => unknown.push(raw),
            }
        }
        // All or nothing: a typo in one ID must not leave the command half done.
        if !unknown.is_empty() {
            return Some(Response::error(format!(
                "no queued message with ID {}; nothing was changed",
                unknown.join(", ")
            )));
        }
        if !orphaned.is_empty() {
            return Some(Response::error(format!(
                "{} belong to a tenant that is no longer configured; nothing was changed. \
                 Add its [tenant:NAME] section back and reload to act on them",
                orphaned.join(", ")
            )));
        }
        let targets = by_tenant
            .into_iter()
            .map(|(tenant, ids)| (tenant, Target::Ids(ids)))
            .collect();
        self.ask(token, action, targets)
    }
}

/// The offload thread has a full queue: the admin tries again.
/// The sooner of two poll timeouts; none means no timeout.
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn busy() -> Response {
    Response::busy("the daemon is busy; try again in a moment")
}
