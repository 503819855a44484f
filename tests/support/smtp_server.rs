//! Scriptable SMTP server for integration tests: listens on 127.0.0.1:0, speaks
//! plain, STARTTLS or implicit-TLS SMTP with scripted replies and faults, and
//! records what arrived. It is the far end of the daemon's relay connections; it
//! judges nothing itself, tests assert on `messages()`, `commands()` and counters.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// Longest command line accepted (RFC 5321 §4.5.3.1.4 says 512; be generous).
const COMMAND_LINE_LIMIT: usize = 64 * 1024;
/// Longest body line accepted; RFC 5321 says 1000, but the test server should
/// record a misbehaving client's body rather than cut it off.
const BODY_LINE_LIMIT: usize = 4 * 1024 * 1024;
/// How much of an overlong line is read and discarded before closing.
const DRAIN_LIMIT: u64 = 1024 * 1024;
/// Idle limit per read or write, so connection threads always end.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// Which server certificate a `TestServer` presents; all are signed by its
/// `TestCa`, so only the named flaw is wrong with each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CertKind {
    /// For `localhost`, `127.0.0.1` and `::1`, valid now.
    #[default]
    Valid,
    /// Same names, but valid only during 2001.
    Expired,
    /// Valid now, but only for `wrong.invalid`.
    WrongName,
}

/// A throwaway certificate authority and server certificates it signed (see
/// `CertKind`). Fresh keys on every `new()`.
pub struct TestCa {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    valid: Leaf,
    expired: Leaf,
    wrong_name: Leaf,
}

/// A server certificate and its PKCS#8 key.
struct Leaf {
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("empty SAN list is valid");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pbxmail test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().expect("generate CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let local = ["localhost", "127.0.0.1", "::1"];

        TestCa {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            valid: leaf(&issuer, &local, false),
            expired: leaf(&issuer, &local, true),
            wrong_name: leaf(&issuer, &["wrong.invalid"], false),
        }
    }

    /// DER of the CA certificate, for building a client `RootCertStore` in tests.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    pub fn write_ca_pem(&self, path: &Path) {
        fs::write(path, &self.ca_pem).expect("write CA PEM");
    }

    /// Server config presenting the valid leaf certificate followed by
    /// nothing else: the client must trust the CA itself.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config_with(CertKind::Valid)
    }

    /// Server config presenting the leaf certificate of the given kind.
    pub fn server_config_with(&self, kind: CertKind) -> Arc<ServerConfig> {
        let leaf = match kind {
            CertKind::Valid => &self.valid,
            CertKind::Expired => &self.expired,
            CertKind::WrongName => &self.wrong_name,
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pkcs8.clone()));
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_no_client_auth()
                .with_single_cert(vec![leaf.cert.clone()], key)
                .expect("server certificate and key match");
        Arc::new(config)
    }
}

/// Signs a server certificate for `names`; `expired` puts its validity in 2001.
fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, names: &[&str], expired: bool) -> Leaf {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names.clone()).expect("valid SANs");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0].as_str());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 12, 31);
    }
    let key = rcgen::KeyPair::generate().expect("generate server key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("sign server certificate");
    Leaf {
        cert: cert.der().clone(),
        key_pkcs8: key.serialize_der(),
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// How the server offers TLS. Named like the daemon's `TlsMode` variants.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tls {
    None,
    StartTls,
    /// TLS from the first byte (port-465 style).
    Implicit,
}

/// The script for one server; every connection follows it.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub tls: Tls,
    /// Offer (and accept) STARTTLS. Only meaningful with `Tls::StartTls`; when
    /// false the command is refused with 502 although TLS is configured.
    pub advertise_starttls: bool,
    /// false = black hole: accept TCP, never send a byte, hold the socket open
    /// until the server is dropped.
    pub greet: bool,
    /// (user, password). Advertised as `AUTH PLAIN LOGIN` (with `Tls::StartTls`
    /// only once in TLS); MAIL before a successful AUTH gets 530.
    pub require_auth: Option<(String, String)>,
    /// Reply 500 to EHLO so the client has to fall back to HELO.
    pub refuse_ehlo: bool,
    /// End every reply line with a bare LF instead of CRLF (scripted `Fault`
    /// replies too, embedded line ends included), as some broken relays do.
    /// `inject_after_starttls` bytes are still sent exactly as given.
    pub bare_lf_replies: bool,
    /// Reply sent for every RCPT instead of 250 (a 2xx reply still accepts).
    pub rcpt_reply: Option<String>,
    /// Per-recipient overrides (address compared case-insensitively, without <>).
    pub rcpt_reply_for: Vec<(String, String)>,
    /// Reply to MAIL instead of 250 (a non-2xx reply leaves no transaction open).
    pub mail_reply: Option<String>,
    /// Final reply after the body's "."; only 2xx replies record a message.
    pub data_reply: Option<String>,
    /// Answer DATA 354 even when no recipient was accepted (as a server may
    /// when DATA came pipelined, RFC 2920 §3.1), and take the body; a 2xx
    /// final reply then records it with no recipients. Off: 554.
    pub data_without_recipients: bool,
    /// Greeting line, default "220 test.invalid ESMTP".
    pub greeting: Option<String>,
    /// First word of the EHLO reply.
    pub hostname: String,
    /// Advertise PIPELINING. The server answers pipelined commands in order
    /// either way; `command_log()` shows whether the client pipelined.
    pub pipelining: bool,
    /// Advertise 8BITMIME.
    pub eight_bit_mime: bool,
    /// Advertise SMTPUTF8.
    pub smtputf8: bool,
    /// Advertise CHUNKING and accept BDAT (RFC 3030); without it BDAT is an
    /// unknown command.
    pub chunking: bool,
    /// Advertised as `SIZE n`; a MAIL with a larger SIZE= gets 552. None: no
    /// SIZE extension at all.
    pub size_limit: Option<u64>,
    /// SASL mechanisms advertised after `AUTH`, in this order; others get 504.
    pub auth_mechanisms: Vec<String>,
    /// Accepted recipients per transaction; further RCPTs get
    /// `452 4.5.3 Too many recipients`.
    pub max_rcpts_per_transaction: Option<usize>,
    /// Reply to STARTTLS instead of 220; no TLS follows and the session goes on.
    pub starttls_reply: Option<String>,
    /// Bytes written right after the STARTTLS 220 line, in the same write
    /// (a response-injection attempt); the server then waits for a handshake.
    pub inject_after_starttls: Option<String>,
    /// Answer STARTTLS with 220 and then never take part in the handshake:
    /// hold the socket, discarding input, until the client goes.
    pub stall_after_starttls: bool,
    /// Faults by command: (verb, n, fault) applies `fault` to the n-th (from 1)
    /// occurrence of `verb` over the server's lifetime, counted across all
    /// connections. Verbs are upper-case command words ("MAIL", "RCPT",
    /// "DATA", "BDAT", "STARTTLS", ...) or "." for the reply after a DATA body.
    /// For XOAUTH2/OAUTHBEARER, a non-2xx `Reply` fault on "AUTH" is the
    /// answer to the initial response, whatever the token.
    pub faults: Vec<(String, usize, Fault)>,
    /// The certificate presented in TLS (needs a `TestCa`).
    pub cert: CertKind,
    /// Bearer tokens accepted by `AUTH XOAUTH2` / `AUTH OAUTHBEARER`. When
    /// non-empty, `XOAUTH2` is advertised (after `auth_mechanisms` if
    /// `require_auth` is also set) and MAIL before a successful AUTH gets 530.
    /// A refused token gets `334 <base64 JSON error>`, then, after the
    /// client's answer, `535 5.7.8` (Gmail's and Microsoft's behaviour).
    pub oauth_tokens: Vec<String>,
    /// The only user the OAuth mechanisms accept (`user=` of XOAUTH2, `a=` of
    /// OAUTHBEARER); None: any user.
    pub oauth_user: Option<String>,
    /// Also advertise `OAUTHBEARER` (RFC 7628), before `XOAUTH2`.
    pub offer_oauthbearer: bool,
    /// With `Tls::StartTls`: the EHLO keywords of the plaintext session (the
    /// lines after the hostname), instead of those the options above imply;
    /// `STARTTLS` is added when offered. The EHLO in TLS follows the options
    /// as usual. What the server accepts does not change: BDAT, say, is
    /// taken only with `chunking`, and a MAIL's SIZE= is held against
    /// `size_limit`. None: the same keywords before and after STARTTLS.
    pub ehlo_before_tls: Option<Vec<String>>,
}

/// A misbehaviour scripted for one command (see `ServerOptions::faults`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// This reply line (CRLF added) instead of the normal one; the server's
    /// state follows it as if it were its own (a 2xx accepts).
    Reply(String),
    /// Like `Reply`, but written twice in one write: the second copy is a
    /// reply nobody asked for.
    ReplyTwice(String),
    /// Close the connection without replying.
    Disconnect,
    /// Tarpit: wait this long (or until the server is dropped), then go on normally.
    Delay(Duration),
}

/// One command line as received (see `TestServer::command_log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRecord {
    pub connection: usize,
    pub line: String,
    /// More input had already arrived when this line was read: the client
    /// sent what follows without waiting for this command's reply.
    pub pipelined: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            tls: Tls::None,
            advertise_starttls: true,
            greet: true,
            require_auth: None,
            refuse_ehlo: false,
            bare_lf_replies: false,
            rcpt_reply: None,
            rcpt_reply_for: Vec::new(),
            mail_reply: None,
            data_reply: None,
            data_without_recipients: false,
            greeting: None,
            hostname: "test.invalid".to_string(),
            pipelining: true,
            eight_bit_mime: true,
            smtputf8: false,
            chunking: false,
            size_limit: Some(52_428_800),
            auth_mechanisms: vec!["PLAIN".to_string(), "LOGIN".to_string()],
            max_rcpts_per_transaction: None,
            starttls_reply: None,
            inject_after_starttls: None,
            stall_after_starttls: false,
            faults: Vec::new(),
            cert: CertKind::Valid,
            oauth_tokens: Vec::new(),
            oauth_user: None,
            offer_oauthbearer: false,
            ehlo_before_tls: None,
        }
    }
}

impl ServerOptions {
    fn starttls_offered(&self) -> bool {
        self.tls == Tls::StartTls && self.advertise_starttls
    }

    fn oauth_enabled(&self) -> bool {
        !self.oauth_tokens.is_empty()
    }

    /// Some AUTH must succeed before MAIL.
    fn auth_required(&self) -> bool {
        self.require_auth.is_some() || self.oauth_enabled()
    }

    /// The mechanisms after `AUTH` in the EHLO reply, in order.
    fn advertised_mechanisms(&self) -> Vec<String> {
        let mut mechanisms = Vec::new();
        if self.require_auth.is_some() {
            mechanisms.extend(self.auth_mechanisms.iter().cloned());
        }
        if self.oauth_enabled() {
            if self.offer_oauthbearer {
                mechanisms.push("OAUTHBEARER".to_string());
            }
            mechanisms.push("XOAUTH2".to_string());
        }
        mechanisms
    }
}

/// The error a refused bearer token gets in the 334 challenge: base64 of
/// `{"status":"401"}`.
pub const OAUTH_ERROR_CHALLENGE: &str = "334 eyJzdGF0dXMiOiI0MDEifQ==";

/// One `AUTH XOAUTH2` / `AUTH OAUTHBEARER` exchange (see `TestServer::oauth_attempts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthAttempt {
    pub connection: usize,
    /// "XOAUTH2" or "OAUTHBEARER".
    pub mechanism: String,
    /// The decoded initial response, exactly as sent (\x01 separators included).
    pub decoded: String,
    /// `user=` (XOAUTH2) or `a=` (OAUTHBEARER); None when absent or malformed.
    pub user: Option<String>,
    /// The bearer token; None when absent or malformed.
    pub token: Option<String>,
    /// `host=` and `port=` of OAUTHBEARER.
    pub host: Option<String>,
    pub port: Option<String>,
    pub accepted: bool,
    /// After a refusal: the line the client answered the error challenge
    /// with ("" for XOAUTH2, "AQ==" for OAUTHBEARER per RFC 7628 §3.2.3).
    pub client_ack: Option<String>,
}

/// One accepted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub mail_from: String,
    /// Only the recipients the server accepted (2xx), in order.
    pub rcpt_to: Vec<String>,
    /// Body as received, dot-stuffing removed, without the final ".\r\n". Line
    /// ends are kept as sent (CRLF from a compliant client).
    pub data: Vec<u8>,
    pub tls: bool,
    pub auth_user: Option<String>,
    /// Index (from 0) of the TCP connection it came on.
    pub connection: usize,
    /// Parameters of its MAIL command after the path, as sent ("SIZE=12 BODY=8BITMIME").
    pub mail_params: String,
    /// Came in BDAT chunks (CHUNKING) rather than DATA.
    pub bdat: bool,
    /// The bearer token of the session's successful XOAUTH2/OAUTHBEARER AUTH.
    pub auth_token: Option<String>,
    /// The SASL mechanism of the session's successful AUTH.
    pub auth_mechanism: Option<String>,
}

impl Received {
    /// The body as text (lossy), for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

#[derive(Default)]
struct State {
    messages: Vec<Received>,
    connections: usize,
    tls_handshakes: usize,
    commands: Vec<CommandRecord>,
    oauth_attempts: Vec<OAuthAttempt>,
    /// Occurrences of each verb so far, for `ServerOptions::faults`.
    verbs_seen: HashMap<String, usize>,
    /// Clones of open client sockets, so drop can shut them down.
    open: HashMap<usize, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

type Shared = super::observed::Shared<State>;

/// A running server; dropping it stops accepting, closes client sockets and
/// joins its threads.
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// `ca` is required when `opts.tls` is not `Tls::None`.
    pub fn start(opts: ServerOptions, ca: Option<&TestCa>) -> TestServer {
        let tls_config = match opts.tls {
            Tls::None => None,
            Tls::StartTls | Tls::Implicit => Some(
                ca.expect("TestServer::start: a TestCa is required when tls != None")
                    .server_config_with(opts.cert),
            ),
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared::new(State::default()));
        let config = Arc::new(ConnConfig {
            opts,
            tls: tls_config,
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("smtp-test:{}", addr.port()))
            .spawn(move || accept_loop(listener, accept_shared, config))
            .expect("spawn accept thread");
        TestServer {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn messages(&self) -> Vec<Received> {
        self.shared.lock().messages.clone()
    }

    /// Waits until at least `n` messages arrived or `timeout` passed; returns
    /// whatever has arrived.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.shared
            .wait_until(timeout, |s| s.messages.len() >= n, |s| s.messages.clone())
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Waits until at least `n` connections were accepted or `timeout` passed;
    /// returns the count.
    pub fn wait_for_connections(&self, n: usize, timeout: Duration) -> usize {
        self.shared
            .wait_until(timeout, |s| s.connections >= n, |s| s.connections)
    }

    /// Waits until no client connection is open (the client said QUIT or
    /// hung up) or `timeout` passed; returns whether the server is idle.
    /// A test that checks "nothing more is said" waits for this first: the
    /// spool records a result before the session's RSET and QUIT.
    pub fn wait_for_idle(&self, timeout: Duration) -> bool {
        self.shared
            .wait_until(timeout, |s| s.open.is_empty(), |s| s.open.is_empty())
    }

    /// Completed TLS handshakes (STARTTLS and implicit).
    pub fn tls_handshakes(&self) -> usize {
        self.shared.lock().tls_handshakes
    }

    /// Every command line received, with its connection index, in order.
    /// AUTH continuation lines are included as sent; body lines are not.
    pub fn commands(&self) -> Vec<(usize, String)> {
        self.shared
            .lock()
            .commands
            .iter()
            .map(|c| (c.connection, c.line.clone()))
            .collect()
    }

    /// Like `commands()`, with whether each line arrived pipelined.
    pub fn command_log(&self) -> Vec<CommandRecord> {
        self.shared.lock().commands.clone()
    }

    /// Every XOAUTH2/OAUTHBEARER exchange, in order.
    pub fn oauth_attempts(&self) -> Vec<OAuthAttempt> {
        self.shared.lock().oauth_attempts.clone()
    }

    /// Waits until `verb` has occurred at least `n` times over the server's
    /// lifetime or `timeout` passed; returns the count. Occurrences are
    /// counted as `ServerOptions::faults` counts them, before the fault
    /// applies: "." is a DATA body that arrived complete, so a test sees a
    /// tarpitted final reply (`Fault::Delay` on ".") begin.
    pub fn wait_for_verb(&self, verb: &str, n: usize, timeout: Duration) -> usize {
        let verb = verb.to_ascii_uppercase();
        let count = |s: &State| s.verbs_seen.get(&verb).copied().unwrap_or(0);
        self.shared.wait_until(timeout, |s| count(s) >= n, count)
    }

    /// Waits until a command line starting with `prefix` (case-insensitive)
    /// has arrived or `timeout` passed; returns whether one did.
    pub fn wait_for_command(&self, prefix: &str, timeout: Duration) -> bool {
        let prefix = prefix.to_ascii_uppercase();
        let seen = |s: &State| {
            s.commands
                .iter()
                .any(|c| c.line.to_ascii_uppercase().starts_with(&prefix))
        };
        self.shared.wait_until(timeout, seen, seen)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Wakes tarpitted connections (Fault::Delay) too.
        self.shared.stop();
        // Wake the blocking accept(); the loop sees `stopping` and exits.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(handle) = self.accept_thread.take() {
            let _ = handle.join();
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

struct ConnConfig {
    opts: ServerOptions,
    tls: Option<Arc<ServerConfig>>,
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, config: Arc<ConnConfig>) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(tcp) = incoming else { continue };
        let Ok(registered) = tcp.try_clone() else {
            continue;
        };
        let mut state = shared.lock();
        let index = state.connections;
        state.connections += 1;
        state.open.insert(index, registered);
        let conn_shared = Arc::clone(&shared);
        let conn_config = Arc::clone(&config);
        let spawned = thread::Builder::new()
            .name(format!("smtp-test-conn:{index}"))
            .spawn(move || {
                serve(tcp, index, &conn_shared, &conn_config);
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

/// The socket under the SMTP conversation, before or after TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Runs a full server-side handshake; `None` if it failed (the connection ends).
fn tls_accept(
    mut tcp: TcpStream,
    config: &Arc<ServerConfig>,
    shared: &Shared,
) -> Option<StreamOwned<ServerConnection, TcpStream>> {
    let mut conn = ServerConnection::new(Arc::clone(config)).ok()?;
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            return None;
        }
    }
    shared.update(|s| s.tls_handshakes += 1);
    Some(StreamOwned::new(conn, tcp))
}

fn serve(tcp: TcpStream, index: usize, shared: &Shared, config: &ConnConfig) {
    if !config.opts.greet {
        black_hole(tcp);
        return;
    }
    let _ = tcp.set_read_timeout(Some(SOCKET_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(SOCKET_TIMEOUT));
    let _ = tcp.set_nodelay(true);
    let stream = match (&config.opts.tls, &config.tls) {
        (Tls::Implicit, Some(tls)) => match tls_accept(tcp, tls, shared) {
            Some(s) => Stream::Tls(Box::new(s)),
            None => return,
        },
        _ => Stream::Plain(tcp),
    };
    // Any I/O error simply ends this connection; the server itself lives on.
    let _ = Session::new(stream, index, shared, config).run();
}

/// Holds the socket without ever writing; returns when the client closes or the
/// server is dropped (which shuts the socket down).
fn black_hole(mut tcp: TcpStream) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = tcp.read(&mut sink) {
        if n == 0 {
            return;
        }
    }
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads one line (LF or CRLF terminated) of at most `limit` bytes, without its
/// terminator.
fn read_line(reader: &mut impl BufRead, limit: usize) -> io::Result<Line> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(limit as u64 + 2)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() != Some(&b'\n') {
        // Either the client hung up mid-line or the line is over the limit.
        return Ok(if buf.len() > limit {
            Line::TooLong
        } else {
            Line::Eof
        });
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.len() > limit {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text(buf))
}

/// What the command loop does after a command.
enum Next {
    Continue,
    StartTls,
    /// Said 220 to STARTTLS but will not shake hands (`stall_after_starttls`).
    Stall,
    Close,
}

struct Session<'a> {
    reader: BufReader<Stream>,
    index: usize,
    shared: &'a Shared,
    config: &'a ConnConfig,
    in_tls: bool,
    greeted: bool,
    auth_user: Option<String>,
    auth_token: Option<String>,
    auth_mechanism: Option<String>,
    mail_from: Option<String>,
    mail_params: String,
    rcpt_to: Vec<String>,
    /// BDAT chunks of the open transaction.
    chunks: Vec<u8>,
    /// The scripted reply fault of the command being handled; the next
    /// `reply()` uses (and consumes) it.
    fault: Option<Fault>,
}

impl<'a> Session<'a> {
    fn new(stream: Stream, index: usize, shared: &'a Shared, config: &'a ConnConfig) -> Self {
        Session {
            in_tls: matches!(stream, Stream::Tls(_)),
            reader: BufReader::new(stream),
            index,
            shared,
            config,
            greeted: false,
            auth_user: None,
            auth_token: None,
            auth_mechanism: None,
            mail_from: None,
            mail_params: String::new(),
            rcpt_to: Vec::new(),
            chunks: Vec::new(),
            fault: None,
        }
    }

    fn run(mut self) -> io::Result<()> {
        let greeting = self
            .config
            .opts
            .greeting
            .clone()
            .unwrap_or_else(|| "220 test.invalid ESMTP".to_string());
        self.reply(&greeting)?;
        loop {
            let line = match self.read_command()? {
                Some(line) => line,
                None => return Ok(()),
            };
            match self.command(&line)? {
                Next::Continue => {}
                Next::Close => return Ok(()),
                Next::Stall => {
                    self.hold();
                    return Ok(());
                }
                Next::StartTls => self = self.upgrade()?,
            }
        }
    }

    fn opts(&self) -> &ServerOptions {
        &self.config.opts
    }

    /// Writes one reply (CRLF added) in one write, or the scripted fault's
    /// reply instead: a reply split over two segments stalls on Nagle plus
    /// delayed ACK.
    fn reply(&mut self, line: &str) -> io::Result<()> {
        let (text, times) = match self.fault.take() {
            Some(Fault::Reply(text)) => (text, 1),
            Some(Fault::ReplyTwice(text)) => (text, 2),
            _ => (line.to_string(), 1),
        };
        let wire = self.line_ends(format!("{text}\r\n").repeat(times));
        self.write_raw(wire.as_bytes())
    }

    /// `text` with the line ends this server writes: CRLF as given, or bare
    /// LF with `bare_lf_replies`.
    fn line_ends(&self, text: String) -> String {
        if self.opts().bare_lf_replies {
            text.replace("\r\n", "\n")
        } else {
            text
        }
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// The reply the current command will get: the fault script's, else `default`.
    fn scripted(&self, default: String) -> String {
        match &self.fault {
            Some(Fault::Reply(text) | Fault::ReplyTwice(text)) => text.clone(),
            _ => default,
        }
    }

    /// Counts this occurrence of `verb` (waking `wait_for_verb`) and returns
    /// the fault scripted for it.
    fn fault_for(&self, verb: &str) -> Option<Fault> {
        let mut nth = 0;
        self.shared.update(|s| {
            let seen = s.verbs_seen.entry(verb.to_string()).or_insert(0);
            *seen += 1;
            nth = *seen;
        });
        self.opts()
            .faults
            .iter()
            .find(|(v, n, _)| v.eq_ignore_ascii_case(verb) && *n == nth)
            .map(|(_, _, fault)| fault.clone())
    }

    /// Applies the fault scripted for this occurrence of `verb`: returns
    /// false if the connection is to be dropped; a reply fault is kept for
    /// the next `reply()`.
    fn begin(&mut self, verb: &str) -> bool {
        self.fault = None;
        match self.fault_for(verb) {
            Some(Fault::Disconnect) => {
                let _ = self.tcp().shutdown(Shutdown::Both);
                false
            }
            Some(Fault::Delay(delay)) => {
                self.tarpit(delay);
                !self.shared.stopping.load(Ordering::SeqCst)
            }
            other => {
                self.fault = other;
                true
            }
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self.reader.get_ref() {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.sock,
        }
    }

    /// Waits `delay`, or less if the server is being dropped.
    fn tarpit(&self, delay: Duration) {
        let deadline = Instant::now() + delay;
        let mut state = self.shared.lock();
        loop {
            let now = Instant::now();
            if now >= deadline || self.shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Holds the connection without answering, discarding input, until the
    /// client hangs up or the server is dropped.
    fn hold(&mut self) {
        let mut sink = [0u8; 4096];
        while let Ok(n) = self.reader.get_mut().read(&mut sink) {
            if n == 0 {
                return;
            }
        }
    }

    /// Reads and records one command line; `None` at EOF or after a too-long line.
    fn read_command(&mut self) -> io::Result<Option<String>> {
        match read_line(&mut self.reader, COMMAND_LINE_LIMIT)? {
            Line::Eof => Ok(None),
            Line::TooLong => {
                self.refuse_long_line()?;
                Ok(None)
            }
            Line::Text(bytes) => {
                let line = String::from_utf8_lossy(&bytes).into_owned();
                let record = CommandRecord {
                    connection: self.index,
                    line: line.clone(),
                    pipelined: !self.reader.buffer().is_empty(),
                };
                self.shared.update(|s| s.commands.push(record));
                Ok(Some(line))
            }
        }
    }

    /// Replies 500 before the connection is closed, eating the rest of the
    /// line (bounded) so the close does not reset the connection before the
    /// client has read the reply.
    fn refuse_long_line(&mut self) -> io::Result<()> {
        self.reply("500 5.5.2 Line too long")?;
        let mut rest = Vec::new();
        let _ = (&mut self.reader)
            .take(DRAIN_LIMIT)
            .read_until(b'\n', &mut rest);
        Ok(())
    }

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.mail_params.clear();
        self.rcpt_to.clear();
        self.chunks.clear();
    }

    fn auth_offered(&self) -> bool {
        self.opts().auth_required() && (self.opts().tls != Tls::StartTls || self.in_tls)
    }

    fn command(&mut self, line: &str) -> io::Result<Next> {
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
            None => (line.trim().to_ascii_uppercase(), ""),
        };
        if !self.begin(&verb) {
            return Ok(Next::Close);
        }
        let next = self.dispatch(&verb, arg);
        self.fault = None;
        next
    }

    fn dispatch(&mut self, verb: &str, arg: &str) -> io::Result<Next> {
        match verb {
            "EHLO" => self.ehlo()?,
            "HELO" => {
                self.greeted = true;
                self.reset_transaction();
                let hostname = self.opts().hostname.clone();
                self.reply(&format!("250 {hostname}"))?;
            }
            "STARTTLS" => return self.starttls(),
            "AUTH" => self.auth(arg)?,
            "MAIL" => self.mail(arg)?,
            "RCPT" => self.rcpt(arg)?,
            "DATA" => return self.data(),
            "BDAT" if self.opts().chunking => return self.bdat(arg),
            "RSET" => {
                self.reset_transaction();
                self.reply("250 2.0.0 Ok")?;
            }
            "NOOP" => self.reply("250 2.0.0 Ok")?,
            "QUIT" => {
                self.reply("221 2.0.0 Bye")?;
                if let Stream::Tls(tls) = self.reader.get_mut() {
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
                return Ok(Next::Close);
            }
            _ => self.reply("500 5.5.2 Command unrecognized")?,
        }
        Ok(Next::Continue)
    }

    fn ehlo(&mut self) -> io::Result<()> {
        if self.opts().refuse_ehlo {
            return self.reply("500 5.5.1 EHLO not supported, use HELO");
        }
        self.greeted = true;
        self.reset_transaction();
        let opts = self.opts();
        let mut lines = vec![opts.hostname.clone()];
        match &opts.ehlo_before_tls {
            Some(keywords) if opts.tls == Tls::StartTls && !self.in_tls => {
                lines.extend(keywords.iter().cloned());
            }
            _ => {
                if opts.pipelining {
                    lines.push("PIPELINING".to_string());
                }
                if opts.eight_bit_mime {
                    lines.push("8BITMIME".to_string());
                }
                if let Some(limit) = opts.size_limit {
                    lines.push(format!("SIZE {limit}"));
                }
                if opts.smtputf8 {
                    lines.push("SMTPUTF8".to_string());
                }
                if opts.chunking {
                    lines.push("CHUNKING".to_string());
                }
            }
        }
        if opts.starttls_offered() && !self.in_tls {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push(format!(
                "AUTH {}",
                self.opts().advertised_mechanisms().join(" ")
            ));
        }
        let last = lines.len() - 1;
        let text: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, line)| format!("250{}{line}", if i == last { ' ' } else { '-' }))
            .collect();
        self.reply(&text.join("\r\n"))
    }

    fn starttls(&mut self) -> io::Result<Next> {
        if !self.opts().starttls_offered() {
            self.reply("502 5.5.1 STARTTLS not available")?;
            return Ok(Next::Continue);
        }
        if self.in_tls {
            self.reply("503 5.5.1 Already in TLS")?;
            return Ok(Next::Continue);
        }
        if let Some(refusal) = self.opts().starttls_reply.clone() {
            self.reply(&refusal)?;
            return Ok(Next::Continue);
        }
        let ready = self.scripted("220 2.0.0 Ready to start TLS".to_string());
        if !ready.starts_with("220") {
            self.reply(&ready)?;
            return Ok(Next::Continue);
        }
        match self.opts().inject_after_starttls.clone() {
            Some(injected) => {
                self.fault = None;
                let ready = self.line_ends(format!("{ready}\r\n"));
                self.write_raw(format!("{ready}{injected}").as_bytes())?;
            }
            None => self.reply(&ready)?,
        }
        if self.opts().stall_after_starttls {
            return Ok(Next::Stall);
        }
        Ok(Next::StartTls)
    }

    /// Consumes the plaintext session and returns a fresh one over TLS: all
    /// SMTP state is forgotten (RFC 3207 §4.2), so the client must EHLO again.
    fn upgrade(self) -> io::Result<Session<'a>> {
        if !self.reader.buffer().is_empty() {
            // Plaintext pipelined after STARTTLS would be an injection; refuse.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "data after STARTTLS",
            ));
        }
        let Some(tls_config) = self.config.tls.clone() else {
            return Err(io::Error::other("no TLS config"));
        };
        let Stream::Plain(tcp) = self.reader.into_inner() else {
            return Err(io::Error::other("already in TLS"));
        };
        let tls = tls_accept(tcp, &tls_config, self.shared)
            .ok_or_else(|| io::Error::other("TLS handshake failed"))?;
        Ok(Session::new(
            Stream::Tls(Box::new(tls)),
            self.index,
            self.shared,
            self.config,
        ))
    }

    fn auth(&mut self, arg: &str) -> io::Result<()> {
        if !self.opts().auth_required() {
            return self.reply("502 5.5.1 AUTH not supported");
        }
        if !self.greeted {
            return self.reply("503 5.5.1 EHLO first");
        }
        if !self.auth_offered() {
            return self.reply("530 5.7.0 Must issue a STARTTLS command first");
        }
        if self.auth_user.is_some() {
            return self.reply("503 5.5.1 Already authenticated");
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_string())),
            None => (arg.to_ascii_uppercase(), None),
        };
        let offered = self
            .opts()
            .advertised_mechanisms()
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&mechanism));
        if !offered {
            return self.reply("504 5.5.4 Unrecognized authentication type");
        }
        if mechanism == "XOAUTH2" || mechanism == "OAUTHBEARER" {
            return self.oauth(&mechanism, initial);
        }
        let Some((user, password)) = self.opts().require_auth.clone() else {
            return self.reply("504 5.5.4 Unrecognized authentication type");
        };
        let credentials = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) if r != "=" => r,
                    Some(_) => String::new(),
                    None => match self.challenge("334 ")? {
                        Some(r) => r,
                        None => return Ok(()),
                    },
                };
                let Some(decoded) = self.decode(&response)? else {
                    return Ok(());
                };
                let mut parts = decoded.split(|&b| b == 0);
                let (Some(_authzid), Some(authcid), Some(passwd), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return self.reply("501 5.5.2 Malformed AUTH PLAIN response");
                };
                (authcid.to_vec(), passwd.to_vec())
            }
            "LOGIN" => {
                let user_b64 = match initial {
                    Some(r) => r,
                    None => match self.challenge("334 VXNlcm5hbWU6")? {
                        Some(r) => r,
                        None => return Ok(()),
                    },
                };
                let Some(login) = self.decode(&user_b64)? else {
                    return Ok(());
                };
                let Some(pass_b64) = self.challenge("334 UGFzc3dvcmQ6")? else {
                    return Ok(());
                };
                let Some(pass) = self.decode(&pass_b64)? else {
                    return Ok(());
                };
                (login, pass)
            }
            _ => return self.reply("504 5.5.4 Unrecognized authentication type"),
        };
        if credentials.0 == user.as_bytes() && credentials.1 == password.as_bytes() {
            self.auth_user = Some(user);
            self.auth_mechanism = Some(mechanism);
            self.reply("235 2.7.0 Authentication successful")
        } else {
            self.reply("535 5.7.8 Authentication credentials invalid")
        }
    }

    /// XOAUTH2 (Google's and Microsoft's format) or OAUTHBEARER (RFC 7628):
    /// checks the bearer token and user; a refusal is the error challenge,
    /// the client's answer, then 535 (RFC 7628 §3.2.3).
    fn oauth(&mut self, mechanism: &str, initial: Option<String>) -> io::Result<()> {
        // A scripted non-2xx reply to AUTH is the whole answer (Microsoft 365
        // says `535 5.7.3 Authentication unsuccessful` without a challenge).
        let scripted_refusal = match &self.fault {
            Some(Fault::Reply(text) | Fault::ReplyTwice(text)) if !text.starts_with('2') => {
                Some(text.clone())
            }
            _ => None,
        };
        if let (Some(refusal), None) = (&scripted_refusal, &initial) {
            // No initial response: the refusal answers AUTH itself.
            let refusal = refusal.clone();
            return self.reply(&refusal);
        }
        let response = match initial {
            Some(r) if r != "=" => r,
            Some(_) => String::new(),
            None => match self.challenge("334 ")? {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        let Some(bytes) = self.decode(&response)? else {
            return Ok(());
        };
        let decoded = String::from_utf8_lossy(&bytes).into_owned();
        let parsed = if mechanism == "XOAUTH2" {
            parse_xoauth2(&decoded)
        } else {
            parse_oauthbearer(&decoded)
        };
        let mut attempt = OAuthAttempt {
            connection: self.index,
            mechanism: mechanism.to_string(),
            decoded,
            user: None,
            token: None,
            host: None,
            port: None,
            accepted: false,
            client_ack: None,
        };
        let Some(fields) = parsed else {
            self.shared.update(|s| s.oauth_attempts.push(attempt));
            return self.reply(&format!("501 5.5.2 Malformed {mechanism} response"));
        };
        attempt.user = fields.user;
        attempt.token = fields.token;
        attempt.host = fields.host;
        attempt.port = fields.port;
        if let Some(refusal) = scripted_refusal {
            self.shared.update(|s| s.oauth_attempts.push(attempt));
            return self.reply(&refusal);
        }
        let opts = self.opts();
        let user_ok = match (&opts.oauth_user, &attempt.user) {
            (Some(want), Some(got)) => want == got,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let token_ok = attempt
            .token
            .as_ref()
            .is_some_and(|t| opts.oauth_tokens.iter().any(|ok| ok == t));
        if user_ok && token_ok {
            attempt.accepted = true;
            self.auth_user = Some(attempt.user.clone().unwrap_or_default());
            self.auth_token = attempt.token.clone();
            self.auth_mechanism = Some(mechanism.to_string());
            self.shared.update(|s| s.oauth_attempts.push(attempt));
            return self.reply("235 2.7.0 Accepted");
        }
        self.reply(OAUTH_ERROR_CHALLENGE)?;
        let ack = self.read_command()?;
        attempt.client_ack = ack.clone();
        self.shared.update(|s| s.oauth_attempts.push(attempt));
        match ack {
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF during AUTH",
            )),
            Some(line) if line.trim() == "*" => self.reply("501 5.7.0 Authentication cancelled"),
            Some(_) => self.reply("535 5.7.8 Username and Password not accepted"),
        }
    }

    /// Sends a 334 challenge and reads the client's answer; `None` if the
    /// exchange is over (cancelled with "*", EOF or a too-long line).
    fn challenge(&mut self, prompt: &str) -> io::Result<Option<String>> {
        self.reply(prompt)?;
        match self.read_command()? {
            Some(line) if line.trim() == "*" => {
                self.reply("501 5.7.0 Authentication cancelled")?;
                Ok(None)
            }
            Some(line) => Ok(Some(line.trim().to_string())),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF during AUTH",
            )),
        }
    }

    fn decode(&mut self, b64: &str) -> io::Result<Option<Vec<u8>>> {
        match BASE64.decode(b64) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(_) => {
                self.reply("501 5.5.2 Cannot decode base64")?;
                Ok(None)
            }
        }
    }

    fn mail(&mut self, arg: &str) -> io::Result<()> {
        if !self.greeted {
            return self.reply("503 5.5.1 EHLO/HELO first");
        }
        if self.opts().auth_required() && self.auth_user.is_none() {
            return self.reply("530 5.7.0 Authentication required");
        }
        if self.mail_from.is_some() {
            return self.reply("503 5.5.1 Nested MAIL command");
        }
        let Some(address) = path_argument(arg, "FROM:") else {
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        let params = mail_parameters(arg);
        let declared: Option<u64> = params.split_ascii_whitespace().find_map(|p| {
            let (key, value) = p.split_once('=')?;
            key.eq_ignore_ascii_case("SIZE")
                .then(|| value.parse().ok())
                .flatten()
        });
        let too_big =
            matches!((declared, self.opts().size_limit), (Some(n), Some(limit)) if n > limit);
        let default = if too_big {
            "552 5.3.4 Message size exceeds fixed maximum message size".to_string()
        } else {
            self.opts()
                .mail_reply
                .clone()
                .unwrap_or_else(|| "250 2.1.0 Ok".to_string())
        };
        let reply = self.scripted(default);
        if reply.starts_with('2') {
            self.mail_from = Some(address);
            self.mail_params = params;
        }
        self.reply(&reply)
    }

    fn rcpt(&mut self, arg: &str) -> io::Result<()> {
        if self.mail_from.is_none() {
            return self.reply("503 5.5.1 Need MAIL command");
        }
        let Some(address) = path_argument(arg, "TO:") else {
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        let opts = self.opts();
        let full = opts
            .max_rcpts_per_transaction
            .is_some_and(|max| self.rcpt_to.len() >= max);
        let default = if full {
            "452 4.5.3 Too many recipients".to_string()
        } else {
            opts.rcpt_reply_for
                .iter()
                .find(|(a, _)| a.eq_ignore_ascii_case(&address))
                .map(|(_, r)| r.clone())
                .or_else(|| opts.rcpt_reply.clone())
                .unwrap_or_else(|| "250 2.1.5 Ok".to_string())
        };
        let reply = self.scripted(default);
        if reply.starts_with('2') {
            self.rcpt_to.push(address);
        }
        self.reply(&reply)
    }

    fn data(&mut self) -> io::Result<Next> {
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 Need MAIL command")?;
            return Ok(Next::Continue);
        }
        if self.rcpt_to.is_empty() && !self.opts().data_without_recipients {
            self.reply("554 5.5.1 No valid recipients")?;
            return Ok(Next::Continue);
        }
        let go_ahead = self.scripted("354 End data with <CR><LF>.<CR><LF>".to_string());
        self.reply(&go_ahead)?;
        if !go_ahead.starts_with("354") {
            return Ok(Next::Continue);
        }
        let mut data = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = (&mut self.reader)
                .take(BODY_LINE_LIMIT as u64 + 2)
                .read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                if line.len() > BODY_LINE_LIMIT {
                    self.refuse_long_line()?;
                }
                // EOF inside the body: the transaction is lost, as on a real server.
                return Ok(Next::Close);
            }
            if line == b".\r\n" || line == b".\n" {
                break;
            }
            let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
            data.extend_from_slice(unstuffed);
        }
        if !self.begin(".") {
            return Ok(Next::Close);
        }
        self.finish_message(data, false)?;
        Ok(Next::Continue)
    }

    /// RFC 3030: `BDAT n [LAST]`, then exactly n octets; LAST ends the message.
    fn bdat(&mut self, arg: &str) -> io::Result<Next> {
        let mut words = arg.split_ascii_whitespace();
        let size = words.next().and_then(|n| n.parse::<u64>().ok());
        let last = match words.next() {
            None => false,
            Some(w) if w.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                // Without a usable count the chunk cannot be skipped: give up.
                self.reply("501 5.5.4 Syntax: BDAT size [LAST]")?;
                return Ok(Next::Close);
            }
        };
        let Some(size) = size else {
            self.reply("501 5.5.4 Syntax: BDAT size [LAST]")?;
            return Ok(Next::Close);
        };
        let mut chunk = Vec::new();
        let n = (&mut self.reader).take(size).read_to_end(&mut chunk)?;
        if (n as u64) < size {
            // EOF inside a chunk: the transaction is lost.
            return Ok(Next::Close);
        }
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 Need MAIL command")?;
            return Ok(Next::Continue);
        }
        if self.rcpt_to.is_empty() {
            self.reset_transaction();
            self.reply("554 5.5.1 No valid recipients")?;
            return Ok(Next::Continue);
        }
        self.chunks.extend_from_slice(&chunk);
        if !last {
            let reply = self.scripted(format!("250 2.0.0 {size} octets received"));
            if !reply.starts_with('2') {
                self.reset_transaction();
            }
            self.reply(&reply)?;
            return Ok(Next::Continue);
        }
        let data = std::mem::take(&mut self.chunks);
        self.finish_message(data, true)?;
        Ok(Next::Continue)
    }

    /// The final reply of a transaction; a 2xx records the message.
    fn finish_message(&mut self, data: Vec<u8>, bdat: bool) -> io::Result<()> {
        let default = self
            .opts()
            .data_reply
            .clone()
            .unwrap_or_else(|| "250 2.0.0 Ok: queued".to_string());
        let reply = self.scripted(default);
        if reply.starts_with('2') {
            let message = Received {
                mail_from: self.mail_from.clone().unwrap_or_default(),
                rcpt_to: std::mem::take(&mut self.rcpt_to),
                data,
                tls: self.in_tls,
                auth_user: self.auth_user.clone(),
                connection: self.index,
                mail_params: self.mail_params.clone(),
                bdat,
                auth_token: self.auth_token.clone(),
                auth_mechanism: self.auth_mechanism.clone(),
            };
            self.shared.update(|s| s.messages.push(message));
        }
        self.reset_transaction();
        self.reply(&reply)
    }
}

/// What an OAuth SASL response carried.
struct OAuthFields {
    user: Option<String>,
    token: Option<String>,
    host: Option<String>,
    port: Option<String>,
}

/// `user=U\x01auth=Bearer T\x01\x01`; None unless exactly that shape.
fn parse_xoauth2(decoded: &str) -> Option<OAuthFields> {
    let body = decoded.strip_suffix("\x01\x01")?;
    let mut fields = OAuthFields {
        user: None,
        token: None,
        host: None,
        port: None,
    };
    for pair in body.split('\x01') {
        let (key, value) = pair.split_once('=')?;
        match key {
            "user" => fields.user = Some(value.to_string()),
            "auth" => fields.token = Some(value.strip_prefix("Bearer ")?.to_string()),
            _ => return None,
        }
    }
    fields.user.as_ref()?;
    fields.token.as_ref()?;
    Some(fields)
}

/// RFC 7628 §3.1: `gs2-header \x01 *(key=value \x01) \x01`, the GS2 header
/// being `n,a=U,` (or `n,,`); None unless that shape with an `auth=` pair.
fn parse_oauthbearer(decoded: &str) -> Option<OAuthFields> {
    let (gs2, rest) = decoded.split_once('\x01')?;
    let authzid = gs2.strip_prefix("n,")?.strip_suffix(',')?;
    let user = match authzid {
        "" => None,
        a => Some(a.strip_prefix("a=")?.to_string()),
    };
    let body = rest.strip_suffix("\x01\x01")?;
    let mut fields = OAuthFields {
        user,
        token: None,
        host: None,
        port: None,
    };
    for pair in body.split('\x01') {
        let (key, value) = pair.split_once('=')?;
        match key {
            "auth" => fields.token = Some(value.strip_prefix("Bearer ")?.to_string()),
            "host" => fields.host = Some(value.to_string()),
            "port" => fields.port = Some(value.to_string()),
            _ => {}
        }
    }
    fields.token.as_ref()?;
    Some(fields)
}

/// The parameters after the path of `FROM:<addr> SIZE=1 BODY=8BITMIME`
/// ("SIZE=1 BODY=8BITMIME"); empty if none.
fn mail_parameters(arg: &str) -> String {
    let rest = match arg.find('>') {
        Some(end) => arg.get(end + 1..).unwrap_or(""),
        // A bare address: everything after its first word.
        None => arg
            .split_once(':')
            .map(|(_, r)| r.trim_start())
            .and_then(|r| r.split_once(' '))
            .map_or("", |(_, p)| p),
    };
    rest.trim().to_string()
}

/// Extracts the address from `FROM:<addr> params` / `TO:<addr>`; the keyword is
/// case-insensitive, spaces after the colon are tolerated, and a bare address
/// without brackets is accepted.
fn path_argument(arg: &str, keyword: &str) -> Option<String> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg.get(keyword.len()..)?.trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        Some(inner.get(..end)?.to_string())
    } else {
        let address = rest.split_whitespace().next()?;
        Some(address.to_string())
    }
}
