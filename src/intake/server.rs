//! Local SMTP submission on `listen` (loopback TCP or a unix socket), served
//! by the dispatcher's mio loop: non-blocking reads and writes, one
//! `Conversation` per client, idle timeouts, a connection limit. The fsync
//! and renames of a commit run on the committer thread, so a slow disk never
//! stalls the loop; its answer comes back through a channel and a Waker.

use super::smtp::{Conversation, ToCommit};
use crate::config::{Config, ListenAddr};
use crate::spool::{MessageId, Spool};
use crossbeam_channel::{bounded, Receiver, Sender};
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
}

struct Client {
    stream: Stream,
    conversation: Conversation,
    last_activity: Instant,
    writable_registered: bool,
}

/// A message the committer made durable (or could not), for connection `token`.
pub struct Committed {
    pub token: Token,
    pub tenant: String,
    pub result: Result<MessageId, String>,
}

/// Bytes read from one client per wake-up, so a fast sender cannot hold the loop.
const READ_BUDGET: usize = 64 * 1024;
/// Replies waiting for a client that does not read them: stop reading it past this.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;

pub struct IntakeServer {
    /// Clients with input left unread (budget spent, or output to drain first).
    /// Edge-triggered readiness will not report them again: the loop comes back
    /// for them, round-robin, after the other ready clients.
    backlog: std::collections::VecDeque<Token>,
    listener: Listener,
    listener_token: Token,
    first_token: usize,
    next: usize,
    clients: HashMap<Token, Client>,
    to_committer: Sender<(Token, ToCommit)>,
    from_committer: Receiver<Committed>,
    spool: Spool,
}

impl IntakeServer {
    pub fn bind(
        addr: &ListenAddr,
        config: &Config,
        spool: &Spool,
        registry: &Registry,
        listener_token: Token,
        first_token: usize,
        waker: Arc<Waker>,
    ) -> io::Result<IntakeServer> {
        let mut listener = match addr {
            ListenAddr::Tcp(addr) => Listener::Tcp(TcpListener::bind(*addr)?),
            ListenAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                // Local submitters need not be in the daemon's group, as with sendmail.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
                Listener::Unix(listener)
            }
        };
        match &mut listener {
            Listener::Tcp(l) => registry.register(l, listener_token, Interest::READABLE)?,
            Listener::Unix(l) => registry.register(l, listener_token, Interest::READABLE)?,
        }
        let capacity = config.daemon.listen_limits.max_connections as usize;
        let (to_committer, jobs) = bounded::<(Token, ToCommit)>(capacity);
        let (done, from_committer) = bounded::<Committed>(capacity);
        std::thread::Builder::new()
            .name("intake-commit".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                for (token, message) in jobs {
                    let ToCommit {
                        submission,
                        tenant,
                        sender,
                        recipients,
                    } = message;
                    let result = submission
                        .commit(&tenant, &sender, &recipients)
                        .map_err(|e| e.to_string());
                    if done
                        .send(Committed {
                            token,
                            tenant,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(IntakeServer {
            backlog: std::collections::VecDeque::new(),
            listener,
            listener_token,
            first_token,
            next: 0,
            clients: HashMap::new(),
            to_committer,
            from_committer,
            spool: spool.clone(),
        })
    }

    pub fn owns(&self, token: Token) -> bool {
        token == self.listener_token || self.clients.contains_key(&token)
    }

    pub fn ready(&mut self, registry: &Registry, token: Token, config: &Config) {
        if token == self.listener_token {
            return self.accept(registry, config);
        }
        self.flush(registry, token);
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        client.last_activity = Instant::now();
        let mut buf = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        let mut closed = false;
        let mut more_waiting = false;
        loop {
            // Paused: a commit is pending, the client quit, or it is not reading our replies.
            if client.conversation.is_committing() || client.conversation.is_closed() {
                break;
            }
            if budget == 0 || client.conversation.output.len() > MAX_PENDING_OUTPUT {
                more_waiting = true;
                break;
            }
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    let commit = client.conversation.receive(
                        buf.get(..n).unwrap_or_default(),
                        config,
                        &self.spool,
                    );
                    if let Some(message) = commit {
                        // Capacity equals the connection limit and each client
                        // has at most one commit in flight: this never blocks.
                        let _ = self.to_committer.send((token, message));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && !client.conversation.is_committing() {
            self.drop_client(registry, token);
            return;
        }
        if more_waiting && !self.backlog.contains(&token) {
            self.backlog.push_back(token);
        }
        self.flush(registry, token);
    }

    /// True when some client has input waiting that no event will announce.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Gives each backlogged client one more turn.
    pub fn serve_backlog(&mut self, registry: &Registry, config: &Config) {
        for _ in 0..self.backlog.len() {
            if let Some(token) = self.backlog.pop_front() {
                self.ready(registry, token, config);
            }
        }
    }

    /// Answers for finished commits; returns (tenant, id) of each message queued.
    pub fn take_committed(
        &mut self,
        registry: &Registry,
        config: &Config,
    ) -> Vec<(String, MessageId)> {
        let mut queued = Vec::new();
        while let Ok(done) = self.from_committer.try_recv() {
            if let Ok(id) = &done.result {
                queued.push((done.tenant.clone(), id.clone()));
            }
            let Some(client) = self.clients.get_mut(&done.token) else {
                continue;
            };
            let result = done.result.map(|id| id.to_string());
            if let Some(message) = client.conversation.committed(result, config, &self.spool) {
                let _ = self.to_committer.send((done.token, message));
            }
            self.flush(registry, done.token);
            // Input may have arrived while we waited; read it on the next turn.
            if !self.backlog.contains(&done.token) {
                self.backlog.push_back(done.token);
            }
        }
        queued
    }

    /// Writes what the conversation has to say; closes the connection when it is over.
    fn flush(&mut self, registry: &Registry, token: Token) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut written = 0;
        while written < client.conversation.output.len() {
            let rest = client
                .conversation
                .output
                .get(written..)
                .unwrap_or_default();
            match client.stream.write(rest) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        client.conversation.output.drain(..written);
        let pending = !client.conversation.output.is_empty();
        if pending != client.writable_registered {
            let interest = if pending {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let _ = registry.reregister(client.stream.source(), token, interest);
            client.writable_registered = pending;
        }
        if !pending && client.conversation.is_closed() {
            self.drop_client(registry, token);
        }
    }

    fn accept(&mut self, registry: &Registry, config: &Config) {
        loop {
            let accepted = match &self.listener {
                Listener::Tcp(l) => l
                    .accept()
                    .map(|(s, addr)| (Stream::Tcp(s), addr.ip().to_string())),
                Listener::Unix(l) => l
                    .accept()
                    .map(|(s, _)| (Stream::Unix(s), "local".to_string())),
            };
            let (mut stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("local submission: {e}");
                    return;
                }
            };
            let limits = config.daemon.listen_limits;
            let mut conversation = Conversation::new(&config.daemon.hostname, &peer, limits);
            if self.clients.len() >= limits.max_connections as usize {
                conversation.output.clear();
                conversation.close_with("421 4.3.2 Too many connections; try again later");
                let _ = stream.write(&conversation.output);
                continue;
            }
            let token = Token(self.first_token + self.next);
            self.next = (self.next + 1) % 1_000_000;
            if registry
                .register(stream.source(), token, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.clients.insert(
                token,
                Client {
                    stream,
                    conversation,
                    last_activity: Instant::now(),
                    writable_registered: false,
                },
            );
            self.flush(registry, token);
        }
    }

    fn drop_client(&mut self, registry: &Registry, token: Token) {
        self.backlog.retain(|t| *t != token);
        if let Some(mut client) = self.clients.remove(&token) {
            let _ = registry.deregister(client.stream.source());
        }
    }

    /// Closes clients idle longer than the limit; returns when the next one
    /// would time out, so the loop sleeps exactly that long (no polling).
    pub fn expire_idle(&mut self, registry: &Registry, idle: Duration) -> Option<Duration> {
        let now = Instant::now();
        let expired: Vec<Token> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                !c.conversation.is_committing() && now.duration_since(c.last_activity) >= idle
            })
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some(client) = self.clients.get_mut(&token) {
                client
                    .conversation
                    .close_with("421 4.4.2 Idle too long; closing");
            }
            self.flush(registry, token);
            self.drop_client(registry, token);
        }
        self.clients
            .values()
            .map(|c| idle.saturating_sub(now.duration_since(c.last_activity)))
            .min()
    }
}
