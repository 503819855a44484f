//! Self-test of tests/support/smtp_server.rs: a tiny hand-written SMTP client
//! drives the test server over plain TCP, STARTTLS and implicit TLS, so the
//! daemon's integration tests can trust what the server reports. The OAuth
//! test endpoint (tests/support/oauth_server.rs) is checked the same way, with
//! raw HTTPS requests and with ureq, the client the daemon uses.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::support::oauth_server::{decode_form, OAuthServer, Response};
use crate::support::smtp_server::{
    CertKind, Fault, ServerOptions, TestCa, TestServer, Tls, OAUTH_ERROR_CHALLENGE,
};

const WAIT: Duration = Duration::from_secs(5);

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Minimal SMTP client: sends lines, reads (multi-line) replies.
struct Client {
    tcp: TcpStream,
    reader: BufReader<Box<dyn ReadWrite>>,
}

fn client_config(ca: &TestCa) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.ca_der()).expect("add test CA");
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

fn tls_wrap(tcp: &TcpStream, ca: &TestCa) -> Box<dyn ReadWrite> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = ClientConnection::new(client_config(ca), name).expect("client connection");
    let mut sock = tcp.try_clone().expect("clone socket");
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("TLS handshake");
    }
    Box::new(StreamOwned::new(conn, sock))
}

impl Client {
    fn connect(server: &TestServer) -> Client {
        let tcp = TcpStream::connect(server.addr()).expect("connect");
        tcp.set_read_timeout(Some(WAIT)).expect("read timeout");
        let plain: Box<dyn ReadWrite> = Box::new(tcp.try_clone().expect("clone socket"));
        Client {
            tcp,
            reader: BufReader::new(plain),
        }
    }

    fn connect_implicit(server: &TestServer, ca: &TestCa) -> Client {
        let tcp = TcpStream::connect(server.addr()).expect("connect");
        tcp.set_read_timeout(Some(WAIT)).expect("read timeout");
        let tls = tls_wrap(&tcp, ca);
        Client {
            tcp,
            reader: BufReader::new(tls),
        }
    }

    fn send(&mut self, line: &str) {
        let stream = self.reader.get_mut();
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("write");
        stream.flush().expect("flush");
    }

    /// Reads one reply; returns (code, text of each line).
    fn reply(&mut self) -> (u16, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read reply");
            assert!(n > 0, "connection closed while reading a reply");
            let line = line.trim_end().to_string();
            let code: u16 = line[..3].parse().expect("reply code");
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line[4.min(line.len())..].to_string());
            if last {
                return (code, lines);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, Vec<String>) {
        self.send(line);
        self.reply()
    }

    fn expect(&mut self, line: &str, code: u16) -> Vec<String> {
        let (got, text) = self.cmd(line);
        assert_eq!(got, code, "{line:?} -> {got} {text:?}");
        text
    }

    fn starttls(&mut self, ca: &TestCa) {
        self.expect("STARTTLS", 220);
        assert!(self.reader.buffer().is_empty());
        self.reader = BufReader::new(tls_wrap(&self.tcp, ca));
    }

    /// MAIL, RCPTs, DATA and body; the body is sent dot-stuffed.
    fn send_message(&mut self, from: &str, to: &[&str], body: &str) -> u16 {
        self.expect(&format!("MAIL FROM:<{from}> SIZE=100"), 250);
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>"));
        }
        let (code, _) = self.cmd("DATA");
        if code != 354 {
            return code;
        }
        let mut wire = String::new();
        for line in body.split("\r\n") {
            if line.starts_with('.') {
                wire.push('.');
            }
            wire.push_str(line);
            wire.push_str("\r\n");
        }
        wire.push_str(".\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(wire.as_bytes()).expect("write body");
        stream.flush().expect("flush");
        self.reply().0
    }

    fn at_eof(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }
}

#[test]
fn plain_session_lists_extensions_and_unstuffs_dots() {
    let server = TestServer::start(ServerOptions::default(), None);
    let mut client = Client::connect(&server);
    assert_eq!(
        client.reply(),
        (220, vec!["test.invalid ESMTP".to_string()])
    );
    let ehlo = client.expect("EHLO client.test", 250);
    assert_eq!(
        ehlo,
        ["test.invalid", "PIPELINING", "8BITMIME", "SIZE 52428800"]
    );
    let body = "Subject: hi\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend";
    let code = client.send_message("a@example.com", &["b@example.com", "c@example.com"], body);
    assert_eq!(code, 250);
    client.expect("QUIT", 221);
    assert!(client.at_eof());

    let messages = server.wait_for_messages(1, WAIT);
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.mail_from, "a@example.com");
    assert_eq!(m.rcpt_to, ["b@example.com", "c@example.com"]);
    assert_eq!(
        m.text(),
        "Subject: hi\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
    );
    assert!(!m.tls);
    assert_eq!(m.auth_user, None);
    assert_eq!(m.connection, 0);
    assert_eq!(server.connections(), 1);
    assert_eq!(server.tls_handshakes(), 0);
    let commands: Vec<String> = server.commands().into_iter().map(|(_, c)| c).collect();
    assert_eq!(
        commands,
        [
            "EHLO client.test",
            "MAIL FROM:<a@example.com> SIZE=100",
            "RCPT TO:<b@example.com>",
            "RCPT TO:<c@example.com>",
            "DATA",
            "QUIT"
        ]
    );
}

#[test]
fn two_starttls_sessions_count_two_handshakes_and_auth_only_after_tls() {
    let ca = TestCa::new();
    let opts = ServerOptions {
        tls: Tls::StartTls,
        require_auth: Some(("user".into(), "secret".into())),
        ..ServerOptions::default()
    };
    let server = TestServer::start(opts, Some(&ca));
    for i in 0..2 {
        let mut client = Client::connect(&server);
        assert_eq!(client.reply().0, 220);
        let ehlo = client.expect("EHLO client.test", 250);
        assert!(ehlo.contains(&"STARTTLS".to_string()), "{ehlo:?}");
        assert!(!ehlo.iter().any(|l| l.starts_with("AUTH")), "{ehlo:?}");
        client.expect("AUTH PLAIN AHVzZXIAc2VjcmV0", 530);
        client.starttls(&ca);
        // SMTP state is reset: MAIL before EHLO is refused.
        client.expect("MAIL FROM:<a@example.com>", 503);
        let ehlo = client.expect("EHLO client.test", 250);
        assert!(!ehlo.contains(&"STARTTLS".to_string()), "{ehlo:?}");
        assert_eq!(ehlo.last().map(String::as_str), Some("AUTH PLAIN LOGIN"));
        client.expect("STARTTLS", 503);
        let plain = BASE64.encode(b"\0user\0secret");
        client.expect(&format!("AUTH PLAIN {plain}"), 235);
        assert_eq!(
            client.send_message("a@example.com", &["b@example.com"], &format!("n={i}")),
            250
        );
        client.expect("QUIT", 221);
    }
    let messages = server.wait_for_messages(2, WAIT);
    assert_eq!(messages.len(), 2);
    assert_eq!(server.tls_handshakes(), 2);
    assert_eq!(server.connections(), 2);
    for (i, m) in messages.iter().enumerate() {
        assert!(m.tls);
        assert_eq!(m.auth_user.as_deref(), Some("user"));
        assert_eq!(m.connection, i);
        assert_eq!(m.text(), format!("n={i}\r\n"));
    }
}

#[test]
fn auth_login_plain_with_challenge_and_wrong_credentials() {
    let opts = ServerOptions {
        require_auth: Some(("user".into(), "secret".into())),
        ..ServerOptions::default()
    };
    let server = TestServer::start(opts, None);
    let mut client = Client::connect(&server);
    client.reply();
    let ehlo = client.expect("EHLO c", 250);
    assert!(ehlo.contains(&"AUTH PLAIN LOGIN".to_string()));
    // MAIL before AUTH.
    assert_eq!(
        client.cmd("MAIL FROM:<a@example.com>"),
        (530, vec!["5.7.0 Authentication required".to_string()])
    );
    // Wrong password via PLAIN with an empty initial response.
    client.expect("AUTH PLAIN", 334);
    let (code, text) = client.cmd(&BASE64.encode(b"\0user\0wrong"));
    assert_eq!(
        (code, text),
        (535, vec!["5.7.8 Authentication credentials invalid".into()])
    );
    // LOGIN with the right credentials.
    assert_eq!(client.cmd("AUTH LOGIN").1, ["VXNlcm5hbWU6"]);
    assert_eq!(client.cmd(&BASE64.encode("user")).1, ["UGFzc3dvcmQ6"]);
    client.expect(&BASE64.encode("secret"), 235);
    assert_eq!(client.send_message("a@x", &["b@x"], "hello"), 250);
    let m = server.wait_for_messages(1, WAIT);
    assert_eq!(m[0].auth_user.as_deref(), Some("user"));
    // AUTH payload lines are recorded as sent.
    let commands: Vec<String> = server.commands().into_iter().map(|(_, c)| c).collect();
    assert!(commands.contains(&BASE64.encode("user")));
}

#[test]
fn black_hole_sends_nothing() {
    let opts = ServerOptions {
        greet: false,
        ..ServerOptions::default()
    };
    let server = TestServer::start(opts, None);
    let mut tcp = TcpStream::connect(server.addr()).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let err = tcp.read(&mut buf).expect_err("black hole must not send");
    assert!(matches!(
        err.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut
    ));
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(server.wait_for_connections(1, WAIT), 1);
    // Dropping the server closes the held socket instead of hanging.
    drop(server);
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    assert!(matches!(tcp.read(&mut buf), Ok(0) | Err(_)));
}

#[test]
fn scripted_rcpt_replies_keep_only_accepted_recipients() {
    let opts = ServerOptions {
        rcpt_reply_for: vec![("gone@example.com".into(), "550 5.1.1 No such user".into())],
        ..ServerOptions::default()
    };
    let server = TestServer::start(opts, None);
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("MAIL FROM:<a@example.com>", 250);
    assert_eq!(
        client.cmd("RCPT TO:<gone@example.com>"),
        (550, vec!["5.1.1 No such user".to_string()])
    );
    client.expect("RCPT TO:<ok@example.com>", 250);
    client.expect("DATA", 354);
    client.send("x");
    client.send(".");
    assert_eq!(client.reply().0, 250);
    let m = server.wait_for_messages(1, WAIT);
    assert_eq!(m[0].rcpt_to, ["ok@example.com"]);

    let busy = TestServer::start(
        ServerOptions {
            rcpt_reply: Some("450 4.2.0 Mailbox busy".into()),
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&busy);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("MAIL FROM:<a@example.com>", 250);
    client.expect("RCPT TO:<b@example.com>", 450);
    assert_eq!(
        client.cmd("DATA"),
        (554, vec!["5.5.1 No valid recipients".to_string()])
    );
    assert!(busy.messages().is_empty());
}

#[test]
fn data_without_recipients_takes_and_records_the_body() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply: Some("550 5.1.1 No such user".into()),
            data_without_recipients: true,
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("MAIL FROM:<a@x>", 250);
    client.expect("RCPT TO:<b@x>", 550);
    client.expect("DATA", 354);
    client.send(".");
    assert_eq!(client.reply().0, 250);
    assert_eq!(client.send_message("c@x", &["d@x"], "some body"), 250);
    let m = server.wait_for_messages(2, WAIT);
    assert_eq!(m.len(), 2);
    assert_eq!(
        (m[0].mail_from.as_str(), m[0].data.as_slice()),
        ("a@x", &b""[..])
    );
    assert!(m[0].rcpt_to.is_empty());
    assert_eq!(m[1].data, b"some body\r\n");
    assert!(m[1].rcpt_to.is_empty());
    // Without MAIL there is still no DATA.
    client.expect("DATA", 503);
}

#[test]
fn implicit_tls_greets_over_tls() {
    let ca = TestCa::new();
    let opts = ServerOptions {
        tls: Tls::Implicit,
        greeting: Some("220 implicit.test ESMTP".into()),
        ..ServerOptions::default()
    };
    let server = TestServer::start(opts, Some(&ca));
    let mut client = Client::connect_implicit(&server, &ca);
    assert_eq!(
        client.reply(),
        (220, vec!["implicit.test ESMTP".to_string()])
    );
    let ehlo = client.expect("EHLO c", 250);
    assert!(!ehlo.contains(&"STARTTLS".to_string()));
    assert_eq!(client.send_message("a@x", &["b@x"], "secret"), 250);
    client.expect("QUIT", 221);
    let m = server.wait_for_messages(1, WAIT);
    assert!(m[0].tls);
    assert_eq!(server.tls_handshakes(), 1);
}

#[test]
fn refused_ehlo_and_unadvertised_starttls() {
    let ca = TestCa::new();
    let opts = ServerOptions {
        tls: Tls::StartTls,
        advertise_starttls: false,
        refuse_ehlo: true,
        ..ServerOptions::default()
    };
    let server = TestServer::start(opts, Some(&ca));
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 500);
    client.expect("HELO c", 250);
    client.expect("STARTTLS", 502);
    client.expect("NOOP", 250);
    client.expect("RSET", 250);
    client.expect("BOGUS", 500);
    assert_eq!(client.send_message("a@x", &["b@x"], "via helo"), 250);
    assert!(!server.wait_for_messages(1, WAIT)[0].tls);
    assert_eq!(server.tls_handshakes(), 0);
}

#[test]
fn overlong_line_is_refused_and_bare_lf_tolerated() {
    let server = TestServer::start(ServerOptions::default(), None);
    let mut client = Client::connect(&server);
    client.reply();
    // Bare LF line ends are accepted.
    client
        .reader
        .get_mut()
        .write_all(b"EHLO c\n")
        .expect("write");
    assert_eq!(client.reply().0, 250);
    let long = "X".repeat(70 * 1024);
    let (code, _) = client.cmd(&long);
    assert_eq!(code, 500);
    assert!(client.at_eof());
    // The server survives and accepts the next client.
    let mut again = Client::connect(&server);
    assert_eq!(again.reply().0, 220);
}

/// Reads one (multi-line) reply as the bytes that came, line ends included.
fn raw_reply(client: &mut Client) -> Vec<u8> {
    let mut wire = Vec::new();
    loop {
        let start = wire.len();
        let n = client
            .reader
            .read_until(b'\n', &mut wire)
            .expect("read reply");
        assert!(n > 0, "connection closed while reading a reply");
        if wire.get(start + 3) != Some(&b'-') {
            return wire;
        }
    }
}

#[test]
fn bare_lf_replies_end_every_line_in_lf_alone() {
    let server = TestServer::start(
        ServerOptions {
            bare_lf_replies: true,
            faults: vec![(
                "RCPT".into(),
                1,
                Fault::Reply("250-2.1.5 scripted\r\n250 2.1.5 Ok".into()),
            )],
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    assert_eq!(raw_reply(&mut client), b"220 test.invalid ESMTP\n");
    client.send("EHLO c");
    assert_eq!(
        raw_reply(&mut client),
        b"250-test.invalid\n250-PIPELINING\n250-8BITMIME\n250 SIZE 52428800\n"
    );
    client.send("MAIL FROM:<a@x>");
    assert_eq!(raw_reply(&mut client), b"250 2.1.0 Ok\n");
    // A scripted reply's own line ends are bare LF too.
    client.send("RCPT TO:<b@x>");
    assert_eq!(
        raw_reply(&mut client),
        b"250-2.1.5 scripted\n250 2.1.5 Ok\n"
    );
    client.send("DATA");
    assert_eq!(raw_reply(&mut client)[..4], *b"354 ");
    client.send("body");
    client.send(".");
    assert_eq!(raw_reply(&mut client), b"250 2.0.0 Ok: queued\n");
    assert_eq!(server.wait_for_messages(1, WAIT)[0].rcpt_to, ["b@x"]);

    // Off (the default), replies end in CRLF.
    let usual = TestServer::start(ServerOptions::default(), None);
    let mut client = Client::connect(&usual);
    assert_eq!(raw_reply(&mut client), b"220 test.invalid ESMTP\r\n");
}

#[test]
fn mail_and_data_replies_are_scriptable() {
    let server = TestServer::start(
        ServerOptions {
            data_reply: Some("452 4.3.1 Insufficient system storage".into()),
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    assert_eq!(client.send_message("a@x", &["b@x"], "body"), 452);
    assert!(server.messages().is_empty());

    let server = TestServer::start(
        ServerOptions {
            mail_reply: Some("421 4.3.2 Shutting down".into()),
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("MAIL FROM:<a@x>", 421);
    client.expect("RCPT TO:<b@x>", 503);
}

#[test]
fn drop_with_idle_clients_does_not_hang() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut idle = Client::connect(&server);
    idle.reply();
    // A client stuck before finishing the TLS handshake.
    let mut half = Client::connect(&server);
    half.reply();
    half.expect("EHLO c", 250);
    half.expect("STARTTLS", 220);
    assert_eq!(server.wait_for_connections(2, WAIT), 2);
    let started = Instant::now();
    drop(server);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(idle.at_eof());
}

// ---------------------------------------------------------------------------
// Extensions, faults and TLS variants used by tests/smtp_client.rs.
// ---------------------------------------------------------------------------

#[test]
fn extensions_are_advertised_as_configured() {
    let server = TestServer::start(
        ServerOptions {
            pipelining: false,
            eight_bit_mime: false,
            smtputf8: true,
            chunking: true,
            size_limit: None,
            require_auth: Some(("u".into(), "p".into())),
            auth_mechanisms: vec!["LOGIN".into()],
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    let ehlo = client.expect("EHLO c", 250);
    assert_eq!(ehlo, ["test.invalid", "SMTPUTF8", "CHUNKING", "AUTH LOGIN"]);
    // A mechanism that is not advertised is refused.
    client.expect(&format!("AUTH PLAIN {}", BASE64.encode(b"\0u\0p")), 504);
}

#[test]
fn bdat_chunks_are_reassembled_without_unstuffing() {
    let server = TestServer::start(
        ServerOptions {
            chunking: true,
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("MAIL FROM:<a@x> SIZE=9 BODY=8BITMIME", 250);
    client.expect("RCPT TO:<b@x>", 250);
    let stream = client.reader.get_mut();
    stream.write_all(b"BDAT 5\r\nhello").expect("write");
    stream.flush().expect("flush");
    assert_eq!(client.reply().0, 250);
    let stream = client.reader.get_mut();
    stream.write_all(b"BDAT 4 LAST\r\n.x\r\n").expect("write");
    stream.flush().expect("flush");
    assert_eq!(client.reply().0, 250);
    client.expect("NOOP", 250);

    let m = server.wait_for_messages(1, WAIT);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].data, b"hello.x\r\n");
    assert!(m[0].bdat);
    assert_eq!(m[0].mail_params, "SIZE=9 BODY=8BITMIME");

    // Without CHUNKING, BDAT is not a command.
    let plain = TestServer::start(ServerOptions::default(), None);
    let mut client = Client::connect(&plain);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("BDAT 0 LAST", 500);
}

#[test]
fn faults_hit_only_the_nth_occurrence_of_their_verb() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![
                ("MAIL".into(), 1, Fault::ReplyTwice("250 2.1.0 Ok".into())),
                ("RCPT".into(), 2, Fault::Reply("550 5.1.1 Scripted".into())),
                (".".into(), 1, Fault::Reply("451 4.3.0 Scripted".into())),
                ("RSET".into(), 1, Fault::Delay(Duration::from_millis(300))),
                ("NOOP".into(), 2, Fault::Disconnect),
            ],
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    // The doubled reply: the second copy is there, unasked.
    client.expect("MAIL FROM:<a@x>", 250);
    assert_eq!(client.reply().0, 250);
    client.expect("RCPT TO:<one@x>", 250);
    assert_eq!(
        client.cmd("RCPT TO:<two@x>"),
        (550, vec!["5.1.1 Scripted".to_string()])
    );
    client.expect("RCPT TO:<three@x>", 250);
    client.expect("DATA", 354);
    client.send("first body");
    client.send(".");
    assert_eq!(client.reply().0, 451);
    assert!(server.messages().is_empty());

    let started = Instant::now();
    client.expect("RSET", 250);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Second transaction: no more faults for MAIL, RCPT or ".".
    assert_eq!(client.send_message("a@x", &["two@x"], "second"), 250);
    let m = server.wait_for_messages(1, WAIT);
    assert_eq!(m[0].rcpt_to, ["two@x"]);
    client.expect("NOOP", 250);
    client.send("NOOP");
    assert!(
        client.at_eof(),
        "the second NOOP should drop the connection"
    );
}

#[test]
fn tarpitted_connection_does_not_hold_up_drop() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![("EHLO".into(), 1, Fault::Delay(Duration::from_secs(60)))],
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    client.send("EHLO c");
    assert!(server.wait_for_command("EHLO", WAIT));
    let started = Instant::now();
    drop(server);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(client.at_eof());
}

#[test]
fn recipient_and_size_limits_are_enforced() {
    let server = TestServer::start(
        ServerOptions {
            max_rcpts_per_transaction: Some(1),
            size_limit: Some(500),
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    let ehlo = client.expect("EHLO c", 250);
    assert!(ehlo.contains(&"SIZE 500".to_string()), "{ehlo:?}");
    client.expect("MAIL FROM:<a@x> SIZE=501", 552);
    client.expect("MAIL FROM:<a@x> SIZE=500", 250);
    client.expect("RCPT TO:<one@x>", 250);
    assert_eq!(
        client.cmd("RCPT TO:<two@x>"),
        (452, vec!["4.5.3 Too many recipients".to_string()])
    );
    client.expect("DATA", 354);
    client.send("x");
    client.send(".");
    assert_eq!(client.reply().0, 250);
    // The limit is per transaction.
    assert_eq!(client.send_message("a@x", &["two@x"], "y"), 250);
    let m = server.wait_for_messages(2, WAIT);
    assert_eq!(m[0].rcpt_to, ["one@x"]);
    assert_eq!(m[1].rcpt_to, ["two@x"]);
}

#[test]
fn pipelined_commands_are_answered_in_order_and_marked() {
    let server = TestServer::start(ServerOptions::default(), None);
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    let stream = client.reader.get_mut();
    stream
        .write_all(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n")
        .expect("write");
    stream.flush().expect("flush");
    for code in [250, 250, 250, 354] {
        assert_eq!(client.reply().0, code);
    }
    client.send("body");
    client.send(".");
    assert_eq!(client.reply().0, 250);
    let log = server.command_log();
    let flags: Vec<(&str, bool)> = log.iter().map(|c| (c.line.as_str(), c.pipelined)).collect();
    assert_eq!(
        flags,
        [
            ("EHLO c", false),
            ("MAIL FROM:<a@x>", true),
            ("RCPT TO:<b@x>", true),
            ("RCPT TO:<c@x>", true),
            ("DATA", false),
        ]
    );
    assert_eq!(server.wait_for_messages(1, WAIT)[0].rcpt_to, ["b@x", "c@x"]);
}

#[test]
fn starttls_can_be_refused_hijacked_or_stalled() {
    let ca = TestCa::new();
    let refusing = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            starttls_reply: Some("454 4.7.0 TLS not available".into()),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut client = Client::connect(&refusing);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("STARTTLS", 454);
    client.expect("NOOP", 250);
    assert_eq!(refusing.tls_handshakes(), 0);

    let injecting = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            inject_after_starttls: Some("250 injected\r\n".into()),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut client = Client::connect(&injecting);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("STARTTLS", 220);
    // The injected reply arrived in the same segment as the 220.
    assert_eq!(client.reader.buffer(), b"250 injected\r\n");

    let stalling = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            stall_after_starttls: true,
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut client = Client::connect(&stalling);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("STARTTLS", 220);
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = ClientConnection::new(client_config(&ca), name).expect("client connection");
    let mut sock = client.tcp.try_clone().expect("clone socket");
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let err = loop {
        match conn.complete_io(&mut sock) {
            Ok(_) if conn.is_handshaking() => continue,
            Ok(_) => panic!("handshake completed with a stalling server"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err:?}"
    );
    assert_eq!(stalling.tls_handshakes(), 0);
}

#[test]
fn ehlo_before_tls_replaces_only_the_plaintext_keywords() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            pipelining: false,
            size_limit: None,
            ehlo_before_tls: Some(vec![
                "PIPELINING".into(),
                "CHUNKING".into(),
                "SIZE 10".into(),
            ]),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut client = Client::connect(&server);
    client.reply();
    let plain = client.expect("EHLO c", 250);
    assert_eq!(
        plain,
        [
            "test.invalid",
            "PIPELINING",
            "CHUNKING",
            "SIZE 10",
            "STARTTLS"
        ]
    );
    // Advertised, not accepted: the options decide what the server takes.
    client.expect("BDAT 0 LAST", 500);
    client.starttls(&ca);
    let in_tls = client.expect("EHLO c", 250);
    assert_eq!(in_tls, ["test.invalid", "8BITMIME"]);
    // No SIZE in force: a MAIL declaring more than 10 octets is taken.
    client.expect("MAIL FROM:<a@x> SIZE=1000", 250);

    // Unset, the plaintext EHLO is the usual one.
    let usual = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut client = Client::connect(&usual);
    client.reply();
    assert_eq!(
        client.expect("EHLO c", 250),
        [
            "test.invalid",
            "PIPELINING",
            "8BITMIME",
            "SIZE 52428800",
            "STARTTLS"
        ]
    );
}

#[test]
fn wait_for_verb_sees_a_body_end_before_its_tarpitted_reply() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![(".".into(), 1, Fault::Delay(Duration::from_secs(60)))],
            ..ServerOptions::default()
        },
        None,
    );
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    client.expect("MAIL FROM:<a@x>", 250);
    client.expect("RCPT TO:<b@x>", 250);
    assert_eq!(server.wait_for_verb("DATA", 1, Duration::ZERO), 0);
    client.expect("DATA", 354);
    assert_eq!(server.wait_for_verb("data", 1, WAIT), 1);
    assert_eq!(server.wait_for_verb(".", 1, Duration::ZERO), 0);
    client.send("body");
    client.send(".");
    // Counted as soon as the body is in, while its reply is held back.
    assert_eq!(server.wait_for_verb(".", 1, WAIT), 1);
    assert!(server.messages().is_empty());
    let started = Instant::now();
    drop(server);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn certificate_kinds_fail_verification_for_their_own_reason() {
    let ca = TestCa::new();
    for (kind, expect) in [
        (CertKind::Valid, None),
        (CertKind::Expired, Some("Expired")),
        (CertKind::WrongName, Some("NotValidForName")),
    ] {
        let server = TestServer::start(
            ServerOptions {
                tls: Tls::Implicit,
                cert: kind,
                ..ServerOptions::default()
            },
            Some(&ca),
        );
        let tcp = TcpStream::connect(server.addr()).expect("connect");
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        let name = ServerName::try_from("localhost").expect("server name");
        let mut conn = ClientConnection::new(client_config(&ca), name).expect("client connection");
        let mut sock = tcp.try_clone().expect("clone socket");
        let mut result = Ok(());
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut sock) {
                result = Err(e);
                break;
            }
        }
        match (expect, result) {
            (None, Ok(())) => {}
            (Some(reason), Err(e)) => {
                assert!(format!("{e:?}").contains(reason), "{kind:?}: {e:?}")
            }
            (expect, result) => panic!("{kind:?}: expected {expect:?}, got {result:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// XOAUTH2 / OAUTHBEARER in the SMTP test server
// ---------------------------------------------------------------------------

fn oauth_opts(offer_oauthbearer: bool) -> ServerOptions {
    ServerOptions {
        oauth_tokens: vec!["good-token".into()],
        oauth_user: Some("pbx@acme.test".into()),
        offer_oauthbearer,
        ..ServerOptions::default()
    }
}

#[test]
fn xoauth2_is_advertised_checked_and_recorded_per_message() {
    let server = TestServer::start(oauth_opts(false), None);
    let mut client = Client::connect(&server);
    client.reply();
    let ehlo = client.expect("EHLO c", 250);
    assert_eq!(ehlo.last().map(String::as_str), Some("AUTH XOAUTH2"));
    client.expect("MAIL FROM:<a@x>", 530);
    // The other mechanisms are not on offer without require_auth.
    client.expect("AUTH PLAIN AHVzZXIAc2VjcmV0", 504);
    client.expect("AUTH OAUTHBEARER bj1hPXgsAQEB", 504);
    let good = BASE64.encode("user=pbx@acme.test\x01auth=Bearer good-token\x01\x01");
    client.expect(&format!("AUTH XOAUTH2 {good}"), 235);
    client.expect(&format!("AUTH XOAUTH2 {good}"), 503);
    assert_eq!(client.send_message("a@x", &["b@x"], "hello"), 250);
    client.expect("QUIT", 221);

    let m = server.wait_for_messages(1, WAIT);
    assert_eq!(m[0].auth_user.as_deref(), Some("pbx@acme.test"));
    assert_eq!(m[0].auth_token.as_deref(), Some("good-token"));
    assert_eq!(m[0].auth_mechanism.as_deref(), Some("XOAUTH2"));
    let attempts = server.oauth_attempts();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert!(attempts[0].accepted);
    assert_eq!(
        attempts[0].decoded,
        "user=pbx@acme.test\x01auth=Bearer good-token\x01\x01"
    );
    assert_eq!(attempts[0].client_ack, None);
}

#[test]
fn xoauth2_refusal_is_error_challenge_then_535_and_challenge_form_works() {
    let server = TestServer::start(oauth_opts(false), None);
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    // A token the server does not know.
    let stale = BASE64.encode("user=pbx@acme.test\x01auth=Bearer stale\x01\x01");
    let (code, text) = client.cmd(&format!("AUTH XOAUTH2 {stale}"));
    assert_eq!(format!("{code} {}", text[0]), OAUTH_ERROR_CHALLENGE);
    assert_eq!(
        BASE64.decode(&text[0]).expect("base64"),
        br#"{"status":"401"}"#
    );
    let (code, text) = client.cmd("");
    assert_eq!(
        (code, text),
        (535, vec!["5.7.8 Username and Password not accepted".into()])
    );
    // The right token for the wrong user.
    let wrong_user = BASE64.encode("user=other@acme.test\x01auth=Bearer good-token\x01\x01");
    client.expect(&format!("AUTH XOAUTH2 {wrong_user}"), 334);
    client.expect("", 535);
    // Malformed: no trailing \x01\x01.
    let malformed = BASE64.encode("user=pbx@acme.test\x01auth=Bearer good-token");
    client.expect(&format!("AUTH XOAUTH2 {malformed}"), 501);
    // Without an initial response: an empty 334, then the string.
    client.expect("AUTH XOAUTH2", 334);
    let good = BASE64.encode("user=pbx@acme.test\x01auth=Bearer good-token\x01\x01");
    client.expect(&good, 235);
    assert_eq!(client.send_message("a@x", &["b@x"], "hi"), 250);

    let attempts = server.oauth_attempts();
    let summary: Vec<(Option<&str>, bool, Option<&str>)> = attempts
        .iter()
        .map(|a| (a.token.as_deref(), a.accepted, a.client_ack.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("stale"), false, Some("")),
            (Some("good-token"), false, Some("")),
            (None, false, None),
            (Some("good-token"), true, None),
        ]
    );
    assert_eq!(attempts[1].user.as_deref(), Some("other@acme.test"));
    let m = server.wait_for_messages(1, WAIT);
    assert_eq!(m[0].auth_token.as_deref(), Some("good-token"));
}

#[test]
fn oauthbearer_is_offered_on_request_and_parsed_per_rfc7628() {
    let server = TestServer::start(oauth_opts(true), None);
    let mut client = Client::connect(&server);
    client.reply();
    let ehlo = client.expect("EHLO c", 250);
    assert_eq!(
        ehlo.last().map(String::as_str),
        Some("AUTH OAUTHBEARER XOAUTH2")
    );
    let bad = BASE64
        .encode("n,a=pbx@acme.test,\x01host=localhost\x01port=25\x01auth=Bearer nope\x01\x01");
    client.expect(&format!("AUTH OAUTHBEARER {bad}"), 334);
    client.expect("AQ==", 535);
    let good = BASE64.encode(
        "n,a=pbx@acme.test,\x01host=localhost\x01port=25\x01auth=Bearer good-token\x01\x01",
    );
    client.expect(&format!("AUTH OAUTHBEARER {good}"), 235);
    assert_eq!(client.send_message("a@x", &["b@x"], "hi"), 250);

    let attempts = server.oauth_attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].mechanism, "OAUTHBEARER");
    assert_eq!(attempts[0].client_ack.as_deref(), Some("AQ=="));
    assert_eq!(attempts[1].user.as_deref(), Some("pbx@acme.test"));
    assert_eq!(attempts[1].host.as_deref(), Some("localhost"));
    assert_eq!(attempts[1].port.as_deref(), Some("25"));
    let m = server.wait_for_messages(1, WAIT);
    assert_eq!(m[0].auth_mechanism.as_deref(), Some("OAUTHBEARER"));
    assert_eq!(m[0].auth_token.as_deref(), Some("good-token"));
}

#[test]
fn scripted_auth_refusal_answers_an_oauth_response_directly() {
    let opts = ServerOptions {
        faults: vec![(
            "AUTH".into(),
            1,
            Fault::Reply("535 5.7.3 Authentication unsuccessful".into()),
        )],
        ..oauth_opts(false)
    };
    let server = TestServer::start(opts, None);
    let mut client = Client::connect(&server);
    client.reply();
    client.expect("EHLO c", 250);
    let good = BASE64.encode("user=pbx@acme.test\x01auth=Bearer good-token\x01\x01");
    // The first AUTH gets the scripted 535 at once, even with a good token.
    let (code, text) = client.cmd(&format!("AUTH XOAUTH2 {good}"));
    assert_eq!(
        (code, text),
        (535, vec!["5.7.3 Authentication unsuccessful".into()])
    );
    client.expect(&format!("AUTH XOAUTH2 {good}"), 235);
    let attempts = server.oauth_attempts();
    assert_eq!(attempts.len(), 2);
    assert!(!attempts[0].accepted && attempts[0].client_ack.is_none());
    assert!(attempts[1].accepted);
}

#[test]
fn oauth_beside_password_auth_and_only_after_starttls() {
    let ca = TestCa::new();
    let opts = ServerOptions {
        tls: Tls::StartTls,
        require_auth: Some(("user".into(), "secret".into())),
        ..oauth_opts(false)
    };
    let server = TestServer::start(opts, Some(&ca));
    let mut client = Client::connect(&server);
    client.reply();
    let ehlo = client.expect("EHLO c", 250);
    assert!(!ehlo.iter().any(|l| l.starts_with("AUTH")), "{ehlo:?}");
    let good = BASE64.encode("user=pbx@acme.test\x01auth=Bearer good-token\x01\x01");
    client.expect(&format!("AUTH XOAUTH2 {good}"), 530);
    client.starttls(&ca);
    let ehlo = client.expect("EHLO c", 250);
    assert_eq!(
        ehlo.last().map(String::as_str),
        Some("AUTH PLAIN LOGIN XOAUTH2")
    );
    client.expect(&format!("AUTH XOAUTH2 {good}"), 235);
    assert_eq!(client.send_message("a@x", &["b@x"], "hi"), 250);
    let m = server.wait_for_messages(1, WAIT);
    assert!(m[0].tls);
    assert_eq!(m[0].auth_token.as_deref(), Some("good-token"));
}

// ---------------------------------------------------------------------------
// OAuth test endpoint
// ---------------------------------------------------------------------------

/// A raw HTTPS/1.1 exchange: sends `request` as is, returns (status, headers, body).
fn https_raw(server: &OAuthServer, ca: &TestCa, request: &str) -> (u16, String, String) {
    let tcp = TcpStream::connect(server.addr()).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut stream = tls_wrap(&tcp, ca);
    stream.write_all(request.as_bytes()).expect("write request");
    stream.flush().expect("flush");
    let mut raw = Vec::new();
    // The server closes after one response (with close_notify).
    stream.read_to_end(&mut raw).expect("read response");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let status = head[9..12].parse().expect("status code");
    (status, head.to_string(), body.to_string())
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn form_decoding_handles_escapes_plus_and_empty_values() {
    assert_eq!(
        decode_form("a=1&b=x+y&c=%2Fp%3Fq%3D%26&d=&e&f=%C3%A9"),
        Some(vec![
            ("a".into(), "1".into()),
            ("b".into(), "x y".into()),
            ("c".into(), "/p?q=&".into()),
            ("d".into(), "".into()),
            ("e".into(), "".into()),
            ("f".into(), "é".into()),
        ])
    );
    assert_eq!(decode_form("a=%2"), None);
    assert_eq!(decode_form("a=%zz"), None);
    assert_eq!(decode_form(""), Some(vec![]));
}

#[test]
fn oauth_server_answers_queue_then_handler_then_404_and_records_forms() {
    let ca = TestCa::new();
    let server = OAuthServer::start(&ca);
    assert!(server.url("/token").starts_with("https://localhost:"));
    let (status, head, body) = https_raw(&server, &ca, &post("/token", "x=1"));
    assert_eq!(status, 404, "{head}");
    assert_eq!(body, r#"{"error":"not_found"}"#);

    server.push("/token", Response::error("invalid_grant"));
    server.push("/token", Response::token("at-1", 3600, Some("rt-2")));
    server.set_handler(|req| {
        Response::json(
            200,
            serde_json::json!({ "echo": req.param("scope").unwrap_or("") }),
        )
    });
    assert_eq!(server.pending("/token"), 2);
    let form = "grant_type=refresh_token&refresh_token=r%2Bt%2F1&client_id=C&scope=a+b%3Ac";
    let (status, head, body) = https_raw(&server, &ca, &post("/token", form));
    assert_eq!(status, 400);
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert!(head.contains("Connection: close"), "{head}");
    assert_eq!(body, r#"{"error":"invalid_grant"}"#);
    let (status, _, body) = https_raw(&server, &ca, &post("/token", form));
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["access_token"], "at-1");
    assert_eq!(json["refresh_token"], "rt-2");
    assert_eq!(json["expires_in"], 3600);
    let (_, _, body) = https_raw(&server, &ca, &post("/token?x=y", form));
    assert_eq!(body, r#"{"echo":"a b:c"}"#);
    assert_eq!(server.pending("/token"), 0);

    let requests = server.requests_to("/token");
    assert_eq!(requests.len(), 4);
    let r = &requests[1];
    assert_eq!(r.method, "POST");
    assert_eq!(r.grant_type(), "refresh_token");
    assert_eq!(r.param("refresh_token"), Some("r+t/1"));
    assert_eq!(r.param("client_id"), Some("C"));
    assert_eq!(r.param("scope"), Some("a b:c"));
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(requests[3].query, "x=y");
    assert_eq!(server.count("/token"), 4);
    assert_eq!(server.count("/device"), 0);
    assert_eq!(server.connections(), 4);
}

#[test]
fn oauth_server_reads_chunked_bodies() {
    let ca = TestCa::new();
    let server = OAuthServer::start_with(&ca, |_| Response::text(503, "busy"));
    let request = "POST /device HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
                   9\r\nclient_id\r\n4\r\n=C&s\r\n6\r\ncope=S\r\n0\r\n\r\n";
    let (status, head, body) = https_raw(&server, &ca, request);
    assert_eq!(status, 503, "{head}");
    assert_eq!(body, "busy");
    let r = &server.requests()[0];
    assert_eq!(r.path, "/device");
    assert_eq!(r.param("client_id"), Some("C"));
    assert_eq!(r.param("scope"), Some("S"));
}

#[test]
fn oauth_server_works_with_ureq_over_the_test_ca_and_refuses_others() {
    let ca = TestCa::new();
    let server = OAuthServer::start_with(&ca, |req| {
        Response::token(
            &format!("for-{}", req.param("client_id").unwrap_or("")),
            121,
            None,
        )
    });
    let roots = vec![ureq::tls::Certificate::from_der(ca.ca_der().as_ref()).to_owned()];
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .build(),
    );
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{}/token", server.port());
        let mut response = agent
            .post(&url)
            .send_form([("client_id", "c&d é"), ("grant_type", "refresh_token")])
            .expect("POST");
        assert_eq!(response.status().as_u16(), 200);
        let body = response.body_mut().read_to_string().expect("body");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(json["access_token"], "for-c&d é");
        assert_eq!(json["expires_in"], 121);
    }
    assert_eq!(server.count("/token"), 2);

    // A client that does not trust the test CA fails the handshake.
    let other = TestCa::new();
    let tcp = TcpStream::connect(server.addr()).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = ClientConnection::new(client_config(&other), name).expect("client");
    let mut sock = tcp.try_clone().expect("clone socket");
    let mut failed = false;
    while conn.is_handshaking() {
        if conn.complete_io(&mut sock).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "handshake with an untrusted CA succeeded");
    drop(sock);
    drop(tcp);
    assert!(
        crate::support::harness::wait_until(WAIT, || server.tls_failures() == 1),
        "tls_failures = {}",
        server.tls_failures()
    );
    assert_eq!(server.count("/token"), 2);
}

#[test]
fn oauth_server_goes_down_and_comes_back_on_the_same_port() {
    let ca = TestCa::new();
    let server = OAuthServer::start_with(&ca, |_| Response::token("at", 3600, None));
    let addr = server.addr();
    assert_eq!(https_raw(&server, &ca, &post("/token", "")).0, 200);
    server.down();
    assert!(!server.is_up());
    let err = TcpStream::connect(addr).expect_err("connect while down");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    server.up();
    assert!(server.is_up());
    assert_eq!(server.addr(), addr);
    assert_eq!(https_raw(&server, &ca, &post("/token", "")).0, 200);
    assert_eq!(server.count("/token"), 2);
}

#[test]
fn oauth_server_drop_does_not_wait_for_delayed_responses() {
    let ca = TestCa::new();
    let server = OAuthServer::start_with(&ca, |_| {
        Response::token("at", 3600, None).delayed(Duration::from_secs(60))
    });
    let tcp = TcpStream::connect(server.addr()).expect("connect");
    let mut stream = tls_wrap(&tcp, &ca);
    stream
        .write_all(post("/token", "a=b").as_bytes())
        .expect("write");
    stream.flush().expect("flush");
    assert_eq!(server.wait_for_requests("/token", 1, WAIT).len(), 1);
    let started = Instant::now();
    server.stop();
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn closed_port_refuses_connections_and_is_not_handed_out_again() {
    let port = crate::support::harness::closed_port();
    for _ in 0..3 {
        let refused = TcpStream::connect(("127.0.0.1", port));
        assert!(
            matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
            "{refused:?}"
        );
    }
    // New servers get other ports while it is held.
    let servers: Vec<_> = (0..50)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    for server in &servers {
        assert_ne!(server.local_addr().expect("addr").port(), port);
    }
}
