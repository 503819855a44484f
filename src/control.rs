//! The control socket: a unix stream socket (mode 0660) where `pbxmail
//! status`, `flush`, `hold`, `release`, `delete` and `reload` talk to the
//! running daemon. One JSON request line in, one JSON reply line out, then
//! the connection closes. Served non-blocking inside the dispatcher's mio
//! loop; what a request *does* is the dispatcher's business, and its answer
//! may come later (from work done off the loop) through `respond`. A client
//! gets a few seconds to send its request and to read the answer
//! (`expire_idle`); past the connection limit it is answered busy at once.

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A request is one short line; anything longer is not ours.
const MAX_REQUEST: usize = 64 * 1024;
/// Admin tools are few; past this many connections a new one is answered busy.
const MAX_CONNECTIONS: usize = 32;
/// The CLI writes its request as soon as it connects and reads the answer as
/// soon as it comes: a connection silent this long only holds a slot that
/// `status`, `reload` and `flush` need, and is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Flush {
        #[serde(default)]
        tenant: Option<String>,
    },
    Hold(Selection),
    Release(Selection),
    Delete(Selection),
    Reload,
}

/// Which messages an admin command acts on: listed IDs, or a whole tenant.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Selection {
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Refused for now only (too many connections, work queued up): the
    /// same request may succeed in a moment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub busy: bool,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            ok: true,
            error: None,
            result: Some(result),
            busy: false,
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            result: None,
            busy: false,
        }
    }

    /// A temporary refusal: the CLI says so and exits 75 (try again).
    pub fn busy(message: impl Into<String>) -> Response {
        Response {
            busy: true,
            ..Response::error(message)
        }
    }

    /// The JSON line on the wire.
    fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
        line.push(b'\n');
        line
    }
}

struct Connection {
    stream: UnixStream,
    /// Its request went to the dispatcher, whose answer is still due.
    awaiting: bool,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// When it is closed unless its request (or the reading of its answer)
    /// is done by then; none while the dispatcher's answer is due.
    deadline: Option<Instant>,
}

/// Connection tokens are `first_token + n`; the listener has `first_token - 1`.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    listener_token: Token,
    first_token: usize,
    next: usize,
    connections: HashMap<Token, Connection>,
}

pub enum Event {
    /// A complete request from this connection; answer with `respond`.
    Request(Token, Request),
    Nothing,
}

impl ControlServer {
    pub fn bind(
        path: &Path,
        registry: &Registry,
        listener_token: Token,
        first_token: usize,
    ) -> io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A live socket belongs to another daemon (a different spool, same
        // control_socket): refuse rather than steal it. A dead one is left
        // over from a daemon that died and goes.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another pbxmail daemon serves the control socket {}; give each daemon its own control_socket",
                    path.display()
                ),
            ));
        }
        let _ = std::fs::remove_file(path);
        let mut listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create control socket {}: {e}", path.display()),
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        registry.register(&mut listener, listener_token, Interest::READABLE)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            listener_token,
            first_token,
            next: 0,
            connections: HashMap::new(),
        })
    }

    pub fn owns(&self, token: Token) -> bool {
        token == self.listener_token || self.connections.contains_key(&token)
    }

    /// Handles readiness of the listener or a connection.
    pub fn ready(&mut self, registry: &Registry, token: Token) -> Vec<Event> {
        if token == self.listener_token {
            self.accept(registry);
            return vec![Event::Nothing];
        }
        let Some(conn) = self.connections.get_mut(&token) else {
            return vec![Event::Nothing];
        };
        if !conn.output.is_empty() {
            if flush(conn).unwrap_or(true) {
                self.close(registry, token);
            }
            return vec![Event::Nothing];
        }
        let mut buf = [0u8; 4096];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    self.close(registry, token);
                    return vec![Event::Nothing];
                }
                // One request per connection: more input while the answer is due is not ours.
                Ok(_) if conn.awaiting => continue,
                Ok(n) => {
                    conn.input
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    if let Some(end) = conn.input.iter().position(|&b| b == b'\n') {
                        let line = conn.input.get(..end).unwrap_or_default();
                        match parse(line) {
                            Ok(request) => {
                                conn.awaiting = true;
                                conn.deadline = None;
                                return vec![Event::Request(token, request)];
                            }
                            Err(why) => {
                                self.respond(registry, token, &Response::error(why));
                                return vec![Event::Nothing];
                            }
                        }
                    }
                    if conn.input.len() > MAX_REQUEST {
                        self.respond(registry, token, &Response::error("request too long"));
                        return vec![Event::Nothing];
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return vec![Event::Nothing],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(registry, token);
                    return vec![Event::Nothing];
                }
            }
        }
    }

    /// Queues the reply and writes what the socket takes now; the rest on WRITABLE.
    pub fn respond(&mut self, registry: &Registry, token: Token, response: &Response) {
        let Some(conn) = self.connections.get_mut(&token) else {
            return;
        };
        conn.awaiting = false;
        conn.output = response.line();
        conn.written = 0;
        conn.deadline = Some(Instant::now() + IDLE_TIMEOUT);
        match flush(conn) {
            Ok(false) => {
                let _ = registry.reregister(&mut conn.stream, token, Interest::WRITABLE);
            }
            _ => self.close(registry, token),
        }
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.connections.len() >= MAX_CONNECTIONS {
                        // Answered, not dropped: the admin reads why. One short
                        // line fits a fresh socket's buffer, so this never blocks.
                        let busy = Response::busy(format!(
                            "busy, try again: the daemon already serves {MAX_CONNECTIONS} control \
                             connections (each is closed after {}s without a request)",
                            IDLE_TIMEOUT.as_secs()
                        ));
                        let _ = stream.write(&busy.line());
                        continue;
                    }
                    let token = Token(self.first_token + self.next);
                    self.next = (self.next + 1) % 1_000_000;
                    if registry
                        .register(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        self.connections.insert(
                            token,
                            Connection {
                                stream,
                                awaiting: false,
                                input: Vec::new(),
                                output: Vec::new(),
                                written: 0,
                                deadline: Some(Instant::now() + IDLE_TIMEOUT),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket: {e}");
                    return;
                }
            }
        }
    }

    /// Closes the connections whose deadline has passed (one still waiting
    /// for its request is told why) and returns how long until the next
    /// deadline: the loop's poll timeout, so nothing polls on a timer.
    pub fn expire_idle(&mut self, registry: &Registry, now: Instant) -> Option<Duration> {
        let expired: Vec<Token> = self
            .connections
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            if let Some(conn) = self.connections.get_mut(&token) {
                if conn.output.is_empty() {
                    let why = Response::error(format!(
                        "no request within {}s; connection closed",
                        IDLE_TIMEOUT.as_secs()
                    ));
                    let _ = conn.stream.write(&why.line());
                }
            }
            self.close(registry, token);
        }
        self.connections
            .values()
            .filter_map(|c| c.deadline)
            .min()
            .map(|d| d.saturating_duration_since(now))
    }

    fn close(&mut self, registry: &Registry, token: Token) {
        if let Some(mut conn) = self.connections.remove(&token) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }

    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes pending output; true when all of it is out (or the peer is gone).
fn flush(conn: &mut Connection) -> io::Result<bool> {
    while conn.written < conn.output.len() {
        let rest = conn.output.get(conn.written..).unwrap_or_default();
        match conn.stream.write(rest) {
            Ok(0) => return Ok(true),
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(true),
        }
    }
    Ok(true)
}

/// A request the daemon does not understand is answered with an error, never
/// guessed at: a newer CLI's command must not run as something else.
fn parse(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| {
        format!("not a request this daemon understands ({e}); is the pbxmail CLI the same version as the daemon?")
    })
}

/// Client side, for the CLI: one request, one reply, bounded in time.
pub fn call(path: &Path, request: &Request) -> Result<Response, CallError> {
    use std::io::BufRead;
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            CallError::NotRunning(path.to_path_buf())
        }
        _ => CallError::Io(e),
    })?;
    let timeout = Some(std::time::Duration::from_secs(30));
    stream.set_read_timeout(timeout).map_err(CallError::Io)?;
    stream.set_write_timeout(timeout).map_err(CallError::Io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| CallError::Io(io::Error::other(e)))?;
    line.push(b'\n');
    // A daemon at its connection limit answers busy and closes before it
    // reads: the write may fail (EPIPE), but its answer is still there to read.
    let sent = (&stream).write_all(&line);
    let mut reply = String::new();
    let read = io::BufReader::new(&stream)
        .take(16 * 1024 * 1024)
        .read_line(&mut reply);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(CallError::Io(e)),
        (Ok(()), Ok(_)) => {}
    }
    serde_json::from_str(&reply).map_err(|e| {
        CallError::Io(io::Error::other(format!(
            "unreadable reply from the daemon: {e}"
        )))
    })
}

#[derive(Debug)]
pub enum CallError {
    /// Nobody listens on the control socket.
    NotRunning(PathBuf),
    Io(io::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotRunning(path) => write!(
                f,
                "the pbxmail daemon is not running (nothing listens on {}); start it with `systemctl start pbxmail`",
                path.display()
            ),
            CallError::Io(e) => write!(f, "talking to the daemon: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let hold = Request::Hold(Selection {
            tenant: None,
            ids: vec!["ABC".into()],
        });
        let text = serde_json::to_string(&hold).unwrap();
        assert_eq!(text, r#"{"command":"hold","tenant":null,"ids":["ABC"]}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), hold);
        let flush: Request = serde_json::from_str(r#"{"command":"flush"}"#).unwrap();
        assert_eq!(flush, Request::Flush { tenant: None });
    }

    #[test]
    fn an_unknown_or_garbled_request_is_an_error_not_a_status() {
        assert_eq!(parse(br#"{"command":"status"}"#), Ok(Request::Status));
        for line in [
            &br#"{"command":"explode"}"#[..],
            b"status",
            b"",
            b"{\"command\":",
        ] {
            let parsed = parse(line);
            assert!(
                parsed.is_err(),
                "{:?}: {parsed:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// Serves every event until a request comes out (or `tries` polls pass).
    fn next_request(
        poll: &mut mio::Poll,
        server: &mut ControlServer,
        tries: usize,
    ) -> Option<(Token, Request)> {
        let mut events = mio::Events::with_capacity(8);
        for _ in 0..tries {
            poll.poll(&mut events, Some(std::time::Duration::from_millis(200)))
                .unwrap();
            for event in events.iter() {
                for e in server.ready(poll.registry(), event.token()) {
                    if let Event::Request(token, request) = e {
                        return Some((token, request));
                    }
                }
            }
        }
        None
    }

    #[test]
    fn idle_connections_expire_at_their_deadline_and_one_past_the_limit_is_answered_busy() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("pbxmail-control-idle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("control.sock");
        let mut poll = mio::Poll::new().unwrap();
        let mut server = ControlServer::bind(&path, poll.registry(), Token(1), 10).unwrap();
        let idle: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        let extra = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut events = mio::Events::with_capacity(8);
        while server.connections.len() < MAX_CONNECTIONS {
            poll.poll(&mut events, Some(Duration::from_secs(5)))
                .unwrap();
            for event in events.iter() {
                server.ready(poll.registry(), event.token());
            }
        }
        // The one past the limit reads why, then the close.
        let mut line = String::new();
        io::BufReader::new(&extra).read_line(&mut line).unwrap();
        let busy: Response = serde_json::from_str(&line).unwrap();
        assert!(busy.busy && !busy.ok, "{line}");
        assert!(busy.error.unwrap().starts_with("busy, try again"));

        // Before the deadline nothing goes; the timeout left is at most IDLE_TIMEOUT.
        let now = Instant::now();
        let left = server.expire_idle(poll.registry(), now).unwrap();
        assert!(left <= IDLE_TIMEOUT);
        assert_eq!(server.connections.len(), MAX_CONNECTIONS);
        // At it, every idle connection is told and closed; none is left to wait for.
        assert_eq!(
            server.expire_idle(poll.registry(), now + IDLE_TIMEOUT),
            None
        );
        assert!(server.connections.is_empty());
        for client in &idle {
            let mut text = String::new();
            io::BufReader::new(client)
                .read_to_string(&mut text)
                .unwrap();
            assert!(text.contains("no request within"), "{text}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_answer_may_come_later_and_more_input_meanwhile_is_not_a_second_request() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("pbxmail-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("control.sock");
        let mut poll = mio::Poll::new().unwrap();
        let mut server = ControlServer::bind(&path, poll.registry(), Token(1), 10).unwrap();
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client.write_all(b"{\"command\":\"reload\"}\n").unwrap();
        let (token, request) = next_request(&mut poll, &mut server, 10).expect("a request");
        assert_eq!(request, Request::Reload);
        // The same line again, before the answer: not another request.
        client.write_all(b"{\"command\":\"reload\"}\n").unwrap();
        assert!(next_request(&mut poll, &mut server, 2).is_none());
        server.respond(
            poll.registry(),
            token,
            &Response::ok(serde_json::json!({"tenants": 1})),
        );
        let mut line = String::new();
        io::BufReader::new(&client).read_line(&mut line).unwrap();
        assert_eq!(line, "{\"ok\":true,\"result\":{\"tenants\":1}}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
