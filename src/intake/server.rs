//! Local SMTP submission on `listen` (loopback TCP or a unix socket), served
//! by the dispatcher's mio loop: non-blocking reads and writes, one
//! `Conversation` per client, idle timeouts, a connection limit. All disk
//! work (free space, the new file, body writes, fsync and renames) runs on
//! the writer's threads (writer.rs), so a slow disk never stalls the loop:
//! jobs go out with `try_send`, answers come back through a channel and the
//! Waker, and a client whose jobs find no room is not read until there is.

use super::smtp::Conversation;
use super::writer::{Answer, Job, Refused, Writer};
use crate::base::names::MessageId;
use crate::config::{Config, ListenAddr};
use crate::spool::Spool;
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token, Waker};
use std::collections::HashMap;
use std::collections::VecDeque;
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

/// Bytes read from one client per wake-up, so a fast sender cannot hold the loop.
const READ_BUDGET: usize = 64 * 1024;
/// Replies waiting for a client that does not read them: stop reading it past this.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;

pub struct IntakeServer {
    /// Clients with input left unread (budget spent, or output to drain first).
    /// Edge-triggered readiness will not report them again: the loop comes back
    /// for them, round-robin, after the other ready clients.
    backlog: VecDeque<Token>,
    listener: Listener,
    listener_token: Token,
    first_token: usize,
    next: usize,
    clients: HashMap<Token, Client>,
    writer: Writer,
    /// Clients with jobs the writer had no room for, in the order they found
    /// it full; served when the writer wakes the loop.
    waiting_room: VecDeque<Token>,
    /// Gone clients whose submission the writer must still discard.
    discards: VecDeque<Token>,
}

/// How sending a client's jobs went.
enum Sent {
    All,
    /// The writer had no room; the client waits in the waiting room.
    Full,
    /// The writer is gone: nothing can be stored.
    Gone,
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
        // One answer in flight per connection, and some for those just gone.
        let capacity = (config.daemon.listen_limits.max_connections as usize).saturating_mul(2);
        let writer = Writer::start(spool.clone(), capacity, waker)?;
        Ok(IntakeServer {
            backlog: VecDeque::new(),
            listener,
            listener_token,
            first_token,
            next: 0,
            clients: HashMap::new(),
            writer,
            waiting_room: VecDeque::new(),
            discards: VecDeque::new(),
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
        // Input held back while the writer had no room goes first.
        client.conversation.resume(config);
        let mut sent = send_jobs(&self.writer, token, &mut client.conversation);
        let mut buf = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        let mut closed = false;
        let mut more_waiting = false;
        loop {
            // Paused: the writer owes an answer or has no room, or the client
            // quit. The writer's wake brings it back.
            if !matches!(sent, Sent::All) || !client.conversation.wants_input() {
                break;
            }
            // Its budget spent, or it is not reading our replies.
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
                    client
                        .conversation
                        .receive(buf.get(..n).unwrap_or_default(), config);
                    sent = send_jobs(&self.writer, token, &mut client.conversation);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        match sent {
            Sent::All => {}
            Sent::Full => {
                if !self.waiting_room.contains(&token) {
                    self.waiting_room.push_back(token);
                }
            }
            Sent::Gone => {
                log::error!("local submission: the spool writer thread is gone");
                client
                    .conversation
                    .close_with("421 4.3.0 Cannot store mail now; try again later");
            }
        }
        // A client that sent all and half-closed still gets the replies it waits for.
        if closed && !client.conversation.is_waiting() {
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

    /// The writer woke the loop: answers for the conversations that wait for
    /// them, and room for those it had none for. Returns (tenant, id) of each
    /// message queued, for the dispatcher to hand to its tenant.
    pub fn wake(&mut self, registry: &Registry, config: &Config) -> Vec<(String, MessageId)> {
        let mut queued = Vec::new();
        while let Some((token, answer)) = self.writer.try_recv() {
            if let Answer::Committed {
                tenant,
                result: Ok(id),
            } = &answer
            {
                queued.push((tenant.clone(), id.clone()));
            }
            let Some(client) = self.clients.get_mut(&token) else {
                continue;
            };
            client.conversation.answer(answer, config);
            // What it pipelined meanwhile, and more input, on the next turn.
            if !self.backlog.contains(&token) {
                self.backlog.push_back(token);
            }
            self.flush(registry, token);
        }
        while let Some(token) = self.discards.pop_front() {
            if let Err(Refused::Full(_)) = self.writer.try_send(token, Job::Discard) {
                self.discards.push_front(token);
                return queued;
            }
        }
        while let Some(token) = self.waiting_room.pop_front() {
            let Some(client) = self.clients.get_mut(&token) else {
                continue;
            };
            if let Sent::Full = send_jobs(&self.writer, token, &mut client.conversation) {
                self.waiting_room.push_front(token);
                break;
            }
            if !self.backlog.contains(&token) {
                self.backlog.push_back(token);
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
        self.waiting_room.retain(|t| *t != token);
        if let Some(mut client) = self.clients.remove(&token) {
            let _ = registry.deregister(client.stream.source());
            // Its temp file goes on the writer's thread, after its other jobs.
            if client.conversation.may_hold_draft() {
                match self.writer.try_send(token, Job::Discard) {
                    Err(Refused::Full(_)) => self.discards.push_back(token),
                    Ok(()) | Err(Refused::Gone) => {}
                }
            }
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
                !c.conversation.is_waiting() && now.duration_since(c.last_activity) >= idle
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

/// Sends the conversation's jobs in order until the writer has no room.
fn send_jobs(writer: &Writer, token: Token, conversation: &mut Conversation) -> Sent {
    while let Some(job) = conversation.next_job() {
        match writer.try_send(token, job) {
            Ok(()) => {}
            Err(Refused::Full(job)) => {
                conversation.unsend(job);
                return Sent::Full;
            }
            Err(Refused::Gone) => return Sent::Gone,
        }
    }
    Sent::All
}
