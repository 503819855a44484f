//! Opens a ready-to-send session to a tenant's relay: connect (every address,
//! within connect_timeout), greeting, EHLO, STARTTLS or implicit TLS with a new
//! TLS connection, EHLO again, AUTH. Credentials never cross a plaintext link
//! unless the tenant says `tls = none` and `allow_plaintext_auth = yes`.

use super::session::{AuthMechanism, BearerMechanism, Session, Timeouts, Trace};
use super::{Phase, SessionError};
use crate::base::relay::{AuthMode, Relay, TlsMode};
use crate::base::secret::Secret;
use crate::base::stream::Transport;
use crate::tls::{self, Stream};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct ClientSettings {
    /// Our EHLO name.
    pub hostname: String,
    pub relay: Relay,
    pub tls_mode: TlsMode,
    pub tls: Arc<ClientConfig>,
    pub auth: AuthMode,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub allow_plaintext_auth: bool,
    pub timeouts: Timeouts,
    /// The OAuth 2.0 access token for `auth = xoauth2`, fetched per session.
    pub bearer: Option<Secret>,
}

pub struct Connected {
    pub session: Session<Stream>,
    /// `host[ip]:port`, as the delivery log line shows it.
    pub peer: String,
}

/// Why a session could not be opened, and with whom (`host[ip]:port` once
/// connected), for the delivery log line.
pub struct OpenFailure {
    pub peer: String,
    pub error: SessionError,
}

pub fn open(settings: &ClientSettings) -> Result<Connected, OpenFailure> {
    open_traced(settings, None)
}

/// `open`, reporting the conversation to `trace` (credentials redacted).
pub fn open_traced(
    settings: &ClientSettings,
    mut trace: Option<Trace>,
) -> Result<Connected, OpenFailure> {
    let relay = &settings.relay;
    note(
        &mut trace,
        &format!(
            "-- connecting to {relay} (tls = {})",
            settings.tls_mode.as_str()
        ),
    );
    let (tcp, addr) = connect(settings).map_err(|error| OpenFailure {
        peer: match &error {
            SessionError::Connect { peer, .. } => peer.clone(),
            _ => relay.to_string(),
        },
        error,
    })?;
    let peer = format!("{}[{}]:{}", relay.host, addr.ip(), addr.port());
    note(&mut trace, &format!("-- connected to {peer}"));
    match start(tcp, settings, trace) {
        Ok(session) => Ok(Connected { session, peer }),
        Err(error) => Err(OpenFailure { peer, error }),
    }
}

fn note(trace: &mut Option<Trace>, line: &str) {
    if let Some(trace) = trace.as_mut() {
        trace(line);
    }
}

/// Greeting, EHLO, TLS and AUTH over a fresh TCP connection.
fn start(
    tcp: TcpStream,
    settings: &ClientSettings,
    mut trace: Option<Trace>,
) -> Result<Session<Stream>, SessionError> {
    let stream = if settings.tls_mode == TlsMode::Implicit {
        let tls = handshake(tcp, settings, &mut trace)?;
        Stream::Tls(Box::new(tls))
    } else {
        Stream::Plain(tcp)
    };
    let mut session = Session::new(stream, settings.timeouts).with_trace(trace);
    session.greeting()?;
    session.hello(&settings.hostname)?;

    if settings.tls_mode == TlsMode::StartTls {
        if !session.caps.starttls {
            session.quit();
            return Err(SessionError::StartTlsNotOffered);
        }
        session.start_tls()?;
        let mut trace = session.take_trace();
        // Everything learned so far (capabilities, buffered bytes) is dropped here.
        let Stream::Plain(tcp) = session.into_stream()? else {
            return Err(SessionError::Protocol(
                Phase::StartTls,
                "STARTTLS inside TLS".into(),
            ));
        };
        let tls = handshake(tcp, settings, &mut trace)?;
        session = Session::new(Stream::Tls(Box::new(tls)), settings.timeouts).with_trace(trace);
        session.hello(&settings.hostname)?;
    }

    if let Err(e) = authenticate(&mut session, settings) {
        // The relay is still listening after a refused or unusable login: part politely.
        if matches!(
            e,
            SessionError::Rejected(..) | SessionError::NoUsableAuth { .. }
        ) {
            session.quit();
        }
        return Err(e);
    }
    Ok(session)
}

/// A fresh TLS connection (never resumed), noted in the transcript.
fn handshake(
    tcp: TcpStream,
    settings: &ClientSettings,
    trace: &mut Option<Trace>,
) -> Result<StreamOwned<ClientConnection, TcpStream>, SessionError> {
    let tls = tls::handshake(
        tcp,
        &settings.tls,
        &settings.relay.host,
        settings.timeouts.command,
    )
    .map_err(SessionError::Tls)?;
    if trace.is_some() {
        let version = tls
            .conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let suite = tls
            .conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        note(trace, &format!("-- TLS established: {version}, {suite}"));
    }
    Ok(tls)
}

fn connect(settings: &ClientSettings) -> Result<(TcpStream, SocketAddr), SessionError> {
    let relay = &settings.relay;
    let addrs: Vec<SocketAddr> = (relay.host.as_str(), relay.port)
        .to_socket_addrs()
        .map_err(|e| SessionError::Connect {
            peer: relay.to_string(),
            reason: format!("cannot resolve the host name: {e}"),
        })?
        .collect();
    connect_any(relay, &addrs, settings.timeouts.connect)
}

/// Tries the relay's addresses in turn (RFC 5321 §5.1) until one accepts,
/// all within `timeout`. Each try gets an equal share of the time left, so a
/// black-holed first address cannot use up the time the others need.
fn connect_any(
    relay: &Relay,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), SessionError> {
    // A timeout past what an Instant holds has no deadline: each try gets a share of it.
    let deadline = Instant::now().checked_add(timeout);
    let mut failures: Vec<(SocketAddr, String)> = Vec::new();
    for (tried, addr) in addrs.iter().enumerate() {
        let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        let share = left / u32::try_from(addrs.len() - tried).unwrap_or(u32::MAX);
        if share.is_zero() {
            failures.push((*addr, "not tried: connect_timeout used up".into()));
            continue;
        }
        match TcpStream::connect_timeout(addr, share) {
            Ok(tcp) => {
                if !failures.is_empty() {
                    log::info!(
                        "relay {relay}: connected to {} after {}",
                        addr.ip(),
                        describe(&failures)
                    );
                }
                let _ = tcp.set_nodelay(true);
                return Ok((tcp, *addr));
            }
            Err(e) => failures.push((*addr, e.to_string())),
        }
    }
    Err(match failures.as_slice() {
        [] => SessionError::Connect {
            peer: relay.to_string(),
            reason: "the host name has no addresses".into(),
        },
        [(addr, reason)] => SessionError::Connect {
            peer: format!("{}[{}]:{}", relay.host, addr.ip(), addr.port()),
            reason: reason.clone(),
        },
        several => SessionError::Connect {
            peer: relay.to_string(),
            reason: describe(several),
        },
    })
}

/// `192.0.2.1: connection refused; 2001:db8::1: timed out`
fn describe(failures: &[(SocketAddr, String)]) -> String {
    failures
        .iter()
        .map(|(addr, reason)| format!("{}: {reason}", addr.ip()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Signs in when the tenant has a login. A login that cannot be used with
/// this relay (no mechanism of ours offered) is an error, never a reason to
/// send without it: the relay could take the mail as an unknown sender's,
/// or the admin would never learn the login is unused (msmtp refuses too).
fn authenticate<S: Transport>(
    session: &mut Session<S>,
    settings: &ClientSettings,
) -> Result<(), SessionError> {
    if settings.auth == AuthMode::None || settings.username.is_none() {
        return Ok(());
    }
    let encrypted = settings.tls_mode != TlsMode::None;
    if !encrypted && !settings.allow_plaintext_auth {
        return Err(SessionError::Config(
            "credentials are configured but tls = none: they would cross the network in plaintext. \
             Use tls = starttls or implicit, or set allow_plaintext_auth = yes for a trusted LAN relay"
                .into(),
        ));
    }
    let username = settings.username.as_deref().unwrap_or_default();
    let offers = |m: &str| session.caps.auth.iter().any(|a| a == m);
    let no_usable = |wanted| SessionError::NoUsableAuth {
        wanted,
        offered: session.caps.auth.clone(),
    };
    if settings.auth == AuthMode::XOAuth2 {
        let Some(token) = &settings.bearer else {
            return Err(SessionError::Config(
                "auth = xoauth2 but no access token was obtained".into(),
            ));
        };
        // OAUTHBEARER is the standard (RFC 7628); XOAUTH2 is what most providers offer.
        let mechanism = if offers("OAUTHBEARER") {
            BearerMechanism::OAuthBearer
        } else if offers("XOAUTH2") {
            BearerMechanism::XOAuth2
        } else {
            return Err(no_usable("XOAUTH2 or OAUTHBEARER"));
        };
        let relay = &settings.relay;
        return session.authenticate_bearer(mechanism, username, token, &relay.host, relay.port);
    }
    let Some(password) = &settings.password else {
        return Err(SessionError::Config(format!(
            "username {username} is set but no password: nothing was sent without the login"
        )));
    };
    // auth = plain or login is the admin's explicit choice, tried even where
    // not advertised (the relay's refusal then says why); auto picks from the offer.
    let mechanism = match settings.auth {
        AuthMode::Plain => AuthMechanism::Plain,
        AuthMode::Login => AuthMechanism::Login,
        _ if offers("PLAIN") => AuthMechanism::Plain,
        _ if offers("LOGIN") => AuthMechanism::Login,
        _ => return Err(no_usable("PLAIN or LOGIN")),
    };
    session.authenticate(mechanism, username, password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::script;
    use std::net::{Ipv4Addr, TcpListener};

    fn relay(port: u16) -> Relay {
        Relay {
            host: "relay.test".into(),
            port,
        }
    }

    #[test]
    fn connect_with_the_largest_timeout_does_not_overflow() {
        let (_listener, addr) = listening();
        let (_tcp, peer) = connect_any(&relay(addr.port()), &[addr], Duration::MAX).unwrap();
        assert_eq!(peer, addr);
    }

    /// A listener that completes handshakes in the kernel; never accepts.
    fn listening() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    /// An address that drops SYNs, as a black-holed relay does: a listener
    /// with a backlog of 0 whose one queue slot is taken and never accepted.
    struct BlackHole {
        addr: SocketAddr,
        _listener: TcpListener,
        _queued: Vec<TcpStream>,
    }

    fn black_hole() -> BlackHole {
        use rustix::net::{bind, listen, socket, AddressFamily, SocketType};
        let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
        bind(&fd, &SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        listen(&fd, 0).expect("listen");
        let listener = TcpListener::from(fd);
        let addr = listener.local_addr().expect("addr");
        let mut queued = Vec::new();
        for _ in 0..16 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(tcp) => queued.push(tcp),
                Err(_) => {
                    return BlackHole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    }
                }
            }
        }
        panic!("the listen queue of {addr} never filled");
    }

    fn with_login(auth: AuthMode) -> ClientSettings {
        let roots = Arc::new(rustls::RootCertStore::empty());
        ClientSettings {
            hostname: "pbx.test".into(),
            relay: relay(587),
            tls_mode: TlsMode::StartTls,
            tls: tls::client_config(false, None, &roots).expect("TLS config"),
            auth,
            username: Some("pbx@acme.test".into()),
            password: Some(Secret::new("s3cret".into())),
            allow_plaintext_auth: false,
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                command: Duration::from_secs(1),
                data: Duration::from_secs(1),
            },
            bearer: Some(Secret::new("token".into())),
        }
    }

    /// A session past its EHLO, the relay having answered `ehlo`, then `rest`.
    fn greeted(ehlo: &str, rest: &[&str]) -> Session<script::Script> {
        let mut replies = vec!["220 relay.test ESMTP\r\n", ehlo];
        replies.extend_from_slice(rest);
        let mut session = script::session(&replies);
        session.greeting().expect("greeting");
        session.hello("pbx.test").expect("EHLO");
        session
    }

    #[test]
    fn a_configured_login_is_never_dropped_when_the_relay_offers_no_usable_mechanism() {
        let cases: [(&str, AuthMode, &str, &[&str]); 3] = [
            (
                "250-relay.test\r\n250 SIZE 1000\r\n",
                AuthMode::Auto,
                "PLAIN or LOGIN",
                &[],
            ),
            (
                "250-relay.test\r\n250 AUTH CRAM-MD5 DIGEST-MD5\r\n",
                AuthMode::Auto,
                "PLAIN or LOGIN",
                &["CRAM-MD5", "DIGEST-MD5"],
            ),
            (
                "250-relay.test\r\n250 AUTH PLAIN LOGIN\r\n",
                AuthMode::XOAuth2,
                "XOAUTH2 or OAUTHBEARER",
                &["PLAIN", "LOGIN"],
            ),
        ];
        for (ehlo, auth, wanted, offered) in cases {
            let mut session = greeted(ehlo, &["250 2.0.0 ok\r\n"]);
            let error = authenticate(&mut session, &with_login(auth)).expect_err(ehlo);
            let SessionError::NoUsableAuth {
                wanted: said,
                offered: seen,
            } = &error
            else {
                panic!("{ehlo}: {error:?}");
            };
            assert_eq!(*said, wanted, "{ehlo}");
            assert_eq!(seen, offered, "{ehlo}");
            // Nothing went out after EHLO: no AUTH, and no MAIL without it.
            assert_eq!(script::written(session), "EHLO pbx.test\r\n", "{ehlo}");
        }
    }

    #[test]
    fn auto_signs_in_with_login_when_the_relay_offers_it_beside_cram_md5() {
        let mut session = greeted(
            "250-relay.test\r\n250 AUTH CRAM-MD5 LOGIN\r\n",
            &[
                "334 VXNlcm5hbWU6\r\n",
                "334 UGFzc3dvcmQ6\r\n",
                "235 2.7.0 ok\r\n",
            ],
        );
        authenticate(&mut session, &with_login(AuthMode::Auto)).expect("signed in");
        assert!(script::written(session).contains("AUTH LOGIN"));
    }

    #[test]
    fn black_holed_first_address_leaves_time_for_the_next() {
        let hole = black_hole();
        let (_good, good) = listening();
        let timeout = Duration::from_secs(2);
        let started = Instant::now();
        let connected = connect_any(&relay(good.port()), &[hole.addr, good], timeout);
        let took = started.elapsed();
        let (_tcp, addr) = connected.expect("the second address answers");
        assert_eq!(addr, good);
        // The hole had its half of the time, not all of it.
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < timeout + Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn every_address_failing_names_each_with_its_reason() {
        // Bound to 127.0.0.1 only: the same port on .2 and .3 refuses.
        let (_held, on_one) = listening();
        let port = on_one.port();
        let refused = |last: u8| SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), port));
        let hole = black_hole();
        let addrs = [refused(2), hole.addr, refused(3)];
        let error =
            connect_any(&relay(port), &addrs, Duration::from_secs(1)).expect_err("nothing answers");
        let SessionError::Connect { peer, reason } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(peer, &format!("relay.test:{port}"));
        let parts: Vec<&str> = reason.split("; ").collect();
        assert_eq!(parts.len(), 3, "{reason}");
        assert!(
            parts[0].starts_with("127.0.0.2: ") && parts[0].contains("refused"),
            "{reason}"
        );
        assert!(parts[1].starts_with("127.0.0.1: "), "{reason}");
        assert!(
            parts[2].starts_with("127.0.0.3: ") && parts[2].contains("refused"),
            "{reason}"
        );
    }

    #[test]
    fn one_address_is_named_with_its_host() {
        let (_held, on_one) = listening();
        let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), on_one.port()));
        let error =
            connect_any(&relay(addr.port()), &[addr], Duration::from_secs(1)).expect_err("refused");
        let SessionError::Connect { peer, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(peer, &format!("relay.test[127.0.0.2]:{}", addr.port()));
    }
}
