//! Scriptable OAuth 2.0 endpoint for integration tests: HTTPS/1.1 on
//! 127.0.0.1:0 with a `TestCa` certificate (valid for `localhost` and
//! 127.0.0.1), one thread per connection, one request per connection
//! (`Connection: close`). Each request is answered from a per-path queue of
//! scripted responses, else by a handler closure, else 404; every request is
//! recorded with its decoded form so tests can assert on what the client sent
//! (a GET's query is decoded the same way, for an authorization endpoint that
//! a test visits as the browser would).
//! It can be taken down (the listener closed: connection refused) and brought
//! back on the same port, which nothing else can take meanwhile. It judges
//! nothing itself.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::smtp_server::TestCa;

/// Longest request line or header line accepted.
const LINE_LIMIT: usize = 16 * 1024;
/// Most header lines per request.
const HEADER_LIMIT: usize = 100;
/// Largest request body accepted.
const BODY_LIMIT: usize = 1024 * 1024;
/// Idle limit per read or write, so connection threads always end.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// One HTTP request as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string ("/token").
    pub path: String,
    /// The query string after `?`, undecoded ("" if none).
    pub query: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body decoded as `application/x-www-form-urlencoded` (empty if it
    /// is not valid form syntax), pairs in order.
    pub form: Vec<(String, String)>,
    /// Index (from 0) of the connection it came on.
    pub connection: usize,
    /// When its last byte was read: for asserting a client's pacing.
    pub at: Instant,
}

impl Request {
    /// The first form value named `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The query string decoded as a form, pairs in order (empty if it is
    /// not valid form syntax).
    pub fn query_params(&self) -> Vec<(String, String)> {
        decode_form(&self.query).unwrap_or_default()
    }

    /// The first query parameter named `key`, decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query_params()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The form's `grant_type` ("" if none).
    pub fn grant_type(&self) -> &str {
        self.param("grant_type").unwrap_or("")
    }
}

/// A scripted answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
    /// More header lines, e.g. `Location` of a redirect.
    pub headers: Vec<(String, String)>,
    /// Wait this long before answering (or until the server is dropped).
    pub delay: Option<Duration>,
}

impl Response {
    /// `status` with `value` as an `application/json` body.
    pub fn json(status: u16, value: serde_json::Value) -> Response {
        Response {
            status,
            content_type: "application/json".to_string(),
            body: value.to_string(),
            headers: Vec::new(),
            delay: None,
        }
    }

    /// `status` with a `text/plain` body (e.g. a proxy's 503 page).
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain".to_string(),
            body: body.to_string(),
            headers: Vec::new(),
            delay: None,
        }
    }

    /// The RFC 6749 §5.2 error shape: HTTP 400 `{"error": code}`.
    pub fn error(code: &str) -> Response {
        Response::json(400, serde_json::json!({ "error": code }))
    }

    /// A token response (RFC 6749 §5.1).
    pub fn token(access: &str, expires_in: u64, refresh: Option<&str>) -> Response {
        let mut value = serde_json::json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": expires_in,
        });
        if let Some(refresh) = refresh {
            value["refresh_token"] = serde_json::Value::String(refresh.to_string());
        }
        Response::json(200, value)
    }

    /// HTTP 302 to `location` (an authorization endpoint's answer, RFC 6749 §4.1.2).
    pub fn redirect(location: &str) -> Response {
        let mut response = Response::text(302, "");
        response
            .headers
            .push(("Location".to_string(), location.to_string()));
        response
    }

    pub fn delayed(mut self, delay: Duration) -> Response {
        self.delay = Some(delay);
        self
    }
}

type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    scripted: HashMap<String, VecDeque<Response>>,
    handler: Option<Handler>,
    connections: usize,
    /// Connections whose TLS handshake failed (an untrusted certificate).
    tls_failures: usize,
    open: HashMap<usize, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

type Shared = super::observed::Shared<State>;

/// The accept loop of one listener.
struct Acceptor {
    /// Tells this loop (only) to return, handing back its listener.
    quit: Arc<AtomicBool>,
    thread: JoinHandle<TcpListener>,
}

/// What keeps the server's port bound.
enum Port {
    /// Listening: the accept loop owns the listener.
    Up(Acceptor),
    /// Not listening, but both ends of one connection the listener accepted
    /// before it closed are held: a connect is refused, yet the port stays
    /// bound, so neither a parallel test's `bind(0)` nor a connection's
    /// source port can take it before `up()` (as `harness::closed_port`).
    Down {
        client: TcpStream,
        server: TcpStream,
    },
}

/// A running endpoint; dropping it closes the listener and every open
/// connection and joins its threads.
pub struct OAuthServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Arc<ServerConfig>,
    /// None only while `down` or `up` is changing it.
    port: Mutex<Option<Port>>,
}

impl OAuthServer {
    /// Answers 404 to everything not scripted with `push` or `set_handler`.
    pub fn start(ca: &TestCa) -> OAuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener address");
        let server = OAuthServer {
            addr,
            shared: Arc::new(Shared::new(State::default())),
            tls: ca.server_config(),
            port: Mutex::new(None),
        };
        let acceptor = server.spawn_acceptor(listener);
        *server.lock_port() = Some(Port::Up(acceptor));
        server
    }

    /// `start` with `handler` answering what no queue does.
    pub fn start_with(
        ca: &TestCa,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> OAuthServer {
        let server = OAuthServer::start(ca);
        server.set_handler(handler);
        server
    }

    fn spawn_acceptor(&self, listener: TcpListener) -> Acceptor {
        let quit = Arc::new(AtomicBool::new(false));
        let loop_quit = Arc::clone(&quit);
        let shared = Arc::clone(&self.shared);
        let tls = Arc::clone(&self.tls);
        let thread = thread::Builder::new()
            .name(format!("oauth-test:{}", self.addr.port()))
            .spawn(move || accept_loop(listener, shared, tls, loop_quit))
            .expect("spawn accept thread");
        Acceptor { quit, thread }
    }

    fn lock_port(&self) -> MutexGuard<'_, Option<Port>> {
        self.port.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the accept loop and takes its listener back (Err if the loop
    /// panicked).
    fn stop_acceptor(&self, acceptor: Acceptor) -> thread::Result<TcpListener> {
        acceptor.quit.store(true, Ordering::SeqCst);
        // Wake the blocking accept(); the loop sees `quit` and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        acceptor.thread.join()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `https://localhost:PORT{path}` (the certificate's name).
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Replaces the handler (answers requests no queue answers).
    pub fn set_handler(&self, handler: impl Fn(&Request) -> Response + Send + Sync + 'static) {
        self.shared.lock().handler = Some(Arc::new(handler));
    }

    /// Queues `response` as the next answer for `path`; queued answers are
    /// used in order, before the handler.
    pub fn push(&self, path: &str, response: Response) {
        self.shared
            .lock()
            .scripted
            .entry(path.to_string())
            .or_default()
            .push_back(response);
    }

    /// Scripted answers for `path` not yet used.
    pub fn pending(&self, path: &str) -> usize {
        self.shared
            .lock()
            .scripted
            .get(path)
            .map_or(0, VecDeque::len)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// The requests to `path`, in order.
    pub fn requests_to(&self, path: &str) -> Vec<Request> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// How many requests `path` got.
    pub fn count(&self, path: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Waits until `path` got at least `n` requests or `timeout` passed;
    /// returns them.
    pub fn wait_for_requests(&self, path: &str, n: usize, timeout: Duration) -> Vec<Request> {
        let matching = |s: &State| -> Vec<Request> {
            s.requests
                .iter()
                .filter(|r| r.path == path)
                .cloned()
                .collect()
        };
        self.shared
            .wait_until(timeout, |s| matching(s).len() >= n, matching)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Connections whose TLS handshake failed.
    pub fn tls_failures(&self) -> usize {
        self.shared.lock().tls_failures
    }

    /// Closes the listener: connects are refused until `up()`, and the port
    /// stays reserved for it. Connections already open are finished normally;
    /// any not yet accepted are closed.
    pub fn down(&self) {
        let mut port = self.lock_port();
        let acceptor = match port.take() {
            Some(Port::Up(acceptor)) => acceptor,
            other => {
                *port = other;
                return;
            }
        };
        let listener = self
            .stop_acceptor(acceptor)
            .expect("accept thread panicked");
        let client = TcpStream::connect(self.addr).expect("connect to hold the port");
        let own = client.local_addr().expect("holding connection's address");
        // Others may be queued before ours (a client of the test, the wake-up
        // connect): closing them is what going down does to them anyway.
        let server = loop {
            let (server, peer) = listener.accept().expect("accept the holding connection");
            if peer == own {
                break server;
            }
        };
        drop(listener);
        *port = Some(Port::Down { client, server });
    }

    /// Listens again on the same port.
    pub fn up(&self) {
        let mut port = self.lock_port();
        let Some(Port::Down { client, server }) = port.take() else {
            return;
        };
        // The client closes first, so the TIME_WAIT is on its side; were one
        // left on the server's port, std's SO_REUSEADDR (on Unix) still lets
        // the bind below succeed.
        drop(client);
        drop(server);
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() >= deadline => {
                    panic!("re-bind {}: {e}", self.addr)
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        *port = Some(Port::Up(self.spawn_acceptor(listener)));
    }

    pub fn is_up(&self) -> bool {
        matches!(*self.lock_port(), Some(Port::Up(_)))
    }

    /// Drop by another name, for readability in tests.
    pub fn stop(self) {}
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        // Wakes delayed responses too, without a lost wake-up (see `stop`).
        self.shared.stop();
        if let Some(Port::Up(acceptor)) = self.lock_port().take() {
            let _ = self.stop_acceptor(acceptor);
        }
        let threads = {
            let mut state = self.shared.lock();
            for sock in state.open.values() {
                let _ = sock.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut state.threads)
        };
        for handle in threads {
            let _ = handle.join();
        }
    }
}

/// Serves connections until told to quit (by `quit` or the whole server
/// stopping); then returns the listener, still bound.
fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Arc<ServerConfig>,
    quit: Arc<AtomicBool>,
) -> TcpListener {
    loop {
        let incoming = listener.accept();
        if quit.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst) {
            return listener;
        }
        let Ok((tcp, _)) = incoming else { continue };
        let Ok(registered) = tcp.try_clone() else {
            continue;
        };
        let mut state = shared.lock();
        let index = state.connections;
        state.connections += 1;
        state.open.insert(index, registered);
        let conn_shared = Arc::clone(&shared);
        let conn_tls = Arc::clone(&tls);
        let spawned = thread::Builder::new()
            .name(format!("oauth-test-conn:{index}"))
            .spawn(move || {
                let _ = serve(tcp, index, &conn_shared, &conn_tls);
                conn_shared.update(|s| {
                    s.open.remove(&index);
                });
            });
        match spawned {
            Ok(handle) => state.threads.push(handle),
            Err(_) => {
                state.open.remove(&index);
            }
        }
        drop(state);
        shared.changed.notify_all();
    }
}

/// One connection: TLS handshake, one request, one response, close.
fn serve(
    mut tcp: TcpStream,
    index: usize,
    shared: &Shared,
    tls: &Arc<ServerConfig>,
) -> io::Result<()> {
    tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    tcp.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    let _ = tcp.set_nodelay(true);
    let mut conn = ServerConnection::new(Arc::clone(tls)).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            shared.update(|s| s.tls_failures += 1);
            return Err(e);
        }
    }
    let mut reader = BufReader::new(StreamOwned::new(conn, tcp));
    let Some(mut request) = read_request(&mut reader)? else {
        return Ok(());
    };
    request.connection = index;
    let response = {
        let mut state = shared.lock();
        state.requests.push(request.clone());
        let queued = state
            .scripted
            .get_mut(&request.path)
            .and_then(VecDeque::pop_front);
        let handler = state.handler.clone();
        drop(state);
        shared.changed.notify_all();
        match (queued, handler) {
            (Some(r), _) => r,
            (None, Some(h)) => h(&request),
            (None, None) => Response::json(404, serde_json::json!({"error": "not_found"})),
        }
    };
    if let Some(delay) = response.delay {
        tarpit(shared, delay);
    }
    let extra: String = response
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{extra}Connection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    let stream = reader.get_mut();
    stream.write_all(format!("{head}{}", response.body).as_bytes())?;
    stream.flush()?;
    stream.conn.send_close_notify();
    let _ = stream.flush();
    let _ = stream.sock.shutdown(Shutdown::Write);
    // Let the client read everything before the socket closes (a close with
    // unread input would reset the connection).
    let mut sink = [0u8; 1024];
    while matches!(stream.sock.read(&mut sink), Ok(n) if n > 0) {}
    Ok(())
}

/// Waits `delay`, or less if the server is being dropped.
fn tarpit(shared: &Shared, delay: Duration) {
    let deadline = Instant::now() + delay;
    let mut state = shared.lock();
    loop {
        let now = Instant::now();
        if now >= deadline || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        state = shared
            .changed
            .wait_timeout(state, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// One line without CRLF, bounded; None at EOF before any byte.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(LINE_LIMIT as u64 + 2)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or cut",
        ));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Request line, headers, and a body by Content-Length or chunked.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let Some(line) = read_line(reader)? else {
        return Ok(None);
    };
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(_version)) = (words.next(), words.next(), words.next())
    else {
        return Err(bad("malformed request line"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| bad("EOF in headers"))?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= HEADER_LIMIT {
            return Err(bad("too many headers"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("malformed header"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        read_chunked(reader)?
    } else {
        let length: usize = match header("content-length") {
            Some(v) => v.parse().map_err(|_| bad("bad Content-Length"))?,
            None => 0,
        };
        if length > BODY_LIMIT {
            return Err(bad("body too large"));
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    };
    let form = decode_form(&String::from_utf8_lossy(&body)).unwrap_or_default();
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body,
        form,
        connection: 0,
        at: Instant::now(),
    }))
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| bad("EOF in chunk size"))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while let Some(line) = read_line(reader)? {
                if line.is_empty() {
                    break;
                }
            }
            return Ok(body);
        }
        if body.len() + size > BODY_LIMIT {
            return Err(bad("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        read_line(reader)?;
    }
}

/// `application/x-www-form-urlencoded` (WHATWG URL §5.1): `&`-separated
/// pairs, `+` is a space, `%XX` a byte; None on a bad escape or non-UTF-8.
pub fn decode_form(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for part in text.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        pairs.push((percent_decode(key)?, percent_decode(value)?));
    }
    Some(pairs)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}
