//! The daemon delivering, end to end: mail spooled by `pbxmail sendmail` goes
//! to scripted test SMTP servers on 127.0.0.1 over plain SMTP, STARTTLS and
//! implicit TLS (fresh handshakes, certificates, credentials never in the
//! clear), temporary and permanent failures per recipient and after DATA,
//! black-holed and refusing relays, transparency on the wire, SIGTERM with a
//! stuck session, config errors and systemd readiness. The tests assert on
//! what arrived (server side) and what the spool still holds (`pbxmail queue
//! --json`). Each test owns its temp dir, spool and servers; what `sendmail`
//! itself does is in sendmail.rs.

use std::time::{Duration, Instant};

use crate::support::harness::{
    attempts, closed_port, commands, plain_tenant, recipients, str_of, tenant, wait_until, Daemon,
    Running,
};
use crate::support::mail::{body, headers, message};
use crate::support::smtp_server::{ServerOptions, TestCa, TestServer, Tls};
use serde_json::Value;

/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(10);

const USER: &str = "pbx@acme.test";
const PASSWORD: &str = "s3cret-pw";

fn sent_verb(server: &TestServer, verb: &str) -> bool {
    commands(server)
        .iter()
        .any(|c| c.to_ascii_uppercase().starts_with(verb))
}

/// Waits until the one queued message has been tried at least once; returns it.
fn wait_for_first_attempt(daemon: &Daemon) -> Value {
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1 && attempts(&q[0]) >= 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert!(attempts(&queue[0]) >= 1, "never attempted: {queue:#?}");
    queue[0].clone()
}

// ---------------------------------------------------------------------------
// Required by the issue.
// ---------------------------------------------------------------------------

#[test]
fn two_messages_over_starttls_use_two_fresh_handshakes() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut daemon = Daemon::bare("two_starttls_handshakes");
    let relay = format!("localhost:{}", server.port());
    let extra = format!(
        "tls = starttls\n{}username = {USER}\npassword = {PASSWORD}\nmessages_per_session = 1\n",
        daemon.trust(&ca)
    );
    daemon.configure(&tenant("acme", "acme.test", &relay, &extra));
    daemon.start();

    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "first", "body one"),
    );
    daemon.submit(
        &["bob@example.com"],
        &message("pbx@acme.test", "bob@example.com", "second", "body two"),
    );

    let mut got = server.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2, "{got:#?}");
    got.sort_by_key(|m| m.rcpt_to.clone());
    assert_eq!(got[0].rcpt_to, ["alice@example.com"]);
    assert_eq!(got[0].mail_from, "pbx@acme.test");
    assert!(headers(&got[0]).contains("Subject: first"));
    assert_eq!(body(&got[0]), "body one\r\n");
    assert_eq!(got[1].rcpt_to, ["bob@example.com"]);
    assert!(headers(&got[1]).contains("Subject: second"));
    assert_eq!(body(&got[1]), "body two\r\n");
    for m in &got {
        assert!(m.tls, "sent outside TLS: {m:#?}");
        assert_eq!(m.auth_user.as_deref(), Some(USER));
    }
    assert_ne!(got[0].connection, got[1].connection);
    assert_eq!(server.tls_handshakes(), 2);

    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // The password never travels in the clear, so AUTH only ever follows STARTTLS.
    let cmds = server.commands();
    for (conn, cmd) in &cmds {
        if cmd.to_ascii_uppercase().starts_with("AUTH") {
            let starttls_before = cmds
                .iter()
                .take_while(|(c, x)| !(c == conn && x == cmd))
                .any(|(c, x)| c == conn && x.eq_ignore_ascii_case("STARTTLS"));
            assert!(starttls_before, "AUTH before STARTTLS: {cmds:?}");
        }
    }
}

#[test]
fn black_holed_relay_does_not_delay_other_tenants() {
    let hole = TestServer::start(
        ServerOptions {
            greet: false,
            ..ServerOptions::default()
        },
        None,
    );
    let healthy = TestServer::start(ServerOptions::default(), None);
    let slow = "connect_timeout = 30s\ncommand_timeout = 30s\n";
    let config =
        plain_tenant("a", "a.test", &hole, slow) + &plain_tenant("b", "b.test", &healthy, "");
    let mut daemon = Daemon::new("black_hole", &config);
    daemon.start();

    daemon.submit(
        &["x@example.com"],
        &message("pbx@a.test", "x@example.com", "to the hole", "a"),
    );
    // Tenant a is now stuck waiting for a greeting that never comes.
    assert_eq!(hole.wait_for_connections(1, ARRIVAL), 1);

    let started = Instant::now();
    daemon.submit(
        &["y@example.com"],
        &message("pbx@b.test", "y@example.com", "healthy", "b"),
    );
    // Far below a's 30 s timeouts, which b would wait out if it shared a's
    // loop; the rest is room for a loaded CI machine.
    let bound = Duration::from_secs(8);
    let got = healthy.wait_for_messages(1, bound);
    let elapsed = started.elapsed();
    assert_eq!(
        got.len(),
        1,
        "tenant b's mail did not arrive within {bound:?}"
    );
    assert!(elapsed < bound, "took {elapsed:?}");
    assert_eq!(got[0].rcpt_to, ["y@example.com"]);

    // b's message leaves the spool; a's stays, still waiting for its first answer.
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "tenant"), "a");
    assert_eq!(recipients(&queue[0]), ["x@example.com"]);
}

#[test]
fn starttls_required_but_not_offered_sends_no_mail() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            advertise_starttls: false,
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let relay = format!("127.0.0.1:{}", server.port());
    let extra = format!("tls = starttls\nusername = {USER}\npassword = {PASSWORD}\n");
    let mut daemon = Daemon::new(
        "starttls_not_offered",
        &tenant("acme", "acme.test", &relay, &extra),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "secret", "x"),
    );

    let entry = wait_for_first_attempt(&daemon);
    assert!(server.connections() >= 1);
    assert!(!sent_verb(&server, "MAIL"), "{:?}", commands(&server));
    assert!(!sent_verb(&server, "AUTH"), "{:?}", commands(&server));
    assert!(server.messages().is_empty());
    assert_eq!(server.tls_handshakes(), 0);
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        str_of(&entry, "last_error").contains("STARTTLS"),
        "{entry:#?}"
    );
}

#[test]
fn config_errors_name_file_and_line() {
    let daemon = Daemon::bare("config_errors");
    let spool = daemon.dir().join("spool");
    let head = format!("[daemon]\nspool_dir = {}\n", spool.display());
    // Line numbers below count from 1 with `head` taking lines 1-2.
    let cases: &[(&str, String, usize)] = &[
        (
            "unknown_key.ini",
            format!(
                "{head}\n[tenant:acme]\ndomains = acme.test\nrelay = 127.0.0.1:25\nrelay_host = x\n"
            ),
            7,
        ),
        (
            "bad_duration.ini",
            format!("{head}retry_min = 5 parsecs\n"),
            3,
        ),
        (
            "bad_relay.ini",
            format!("{head}[tenant:acme]\ndomains = acme.test\nrelay = nohost-noport\n"),
            5,
        ),
        (
            "shared_domain.ini",
            format!(
                "{head}[tenant:a]\ndomains = acme.test\nrelay = 127.0.0.1:25\n\
                 [tenant:b]\nrelay = 127.0.0.1:26\ndomains = ACME.test\n"
            ),
            8,
        ),
    ];
    for (name, text, line) in cases {
        let path = daemon.write_file(name, text);
        let file = path.to_string_lossy().into_owned();
        let run = daemon.run(&["check-config", "-c", &file], b"");
        assert_eq!(run.code, 78, "{name}: {run:?}");
        let want = format!("{file}:{line}:");
        assert!(
            run.stderr.lines().any(|l| l.starts_with(&want)),
            "{name}: expected a line starting {want:?} in {:?}",
            run.stderr
        );
    }

    // Every problem is reported, not just the first.
    let all = daemon.write_file(
        "all.ini",
        &format!(
            "{head}retry_min = soon\n[tenant:acme]\ndomains = acme.test\nrelay = nowhere\nbogus = 1\n"
        ),
    );
    let file = all.to_string_lossy().into_owned();
    let run = daemon.run(&["check-config", "-c", &file], b"");
    assert_eq!(run.code, 78, "{run:?}");
    for line in [3, 6, 7] {
        let want = format!("{file}:{line}:");
        assert!(run.stderr.contains(&want), "{want} missing: {}", run.stderr);
    }

    // The daemon refuses the same file with the same code, before touching the spool.
    let run = daemon.run(&["daemon", "-c", &file], b"");
    assert_eq!(run.code, 78, "{run:?}");
    assert!(run.stderr.contains(&format!("{file}:6:")), "{}", run.stderr);
    assert!(!spool.exists());

    // A good file passes.
    let good = daemon.write_file(
        "good.ini",
        &format!("{head}[tenant:acme]\ndomains = acme.test\nrelay = 127.0.0.1:25\n"),
    );
    let file = good.to_string_lossy().into_owned();
    let run = daemon.run(&["check-config", "-c", &file], b"");
    assert_eq!(run.code, 0, "{run:?}");
}

// ---------------------------------------------------------------------------
// Faulty relays.
// ---------------------------------------------------------------------------

#[test]
fn temporary_rcpt_failure_is_deferred_and_retried() {
    let (mut daemon, server) = Daemon::with_relay(
        "rcpt_450",
        ServerOptions {
            rcpt_reply: Some("450 4.2.0 Mailbox busy".into()),
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "busy", "x"),
    );

    // retry_min = 1s: the second attempt follows about a second after the first.
    assert!(server.wait_for_connections(2, Duration::from_secs(8)) >= 2);
    assert!(server.messages().is_empty());
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1 && attempts(&q[0]) >= 2);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    let entry = &queue[0];
    assert_eq!(str_of(entry, "state"), "deferred", "{entry:#?}");
    assert!(attempts(entry) >= 2, "{entry:#?}");
    assert_eq!(recipients(entry), ["alice@example.com"]);
    assert!(entry["next_attempt"].is_string(), "{entry:#?}");
    let error = str_of(entry, "last_error");
    assert!(
        error.contains("450") && error.contains("Mailbox busy"),
        "{entry:#?}"
    );
}

#[test]
fn permanent_failure_of_one_recipient_bounces_only_it_to_the_sender() {
    let (mut daemon, server) = Daemon::with_relay(
        "rcpt_550_one_of_two",
        ServerOptions {
            rcpt_reply_for: vec![("gone@example.com".into(), "550 5.1.1 No such user".into())],
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["gone@example.com", "ok@example.com"],
        &message("pbx@acme.test", "ok@example.com", "half", "x"),
    );

    let got = server.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2, "the message and its bounce");
    assert_eq!(got[0].rcpt_to, ["ok@example.com"]);
    let dsn = &got[1];
    assert_eq!(dsn.mail_from, "", "a bounce has the null sender");
    assert_eq!(dsn.rcpt_to, ["pbx@acme.test"]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(
        text.contains("Final-Recipient: rfc822; gone@example.com"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(
        !text.contains("Final-Recipient: rfc822; ok@example.com"),
        "{text}"
    );
    assert!(
        text.contains("Subject: half"),
        "original headers quoted: {text}"
    );
    daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
}

#[test]
fn untrusted_certificate_is_refused_before_anything_is_sent() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let relay = format!("localhost:{}", server.port());
    // No ca_file: the test CA is not among the system's trust anchors.
    let extra = format!("tls = starttls\nusername = {USER}\npassword = {PASSWORD}\n");
    let mut daemon = Daemon::new(
        "untrusted_cert",
        &tenant("acme", "acme.test", &relay, &extra),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "secret", "x"),
    );

    let entry = wait_for_first_attempt(&daemon);
    assert!(!sent_verb(&server, "MAIL"), "{:?}", commands(&server));
    assert!(!sent_verb(&server, "AUTH"), "{:?}", commands(&server));
    assert_eq!(server.tls_handshakes(), 0);
    assert!(server.messages().is_empty());
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    let error = str_of(&entry, "last_error").to_ascii_lowercase();
    assert!(
        error.contains("certificate") || error.contains("trusted"),
        "{entry:#?}"
    );
}

#[test]
fn wrong_password_is_deferred_not_bounced() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut daemon = Daemon::bare("wrong_password");
    let relay = format!("127.0.0.1:{}", server.port());
    let extra = format!(
        "tls = starttls\n{}username = {USER}\npassword = not-the-password\n",
        daemon.trust(&ca)
    );
    daemon.configure(&tenant("acme", "acme.test", &relay, &extra));
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "hello", "x"),
    );

    let entry = wait_for_first_attempt(&daemon);
    assert!(sent_verb(&server, "AUTH"), "{:?}", commands(&server));
    assert!(!sent_verb(&server, "MAIL"), "{:?}", commands(&server));
    assert!(server.messages().is_empty());
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert_eq!(recipients(&entry), ["alice@example.com"]);
    assert!(str_of(&entry, "last_error").contains("535"), "{entry:#?}");
    assert!(
        !serde_json::to_string(&entry)
            .unwrap()
            .contains("not-the-password"),
        "secret in queue output: {entry:#?}"
    );
}

#[test]
fn plaintext_relay_never_gets_credentials() {
    let server = TestServer::start(
        ServerOptions {
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        },
        None,
    );
    let extra = format!("username = {USER}\npassword = {PASSWORD}\nallow_plaintext_auth = no\n");
    let mut daemon = Daemon::new(
        "plaintext_auth_refused",
        &plain_tenant("acme", "acme.test", &server, &extra),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "hello", "x"),
    );

    let entry = wait_for_first_attempt(&daemon);
    assert!(server.connections() >= 1);
    assert!(!sent_verb(&server, "AUTH"), "{:?}", commands(&server));
    assert!(server.messages().is_empty());
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        !serde_json::to_string(&entry).unwrap().contains(PASSWORD),
        "secret in queue output: {entry:#?}"
    );
}

#[test]
fn refused_connection_defers_and_keeps_the_message() {
    let port = closed_port();
    let relay = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::new(
        "connect_refused",
        &tenant(
            "acme",
            "acme.test",
            &relay,
            "tls = none\nconnect_timeout = 2s\n",
        ),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "hello", "x"),
    );
    let entry = wait_for_first_attempt(&daemon);
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert_eq!(recipients(&entry), ["alice@example.com"]);
    assert!(entry["next_attempt"].is_string(), "{entry:#?}");
    assert!(!str_of(&entry, "last_error").is_empty(), "{entry:#?}");

    // Still there, byte for byte, after an orderly restart.
    let size = entry["size"].as_u64();
    assert_eq!(daemon.stop().code(), Some(0));
    let queue = daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(queue[0]["id"], entry["id"]);
    assert_eq!(queue[0]["size"].as_u64(), size);
}

// ---------------------------------------------------------------------------
// Delivery paths and message handling.
// ---------------------------------------------------------------------------

#[test]
fn implicit_tls_tenant_delivers() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::Implicit,
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut daemon = Daemon::bare("implicit_tls");
    let relay = format!("localhost:{}", server.port());
    let extra = format!("tls = implicit\n{}", daemon.trust(&ca));
    daemon.configure(&tenant("acme", "acme.test", &relay, &extra));
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "over 465", "sealed"),
    );

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert!(got[0].tls);
    assert_eq!(body(&got[0]), "sealed\r\n");
    assert_eq!(server.tls_handshakes(), 1);
    assert!(!sent_verb(&server, "STARTTLS"));
}

#[test]
fn dots_and_line_ends_survive_transparency() {
    let (mut daemon, server) = Daemon::with_relay("transparency", ServerOptions::default(), "");
    daemon.start();
    let head = "From: pbx@acme.test\nTo: alice@example.com\n";
    // Bare LF throughout, dot lines, and no newline at the very end.
    let lf = format!("{head}Subject: lf\n\n.\n..\n.x\n\nmiddle\nend without newline");
    // The same body with CRLF: must not turn into CR CR LF.
    let crlf = format!("{head}Subject: crlf\n\n.\n..\n.x\n\nmiddle\nend without newline")
        .replace('\n', "\r\n");
    daemon.submit(&["alice@example.com"], lf.as_bytes());
    daemon.submit(&["alice@example.com"], crlf.as_bytes());

    let got = server.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2);
    for m in &got {
        assert_eq!(
            body(m),
            ".\r\n..\r\n.x\r\n\r\nmiddle\r\nend without newline\r\n",
            "{}",
            headers(m)
        );
        // No bare CR or LF anywhere on the wire.
        let data = &m.data;
        for (i, &b) in data.iter().enumerate() {
            if b == b'\n' {
                assert!(
                    i > 0 && data[i - 1] == b'\r',
                    "bare LF at {i}: {:?}",
                    m.text()
                );
            }
            if b == b'\r' {
                assert_eq!(
                    data.get(i + 1),
                    Some(&b'\n'),
                    "bare CR at {i}: {:?}",
                    m.text()
                );
            }
        }
    }
}

#[test]
fn messages_to_one_tenant_share_a_session() {
    let (mut daemon, server) = Daemon::with_relay("shared_session", ServerOptions::default(), "");
    // Queued while the daemon is stopped, so all three are due together.
    daemon.start();
    assert_eq!(daemon.stop().code(), Some(0));
    for n in 0..3 {
        daemon.submit(
            &["alice@example.com"],
            &message("pbx@acme.test", "alice@example.com", &format!("n{n}"), "x"),
        );
    }
    daemon.start();
    let got = server.wait_for_messages(3, ARRIVAL);
    assert_eq!(got.len(), 3);
    assert_eq!(server.connections(), 1, "{:?}", commands(&server));
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn black_holed_relay_times_out_and_defers() {
    let hole = TestServer::start(
        ServerOptions {
            greet: false,
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = Daemon::new(
        "black_hole_timeout",
        &plain_tenant(
            "acme",
            "acme.test",
            &hole,
            "connect_timeout = 2s\ncommand_timeout = 1s\n",
        ),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "void", "x"),
    );
    assert_eq!(hole.wait_for_connections(1, ARRIVAL), 1);
    // From the connection on: a 1 s command_timeout, not the default 300 s.
    let started = Instant::now();
    let entry = wait_for_first_attempt(&daemon);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a 1 s command_timeout took {:?}",
        started.elapsed()
    );
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert_eq!(recipients(&entry), ["alice@example.com"]);
    assert!(!str_of(&entry, "last_error").is_empty(), "{entry:#?}");
    // The session was given up: the tenant backs off and tries again later.
    assert!(hole.wait_for_connections(2, ARRIVAL) >= 2);
}

#[test]
fn sigterm_during_a_stuck_session_exits_and_keeps_the_message() {
    let hole = TestServer::start(
        ServerOptions {
            greet: false,
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = Daemon::new(
        "sigterm_stuck",
        &plain_tenant(
            "acme",
            "acme.test",
            &hole,
            "connect_timeout = 30s\ncommand_timeout = 30s\n",
        ),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "stuck", "x"),
    );
    assert_eq!(hole.wait_for_connections(1, ARRIVAL), 1);

    // The daemon waits at most 10 s for the session, far less than its 30 s timeout.
    let started = Instant::now();
    let status = daemon.stop();
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "{:?}",
        started.elapsed()
    );
    let queue = daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(recipients(&queue[0]), ["alice@example.com"]);
    assert_ne!(str_of(&queue[0], "state"), "failed", "{queue:#?}");
}

#[test]
fn partial_tempfail_retries_only_the_deferred_recipient() {
    let (mut daemon, server) = Daemon::with_relay(
        "partial_tempfail",
        ServerOptions {
            rcpt_reply_for: vec![("busy@example.com".into(), "451 4.3.0 Try later".into())],
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["ok@example.com", "busy@example.com"],
        &message("pbx@acme.test", "ok@example.com", "half", "x"),
    );

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["ok@example.com"]);
    // The retry (about 1 s later) asks for busy@ only: ok@ gets no duplicate.
    assert!(server.wait_for_connections(2, ARRIVAL) >= 2);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1 && attempts(&q[0]) >= 2);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "state"), "deferred", "{queue:#?}");
    assert_eq!(recipients(&queue[0]), ["busy@example.com"]);
    let later: Vec<String> = server
        .commands()
        .into_iter()
        .filter(|(conn, c)| *conn > 0 && c.to_ascii_uppercase().starts_with("RCPT"))
        .map(|(_, c)| c)
        .collect();
    assert!(!later.is_empty());
    assert!(
        later.iter().all(|c| c.contains("busy@example.com")),
        "{later:?}"
    );
    assert_eq!(server.messages().len(), 1, "ok@ got a duplicate");
}

#[test]
fn tempfail_after_data_defers_every_recipient() {
    let (mut daemon, server) = Daemon::with_relay(
        "data_452",
        ServerOptions {
            data_reply: Some("452 4.3.1 Insufficient system storage".into()),
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["a@example.com", "b@example.com"],
        &message("pbx@acme.test", "a@example.com", "full", "x"),
    );
    let entry = wait_for_first_attempt(&daemon);
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert_eq!(recipients(&entry), ["a@example.com", "b@example.com"]);
    assert!(str_of(&entry, "last_error").contains("452"), "{entry:#?}");
    assert!(server.messages().is_empty());
}

#[test]
fn permfail_after_data_bounces_and_a_refused_bounce_stays_failed() {
    // The relay refuses every message, the bounce included, and no
    // postmaster is configured: the bounce stays visible, nothing retries.
    let (mut daemon, server) = Daemon::with_relay(
        "data_554",
        ServerOptions {
            data_reply: Some("554 5.7.1 Message rejected as spam".into()),
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["a@example.com", "b@example.com"],
        &message("pbx@acme.test", "a@example.com", "spam", "x"),
    );
    // The original is failed for a moment before its bounce replaces it.
    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 1 && str_of(&q[0], "state") == "failed" && str_of(&q[0], "sender").is_empty()
    });
    assert_eq!(queue.len(), 1, "{queue:#?}");
    let bounce = &queue[0];
    assert_eq!(str_of(bounce, "sender"), "", "{bounce:#?}");
    assert_eq!(recipients(bounce), ["pbx@acme.test"]);
    assert!(str_of(bounce, "last_error").contains("554"), "{bounce:#?}");
    assert!(server.messages().is_empty());
    assert!(server.wait_for_idle(ARRIVAL), "{:?}", server.commands());
    let commands_at_rest = server.commands().len();
    // No retry of a permanent failure: nothing more is said to the relay.
    let retried = wait_until(Duration::from_secs(3), || {
        server.commands().len() > commands_at_rest
    });
    assert!(!retried, "{:?}", server.commands());
}

#[test]
fn dot_lines_across_buffer_boundaries_survive_transparency() {
    let (mut daemon, server) =
        Daemon::with_relay("transparency_large", ServerOptions::default(), "");
    daemon.start();
    // About 300 KB of lines of every length from 1 to 97, most starting with
    // a dot, so that dots and line ends fall on every offset of the
    // sender's and receiver's read buffers.
    let mut lines = Vec::new();
    for i in 0..6000usize {
        let len = 1 + i % 97;
        let line = match i % 4 {
            0 => ".".repeat(len),
            1 => format!(".{}", "x".repeat(len - 1)),
            2 => "y".repeat(len),
            _ => format!("..{}", "z".repeat(len.saturating_sub(2))),
        };
        lines.push(line);
    }
    let input = format!(
        "From: pbx@acme.test\nTo: alice@example.com\nSubject: big\n\n{}\n",
        lines.join("\n")
    );
    daemon.submit(&["alice@example.com"], input.as_bytes());

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    let expected = format!("{}\r\n", lines.join("\r\n"));
    let actual = body(&got[0]);
    if actual != expected {
        let at = actual
            .bytes()
            .zip(expected.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(actual.len().min(expected.len()));
        let from = at.saturating_sub(40);
        panic!(
            "bodies differ at byte {at} (lengths {} vs {}): got {:?}, want {:?}",
            actual.len(),
            expected.len(),
            &actual[from..(at + 40).min(actual.len())],
            &expected[from..(at + 40).min(expected.len())]
        );
    }
}

/// Type=notify: systemd starts the next unit only on READY=1, which must come
/// once the daemon takes mail (its pickup socket exists), not before.
#[test]
fn tells_systemd_ready_once_it_takes_mail() {
    use std::os::unix::net::UnixDatagram;
    let (daemon, server) = Daemon::with_relay("sd_notify", ServerOptions::default(), "");
    let notify = daemon.dir().join("notify.sock");
    let systemd = UnixDatagram::bind(&notify).expect("bind the notify socket");
    systemd
        .set_read_timeout(Some(ARRIVAL))
        .expect("read timeout");
    let notify_text = notify.display().to_string();
    let _running = Running::start_with_env(&daemon, &[("NOTIFY_SOCKET", notify_text.as_str())]);
    let mut buf = [0u8; 256];
    let n = systemd
        .recv(&mut buf)
        .expect("a notification within the timeout");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(daemon.spool_dir().join("pickup.sock").exists());
    daemon.submit(
        &["x@example.com"],
        &message("pbx@acme.test", "x@example.com", "after ready", "x"),
    );
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);
}

// ---------------------------------------------------------------------------
// Limits (issue 15).
// ---------------------------------------------------------------------------

/// The `Max open files` soft and hard limits in a /proc/PID/limits text.
fn open_file_limits(limits: &str) -> (String, String) {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().expect("soft limit").to_string();
    let hard = fields.next().expect("hard limit").to_string();
    (soft, hard)
}

/// Started with a soft limit of 256 (below the hard one), the daemon raises
/// its soft limit to the hard one before it serves, and logs it at debug.
#[test]
fn raises_the_soft_open_file_limit_to_the_hard_one() {
    use std::process::{Command, Stdio};
    let own = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let (_, hard) = open_file_limits(&own);
    if hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        eprintln!("skipped: the hard open file limit {hard} leaves nothing to raise");
        return;
    }
    let (daemon, _server) = Daemon::with_relay("nofile", ServerOptions::default(), "");
    let log = std::fs::File::create(daemon.dir().join("daemon.log")).expect("create log");
    // sh lowers only the soft limit, then becomes the daemon (same pid).
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -S -n 256 && exec \"$0\" daemon -c \"$1\"")
        .arg(crate::support::harness::PBXMAIL)
        .arg(daemon.config_path())
        .env_remove("PBXMAIL_CONFIG")
        .env_remove("PBXMAIL_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn sh");
    let socket = daemon.spool_dir().join("pickup.sock");
    let ready = wait_until(ARRIVAL, || {
        socket.exists() || matches!(child.try_wait(), Ok(Some(_)))
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready && socket.exists(),
        "daemon not ready: {}",
        daemon.log()
    );
    let (soft, daemon_hard) = open_file_limits(&limits.expect("read the daemon's limits"));
    assert_eq!(daemon_hard, hard);
    assert_eq!(soft, hard, "soft limit not raised");
    let log = daemon.log();
    assert!(
        log.contains(&format!(
            "open file limit: raised from 256 to the hard limit {hard}"
        )),
        "{log}"
    );
}

/// More tenants than one daemon serves: refused with the reason, by
/// check-config and at start (exit 78, the spool untouched), never an abort.
#[test]
fn too_many_tenants_are_refused_with_a_clear_error() {
    let daemon = Daemon::bare("too_many_tenants");
    let spool = daemon.dir().join("spool");
    let mut text = format!("[daemon]\nspool_dir = {}\n", spool.display());
    for i in 0..=50_000 {
        text.push_str(&format!(
            "[tenant:t{i}]\ndomains = t{i}.test\nrelay = 127.0.0.1:25\n"
        ));
    }
    let path = daemon.write_file("many.ini", &text);
    let file = path.to_string_lossy().into_owned();
    // Line 3 + 3 lines for each of the 50,000 tenants that fit.
    let want = format!("{file}:150003: [tenant:t50000]: more than 50000 tenants");
    for command in ["check-config", "daemon"] {
        let run = daemon.run(&[command, "-c", &file], b"");
        assert_eq!(run.code, 78, "{command}: {run:?}");
        assert!(run.stderr.contains(&want), "{command}: {}", run.stderr);
    }
    assert!(!spool.exists());
}

/// How many threads the process has now (Linux: one entry per task).
fn threads_of(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |tasks| tasks.count())
}

/// One tenant's object in `pbxmail status --json` (Null if absent), and how many are listed.
fn tenant_status(daemon: &Daemon, name: &str) -> (Value, usize) {
    let run = daemon.run(&["status", "--json"], b"");
    assert_eq!(run.code, 0, "status --json failed: {run:?}");
    let status: Value = serde_json::from_str(&run.stdout).expect("status --json is JSON");
    let tenants = status["tenants"].as_array().cloned().unwrap_or_default();
    let one = tenants
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or(Value::Null);
    (one, tenants.len())
}

#[test]
fn idle_tenants_cost_no_thread_and_one_restarted_for_new_mail_keeps_its_counters() {
    let relay = TestServer::start(ServerOptions::default(), None);
    let tenants: String = (0..50)
        .map(|n| plain_tenant(&format!("t{n}"), &format!("t{n}.test"), &relay, ""))
        .collect();
    let daemon = Daemon::new("idle_threads", &tenants);
    let running = Running::start_with_env(&daemon, &[("PBXMAIL_DEBUG_IDLE_MS", "200")]);
    let pid = running.pid();
    for tenant in ["t3", "t41"] {
        let from = format!("pbx@{tenant}.test");
        daemon.submit(
            &["alice@example.com"],
            &message(&from, "alice@example.com", "first", "x"),
        );
    }
    assert_eq!(relay.wait_for_messages(2, ARRIVAL).len(), 2);
    // Every tenant's thread retires once it has nothing to send: what is
    // left is the dispatcher and its few helpers (two when measured), not
    // 50 tenant threads.
    let mut threads = threads_of(&pid);
    let retired = wait_until(ARRIVAL, || {
        threads = threads_of(&pid);
        threads <= 6
    });
    assert!(retired, "{threads} threads with 50 idle tenants");
    let (t3, listed) = tenant_status(&daemon, "t3");
    assert_eq!(listed, 50, "status lists every configured tenant");
    assert_eq!(
        (t3["delivered"].as_u64(), t3["state"].as_str()),
        (Some(1), Some("idle"))
    );

    // New mail starts t3's thread again; its counters carry on.
    daemon.submit(
        &["bob@example.com"],
        &message("pbx@t3.test", "bob@example.com", "second", "x"),
    );
    assert_eq!(relay.wait_for_messages(3, ARRIVAL).len(), 3);
    let counted = wait_until(ARRIVAL, || {
        tenant_status(&daemon, "t3").0["delivered"].as_u64() == Some(2)
    });
    assert!(counted, "{:#?}", tenant_status(&daemon, "t3").0);
    assert!(tenant_status(&daemon, "t3").0["last_success"].is_string());
    let retired = wait_until(ARRIVAL, || threads_of(&pid) <= 6);
    assert!(retired, "{} threads once idle again", threads_of(&pid));
}

#[test]
fn a_reload_that_restarts_a_tenant_keeps_its_status_counters() {
    let (daemon, relay) = Daemon::with_relay("reload_counters", ServerOptions::default(), "");
    let running = Running::start(&daemon);
    daemon.submit(
        &["alice@example.com"],
        &message(USER, "alice@example.com", "before", "x"),
    );
    assert_eq!(relay.wait_for_messages(1, ARRIVAL).len(), 1);
    assert!(wait_until(ARRIVAL, || {
        tenant_status(&daemon, "acme").0["delivered"].as_u64() == Some(1)
    }));
    // A changed tenant gets a new thread with its new settings.
    daemon.configure(&plain_tenant(
        "acme",
        "acme.test",
        &relay,
        "messages_per_session = 5",
    ));
    running.reload();
    // The new thread starts once the old one has ended, maybe after the reload's log line.
    let restarted = wait_until(ARRIVAL, || {
        daemon
            .log()
            .contains("reload: starting tenant acme with its new settings")
    });
    assert!(restarted, "{}", daemon.log());
    assert_eq!(
        tenant_status(&daemon, "acme").0["delivered"].as_u64(),
        Some(1)
    );
    daemon.submit(
        &["bob@example.com"],
        &message(USER, "bob@example.com", "after", "x"),
    );
    assert_eq!(relay.wait_for_messages(2, ARRIVAL).len(), 2);
    let counted = wait_until(ARRIVAL, || {
        tenant_status(&daemon, "acme").0["delivered"].as_u64() == Some(2)
    });
    assert!(counted, "{:#?}", tenant_status(&daemon, "acme").0);
}
