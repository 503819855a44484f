//! Delivery policy and tenant isolation, end to end: one faulty relay among
//! ten tenants never delays the other nine; permanent failures become RFC 3464
//! bounces (to the sender, else the postmaster, never a bounce of a bounce);
//! max_queue_lifetime, rate_limit, SIGHUP reloads, SIGTERM with a session in
//! flight, and a panicking tenant worker. The daemon is spawned here rather
//! than through `Daemon::start` because these tests signal it by pid; the
//! harness still provides the temp dir, config, spool, `sendmail` and `queue`.

use std::collections::BTreeMap;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::harness::{
    attempts, closed_port, count_commands, plain_tenant, recipients, str_of, tenant, wait_until,
    Daemon, Running, PBXMAIL,
};
use crate::support::mail::{field, note, parse_headers, subject};
use crate::support::smtp_server::{Fault, Received, ServerOptions, TestServer};
use serde_json::Value;

/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(10);
/// How long the healthy tenants get, from the start of their submissions,
/// while another tenant's relay is faulty: below the tarpit's 10 s per reply
/// and far below the faulty tenant's 30 s timeouts, so a healthy tenant that
/// waited for the faulty one cannot make it; the rest is room for 27
/// sendmail processes and their fsyncs on a loaded 2-core CI machine.
const ISOLATION_BOUND: Duration = Duration::from_secs(8);
/// The daemon waits at most 10 s for sessions in progress at SIGTERM.
const SIGTERM_BOUND: Duration = Duration::from_secs(12);
/// Upper bound for the next step of a flow whose relays hold every final
/// reply: a few held replies plus a tenant restart, on a loaded machine.
const HOLD_BOUND: Duration = Duration::from_secs(20);

const USER: &str = "pbx@shared.test";
const PASSWORD: &str = "s3cret-pw";

// ---------------------------------------------------------------------------
// Configuration and submission helpers.
// ---------------------------------------------------------------------------

/// Writes the whole config: a `[daemon]` section for this spool (retry_min =
/// 1s, retry_max = 4s), `daemon_extra` lines in it, then the tenant sections.
fn configure(daemon: &Daemon, daemon_extra: &str, tenants: &str) {
    daemon.configure_with(daemon_extra, tenants);
}

fn config_text(daemon: &Daemon, daemon_extra: &str, tenants: &str) -> String {
    format!("{}\n{tenants}", daemon.daemon_section(daemon_extra))
}

/// A `[tenant:NAME]` section relaying without TLS to `relay`.
fn tenant_at(name: &str, domain: &str, relay: &str, extra: &str) -> String {
    tenant(name, domain, relay, &format!("tls = none\n{extra}"))
}

/// `pbxmail sendmail -i TO` against another config file (same spool): for
/// submitting while the daemon's own config file is deliberately invalid.
fn submit_with_config(config: &Path, from: &str, to: &str, subject: &str) {
    use std::io::Write;
    let mut child = Command::new(PBXMAIL)
        .args(["sendmail", "-i", to])
        .env("PBXMAIL_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pbxmail sendmail");
    let mut stdin = child.stdin.take().expect("stdin pipe");
    stdin
        .write_all(&note(from, to, subject))
        .expect("write message");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for sendmail");
    assert!(
        out.status.success(),
        "sendmail ({subject}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn of_tenant<'a>(queue: &'a [Value], tenant: &str) -> Vec<&'a Value> {
    queue
        .iter()
        .filter(|e| str_of(e, "tenant") == tenant)
        .collect()
}

/// How often each subject arrived, over all the given servers.
fn subject_counts(servers: &[&TestServer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for server in servers {
        for m in server.messages() {
            *counts.entry(subject(&m)).or_insert(0) += 1;
        }
    }
    counts
}

// ---------------------------------------------------------------------------
// The daemon as a child process we can signal.
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// A small RFC 3464 reader: enough MIME to check a bounce's structure.
// ---------------------------------------------------------------------------

/// The value of `name=` in a header like `multipart/report; boundary="x"`.
fn parameter(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Header fields in order, unfolded: (name, value).
type Fields = Vec<(String, String)>;

struct Part {
    headers: Fields,
    body: String,
}

struct Dsn {
    headers: Vec<(String, String)>,
    parts: Vec<Part>,
}

impl Dsn {
    fn parse(m: &Received) -> Dsn {
        let text = m.text();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no header/body separator in {text:?}"));
        let headers = parse_headers(head);
        let content_type = field(&headers, "Content-Type").unwrap_or("");
        let boundary = parameter(content_type, "boundary")
            .unwrap_or_else(|| panic!("no boundary in {content_type:?}:\n{text}"));
        let (open, close) = (format!("--{boundary}"), format!("--{boundary}--"));
        let mut parts = Vec::new();
        let mut current: Option<Vec<&str>> = None;
        let mut closed = false;
        for line in body.split("\r\n") {
            if line == close {
                parts.extend(current.take());
                closed = true;
                break;
            }
            if line == open {
                parts.extend(current.replace(Vec::new()));
            } else if let Some(lines) = current.as_mut() {
                lines.push(line);
            }
        }
        assert!(closed, "no closing delimiter {close:?} in:\n{text}");
        let parts = parts
            .into_iter()
            .map(|lines| {
                let joined = lines.join("\r\n");
                let (head, body) = joined.split_once("\r\n\r\n").unwrap_or((&joined, ""));
                Part {
                    headers: parse_headers(head),
                    body: body.to_string(),
                }
            })
            .collect();
        Dsn { headers, parts }
    }

    fn content_types(&self) -> Vec<String> {
        self.parts
            .iter()
            .map(|p| {
                let ct = field(&p.headers, "Content-Type").unwrap_or("text/plain");
                ct.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .collect()
    }

    fn part(&self, content_type: &str) -> &Part {
        let types = self.content_types();
        let index = types
            .iter()
            .position(|t| t == content_type)
            .unwrap_or_else(|| panic!("no {content_type} part; parts are {types:?}"));
        &self.parts[index]
    }

    /// The message/delivery-status part: per-message fields, then one group
    /// of fields per recipient (RFC 3464 §2.1), groups separated by blank lines.
    fn status_groups(&self) -> (Fields, Vec<Fields>) {
        let body = &self.part("message/delivery-status").body;
        let mut groups = body
            .split("\r\n\r\n")
            .map(parse_headers)
            .filter(|g| !g.is_empty());
        let per_message = groups.next().unwrap_or_default();
        (per_message, groups.collect())
    }

    /// Checks the RFC 3464 frame every bounce has.
    fn assert_report_shape(&self) {
        let content_type = field(&self.headers, "Content-Type").unwrap_or("");
        assert!(
            content_type
                .to_ascii_lowercase()
                .starts_with("multipart/report"),
            "{content_type}"
        );
        assert_eq!(
            parameter(content_type, "report-type").as_deref(),
            Some("delivery-status"),
            "{content_type}"
        );
        assert_eq!(
            self.content_types(),
            [
                "text/plain",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );
        let (per_message, _) = self.status_groups();
        assert_eq!(
            field(&per_message, "Reporting-MTA"),
            Some("dns; pbx.test"),
            "{per_message:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Isolation: one faulty relay among ten tenants.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Faulty {
    /// Accepts TCP, never greets.
    BlackHole,
    /// Nothing listens: connection refused.
    RefusedPort,
    /// 10 s before each reply after the greeting.
    Tarpit,
    /// Greets with 421.
    Greeting421,
    /// 450 to every RCPT.
    RcptTempfail,
    /// The faulty tenant shares a relay (host:port) with a healthy one, with a
    /// wrong password.
    SharedRelayWrongPassword,
}

/// Nine healthy tenants' 27 messages, submitted after the faulty tenant's
/// mail is stuck, all arrive within ISOLATION_BOUND; the faulty tenant's mail
/// is still queued, not lost, and not failed.
fn healthy_tenants_are_not_delayed_by(fault: Faulty, test: &str) {
    let _log = healthy_tenants_are_not_delayed_within(fault, test, "");
}

/// The same, with `[daemon]` lines such as a session budget smaller than
/// the ten busy tenants. Returns the daemon's log.
fn healthy_tenants_are_not_delayed_within(fault: Faulty, test: &str, daemon_lines: &str) -> String {
    let slow = "connect_timeout = 30s\ncommand_timeout = 30s\ndata_timeout = 30s\n";
    let healthy = TestServer::start(ServerOptions::default(), None);
    let tarpit_faults = || {
        let mut faults = Vec::new();
        for verb in ["EHLO", "HELO", "MAIL", "RCPT", "DATA", ".", "QUIT"] {
            for n in 1..=5 {
                faults.push((verb.to_string(), n, Fault::Delay(Duration::from_secs(10))));
            }
        }
        faults
    };
    let faulty_server = match fault {
        Faulty::RefusedPort => None,
        Faulty::BlackHole => Some(ServerOptions {
            greet: false,
            ..ServerOptions::default()
        }),
        Faulty::Tarpit => Some(ServerOptions {
            faults: tarpit_faults(),
            ..ServerOptions::default()
        }),
        Faulty::Greeting421 => Some(ServerOptions {
            greeting: Some("421 4.3.2 go away".into()),
            ..ServerOptions::default()
        }),
        Faulty::RcptTempfail => Some(ServerOptions {
            rcpt_reply: Some("450 4.2.0 mailbox busy".into()),
            ..ServerOptions::default()
        }),
        Faulty::SharedRelayWrongPassword => Some(ServerOptions {
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        }),
    }
    .map(|opts| TestServer::start(opts, None));
    let faulty_relay = match &faulty_server {
        Some(server) => format!("127.0.0.1:{}", server.port()),
        None => format!("127.0.0.1:{}", closed_port()),
    };
    let shared = matches!(fault, Faulty::SharedRelayWrongPassword);
    let login = |password: &str| {
        format!("allow_plaintext_auth = yes\nusername = {USER}\npassword = {password}\n")
    };

    let mut tenants = if shared {
        tenant_at(
            "bad",
            "bad.test",
            &faulty_relay,
            &(slow.to_string() + &login("wrong-password")),
        )
    } else {
        tenant_at("bad", "bad.test", &faulty_relay, slow)
    };
    for n in 1..=9 {
        let (name, domain) = (format!("h{n}"), format!("h{n}.test"));
        if shared && n == 1 {
            // h1 logs in correctly on the very relay where "bad" fails.
            tenants += &tenant_at(&name, &domain, &faulty_relay, &login(PASSWORD));
        } else {
            tenants += &plain_tenant(&name, &domain, &healthy, "");
        }
    }
    let daemon = Daemon::bare(test);
    configure(&daemon, daemon_lines, &tenants);
    let _running = Running::start(&daemon);

    for i in 1..=2 {
        daemon.submit_note("pbx@bad.test", "x@example.com", &format!("bad-{i}"));
    }
    // The faulty tenant is stuck (in a session) or backed off (after a failure).
    let stuck = match fault {
        Faulty::BlackHole => faulty_server
            .as_ref()
            .is_some_and(|s| s.wait_for_connections(1, ARRIVAL) >= 1),
        Faulty::Tarpit => faulty_server
            .as_ref()
            .is_some_and(|s| s.wait_for_command("EHLO", ARRIVAL)),
        _ => {
            let queue = daemon.wait_for_queue(ARRIVAL, |q| {
                of_tenant(q, "bad").iter().any(|e| attempts(e) >= 1)
            });
            of_tenant(&queue, "bad").iter().any(|e| attempts(e) >= 1)
        }
    };
    assert!(stuck, "the faulty tenant never reached its relay");

    let started = Instant::now();
    std::thread::scope(|scope| {
        for n in 1..=9 {
            let daemon = &daemon;
            scope.spawn(move || {
                for i in 1..=3 {
                    let from = format!("pbx@h{n}.test");
                    daemon.submit_note(&from, "user@example.com", &format!("h{n}-{i}"));
                }
            });
        }
    });
    let submitted = started.elapsed();
    let (on_healthy, on_shared) = if shared { (24, 3) } else { (27, 0) };
    let got = healthy.wait_for_messages(on_healthy, ISOLATION_BOUND.saturating_sub(submitted));
    let shared_got = match (&faulty_server, shared) {
        (Some(server), true) => {
            let left = ISOLATION_BOUND.saturating_sub(started.elapsed());
            server.wait_for_messages(on_shared, left)
        }
        _ => Vec::new(),
    };
    assert!(
        got.len() >= on_healthy && shared_got.len() >= on_shared,
        "{fault:?}: only {} + {} of 27 healthy messages arrived within {ISOLATION_BOUND:?} \
         (submitting took {submitted:?})",
        got.len(),
        shared_got.len()
    );

    let mut servers = vec![&healthy];
    if let Some(server) = &faulty_server {
        servers.push(server);
    }
    let counts = subject_counts(&servers);
    for n in 1..=9 {
        for i in 1..=3 {
            let subject = format!("h{n}-{i}");
            assert_eq!(counts.get(&subject), Some(&1), "{subject}: {counts:?}");
        }
    }
    assert!(
        !counts.keys().any(|s| s.starts_with("bad-")),
        "the faulty tenant's mail got through: {counts:?}"
    );
    for m in &shared_got {
        assert_eq!(m.auth_user.as_deref(), Some(USER), "{m:#?}");
    }

    let queue = daemon.queue();
    let bad = of_tenant(&queue, "bad");
    assert_eq!(bad.len(), 2, "faulty tenant's mail lost: {queue:#?}");
    for entry in bad {
        assert_ne!(str_of(entry, "state"), "failed", "{entry:#?}");
        assert_eq!(recipients(entry), ["x@example.com"], "{entry:#?}");
    }
    daemon.log()
}

#[test]
fn isolation_black_holed_relay() {
    healthy_tenants_are_not_delayed_by(Faulty::BlackHole, "iso_black_hole");
}

#[test]
fn isolation_refused_connection() {
    healthy_tenants_are_not_delayed_by(Faulty::RefusedPort, "iso_refused");
}

#[test]
fn isolation_tarpit_relay() {
    healthy_tenants_are_not_delayed_by(Faulty::Tarpit, "iso_tarpit");
}

#[test]
fn isolation_421_greeting() {
    healthy_tenants_are_not_delayed_by(Faulty::Greeting421, "iso_421");
}

#[test]
fn isolation_tempfail_on_every_rcpt() {
    healthy_tenants_are_not_delayed_by(Faulty::RcptTempfail, "iso_rcpt_450");
}

#[test]
fn isolation_shared_relay_with_a_wrong_password() {
    healthy_tenants_are_not_delayed_by(Faulty::SharedRelayWrongPassword, "iso_shared_auth");
}

#[test]
fn isolation_black_holed_relay_with_3_session_slots_for_10_busy_tenants() {
    let log = healthy_tenants_are_not_delayed_within(
        Faulty::BlackHole,
        "iso_slots_hole",
        "max_sessions = 3\n",
    );
    assert!(
        log.contains("waiting for a session slot"),
        "the budget never bound:\n{log}"
    );
}

#[test]
fn isolation_tarpit_relay_with_3_session_slots_for_10_busy_tenants() {
    let log = healthy_tenants_are_not_delayed_within(
        Faulty::Tarpit,
        "iso_slots_tarpit",
        "max_sessions = 3\n",
    );
    assert!(
        log.contains("waiting for a session slot"),
        "the budget never bound:\n{log}"
    );
}

#[test]
fn isolation_shared_relay_with_a_wrong_password_and_2_connections_per_relay() {
    healthy_tenants_are_not_delayed_within(
        Faulty::SharedRelayWrongPassword,
        "iso_slots_shared",
        "max_sessions = 3\nmax_connections_per_relay = 2\n",
    );
}

#[test]
fn failing_relay_backs_off_the_tenant_not_each_message() {
    // 421 at the greeting: the relay itself refuses. Five queued messages
    // must cost one connection per backoff interval, not one each.
    let relay = TestServer::start(
        ServerOptions {
            greeting: Some("421 4.3.2 go away".into()),
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("tenant_backoff");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &relay, ""));
    for i in 1..=5 {
        daemon.submit_note("pbx@acme.test", "a@example.com", &format!("m{i}"));
    }
    let _running = Running::start(&daemon);
    assert_eq!(
        relay.wait_for_connections(1, ARRIVAL),
        1,
        "the relay was never tried"
    );
    // The window opens at the first failure, not when the queue shows it.
    let window = Instant::now();
    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 5 && q.iter().all(|e| attempts(e) >= 1)
    });
    assert!(
        queue.len() == 5 && queue.iter().all(|e| attempts(e) >= 1),
        "{queue:#?}"
    );
    // Backoff 1 s, 2 s, 4 s (±10%): within 4 s of the first failure at most
    // the probes at ~1 s and ~3 s follow it; one retry per message would be
    // five connections at ~1 s.
    let left = Duration::from_secs(4).saturating_sub(window.elapsed());
    let too_many = wait_until(left, || relay.connections() > 3);
    assert!(
        !too_many,
        "{} connections within {:?}: the messages were retried one by one",
        relay.connections(),
        window.elapsed()
    );
    assert!(relay.connections() >= 2, "the relay was never probed again");
    let queue = daemon.queue();
    assert_eq!(queue.len(), 5, "{queue:#?}");
    for entry in &queue {
        assert_eq!(str_of(entry, "state"), "deferred", "{entry:#?}");
    }
    assert_eq!(count_commands(&relay, "MAIL"), 0);
}

// ---------------------------------------------------------------------------
// Bounces.
// ---------------------------------------------------------------------------

#[test]
fn bounce_is_a_well_formed_rfc3464_report_for_the_failed_recipients_only() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![
                ("gone@example.com".into(), "550 5.1.1 No such user".into()),
                ("closed@example.com".into(), "553 5.7.1 Relay denied".into()),
            ],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("dsn_fields");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &server, ""));
    let _running = Running::start(&daemon);
    let original = b"From: Voicemail <pbx@acme.test>\nTo: ok@example.com\nSubject: voicemail 101\nX-Pbx-Extension: 101\n\nsecret body text\n";
    let run = daemon.sendmail(
        &[
            "-i",
            "gone@example.com",
            "ok@example.com",
            "closed@example.com",
        ],
        original,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);

    let got = server.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2, "the message and its bounce: {got:#?}");
    assert_eq!(got[0].rcpt_to, ["ok@example.com"]);
    let dsn_msg = &got[1];
    assert_eq!(dsn_msg.mail_from, "", "a bounce has the null sender");
    assert_eq!(dsn_msg.rcpt_to, ["pbx@acme.test"]);

    let dsn = Dsn::parse(dsn_msg);
    dsn.assert_report_shape();
    assert!(
        field(&dsn.headers, "To").is_some_and(|t| t.contains("pbx@acme.test")),
        "{:?}",
        dsn.headers
    );
    assert!(field(&dsn.headers, "From").is_some_and(|f| f.contains("MAILER-DAEMON@pbx.test")));
    assert_eq!(
        field(&dsn.headers, "Auto-Submitted"),
        Some("auto-replied"),
        "{:?}",
        dsn.headers
    );
    assert!(field(&dsn.headers, "Message-ID").is_some());
    assert!(field(&dsn.headers, "Date").is_some());

    let (per_message, per_rcpt) = dsn.status_groups();
    assert!(
        field(&per_message, "Arrival-Date").is_some(),
        "{per_message:?}"
    );
    assert_eq!(
        per_rcpt.len(),
        2,
        "one group per failed recipient: {per_rcpt:?}"
    );
    let expect = [
        ("gone@example.com", "5.1.1", "smtp; 550 5.1.1 No such user"),
        (
            "closed@example.com",
            "5.7.1",
            "smtp; 553 5.7.1 Relay denied",
        ),
    ];
    for (address, status, diagnostic) in expect {
        let group = per_rcpt
            .iter()
            .find(|g| field(g, "Final-Recipient") == Some(&format!("rfc822; {address}")))
            .unwrap_or_else(|| panic!("no group for {address}: {per_rcpt:?}"));
        assert_eq!(field(group, "Action"), Some("failed"), "{group:?}");
        assert_eq!(field(group, "Status"), Some(status), "{group:?}");
        assert_eq!(
            field(group, "Remote-MTA"),
            Some("dns; 127.0.0.1"),
            "{group:?}"
        );
        assert_eq!(
            field(group, "Diagnostic-Code"),
            Some(diagnostic),
            "{group:?}"
        );
    }
    assert!(
        !per_rcpt
            .iter()
            .any(|g| field(g, "Final-Recipient") == Some("rfc822; ok@example.com")),
        "the delivered recipient is reported: {per_rcpt:?}"
    );

    let quoted = parse_headers(&dsn.part("text/rfc822-headers").body);
    assert_eq!(
        field(&quoted, "Subject"),
        Some("voicemail 101"),
        "{quoted:?}"
    );
    assert_eq!(field(&quoted, "X-Pbx-Extension"), Some("101"), "{quoted:?}");
    assert!(
        !dsn_msg.text().contains("secret body text"),
        "the original body is quoted"
    );

    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(
        queue.is_empty(),
        "original or bounce left behind: {queue:#?}"
    );
}

#[test]
fn bounce_refused_by_the_sender_goes_to_the_postmaster_once() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![
                ("gone@example.com".into(), "550 5.1.1 No such user".into()),
                (
                    "pbx@acme.test".into(),
                    "550 5.1.1 Sender mailbox unknown".into(),
                ),
            ],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("dsn_to_postmaster");
    configure(
        &daemon,
        "postmaster = pm@acme.test",
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    daemon.submit_note("pbx@acme.test", "gone@example.com", "to nobody");

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{got:#?}");
    let dsn_msg = &got[0];
    assert_eq!(dsn_msg.mail_from, "");
    assert_eq!(dsn_msg.rcpt_to, ["pm@acme.test"]);
    let dsn = Dsn::parse(dsn_msg);
    dsn.assert_report_shape();
    let (_, per_rcpt) = dsn.status_groups();
    assert_eq!(per_rcpt.len(), 1, "{per_rcpt:?}");
    assert_eq!(
        field(&per_rcpt[0], "Final-Recipient"),
        Some("rfc822; gone@example.com")
    );
    assert_eq!(field(&per_rcpt[0], "Status"), Some("5.1.1"));

    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // The sender was asked once; nothing bounced the bounce.
    assert_eq!(count_commands(&server, "RCPT TO:<pbx@acme.test>"), 1);
    assert_eq!(count_commands(&server, "RCPT TO:<pm@acme.test>"), 1);
    assert_eq!(server.messages().len(), 1);
}

#[test]
fn bounce_refused_by_sender_and_postmaster_stays_failed_and_is_never_bounced() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![
                ("gone@example.com".into(), "550 5.1.1 No such user".into()),
                (
                    "pbx@acme.test".into(),
                    "550 5.1.1 Sender mailbox unknown".into(),
                ),
                ("pm@acme.test".into(), "550 5.1.1 Postmaster unknown".into()),
            ],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("dsn_nowhere");
    configure(
        &daemon,
        "postmaster = pm@acme.test",
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    daemon.submit_note("pbx@acme.test", "gone@example.com", "to nobody");

    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 1 && str_of(&q[0], "state") == "failed" && recipients(&q[0]) == ["pm@acme.test"]
    });
    assert_eq!(queue.len(), 1, "{queue:#?}");
    let bounce = &queue[0];
    assert_eq!(str_of(bounce, "state"), "failed", "{bounce:#?}");
    assert_eq!(str_of(bounce, "sender"), "", "{bounce:#?}");
    assert_eq!(recipients(bounce), ["pm@acme.test"], "{bounce:#?}");
    // Nothing more is sent: no retry, no bounce of the bounce.
    assert!(server.wait_for_idle(ARRIVAL), "{:?}", server.commands());
    let at_rest = server.commands().len();
    let more = wait_until(Duration::from_secs(3), || server.commands().len() > at_rest);
    assert!(!more, "{:?}", server.commands());
    assert!(server.messages().is_empty());
    assert_eq!(
        count_commands(&server, "MAIL FROM:<>"),
        2,
        "{:?}",
        server.commands()
    );
}

#[test]
fn null_sender_message_that_fails_bounces_to_the_postmaster() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![("gone@example.com".into(), "550 5.1.1 No such user".into())],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("null_sender_pm");
    configure(
        &daemon,
        "postmaster = pm@acme.test",
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    let run = daemon.sendmail(
        &["-i", "-f", "<>", "gone@example.com"],
        &note("pbx@acme.test", "gone@example.com", "null sender"),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, ["pm@acme.test"]);
    let dsn = Dsn::parse(&got[0]);
    dsn.assert_report_shape();
    let (_, per_rcpt) = dsn.status_groups();
    assert_eq!(
        field(&per_rcpt[0], "Final-Recipient"),
        Some("rfc822; gone@example.com")
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // The original went out with the null sender, and was never sent to its (absent) sender.
    assert_eq!(
        count_commands(&server, "MAIL FROM:<>"),
        2,
        "{:?}",
        server.commands()
    );
    assert_eq!(
        count_commands(&server, "RCPT"),
        2,
        "{:?}",
        server.commands()
    );
}

#[test]
fn null_sender_message_without_postmaster_stays_failed_and_sends_no_bounce() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![("gone@example.com".into(), "550 5.1.1 No such user".into())],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("null_sender_nowhere");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &server, ""));
    let _running = Running::start(&daemon);
    let run = daemon.sendmail(
        &["-i", "-f", "<>", "gone@example.com"],
        &note("pbx@acme.test", "gone@example.com", "null sender"),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);

    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 1 && str_of(&q[0], "state") == "failed"
    });
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "sender"), "");
    assert_eq!(recipients(&queue[0]), ["gone@example.com"]);
    assert!(
        str_of(&queue[0], "last_error").contains("550"),
        "{queue:#?}"
    );
    assert!(server.wait_for_idle(ARRIVAL), "{:?}", server.commands());
    let at_rest = server.commands().len();
    let more = wait_until(Duration::from_secs(3), || server.commands().len() > at_rest);
    assert!(!more, "{:?}", server.commands());
    assert!(server.messages().is_empty());
    assert_eq!(
        count_commands(&server, "MAIL"),
        1,
        "{:?}",
        server.commands()
    );
    assert_eq!(daemon.queue().len(), 1);
}

#[test]
fn envelope_from_is_the_mail_from_of_bounces_too() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![("gone@example.com".into(), "550 5.1.1 No such user".into())],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("dsn_envelope_from");
    configure(
        &daemon,
        "",
        &plain_tenant(
            "acme",
            "acme.test",
            &server,
            "envelope_from = login@acme.test\n",
        ),
    );
    let _running = Running::start(&daemon);
    daemon.submit_note("pbx@acme.test", "gone@example.com", "rewritten");

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].mail_from, "login@acme.test", "{got:#?}");
    assert_eq!(got[0].rcpt_to, ["pbx@acme.test"]);
    Dsn::parse(&got[0]).assert_report_shape();
    // The original's MAIL FROM was rewritten as well.
    let mails: Vec<String> = server
        .commands()
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| c.to_ascii_uppercase().starts_with("MAIL"))
        .collect();
    assert_eq!(mails.len(), 2, "{mails:?}");
    assert!(
        mails.iter().all(|c| c.contains("<login@acme.test>")),
        "{mails:?}"
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

// ---------------------------------------------------------------------------
// max_queue_lifetime.
// ---------------------------------------------------------------------------

#[test]
fn message_deferred_past_max_queue_lifetime_bounces_with_4_4_7() {
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![("slow@example.com".into(), "450 4.2.0 Mailbox busy".into())],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("expiry");
    configure(
        &daemon,
        "max_queue_lifetime = 2s",
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    let started = Instant::now();
    daemon.submit_note("pbx@acme.test", "slow@example.com", "too slow");

    let got = server.wait_for_messages(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "no bounce after expiry: {got:#?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "bounced before the lifetime ended: {:?}",
        started.elapsed()
    );
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, ["pbx@acme.test"]);
    let dsn = Dsn::parse(&got[0]);
    dsn.assert_report_shape();
    let (_, per_rcpt) = dsn.status_groups();
    assert_eq!(per_rcpt.len(), 1, "{per_rcpt:?}");
    let group = &per_rcpt[0];
    assert_eq!(
        field(group, "Final-Recipient"),
        Some("rfc822; slow@example.com")
    );
    assert_eq!(field(group, "Action"), Some("failed"), "{group:?}");
    assert_eq!(field(group, "Status"), Some("4.4.7"), "{group:?}");
    assert!(
        field(group, "Diagnostic-Code").is_some_and(|d| d.contains("450")),
        "the last error is reported: {group:?}"
    );
    // It was retried before it expired.
    assert!(
        count_commands(&server, "RCPT TO:<slow@example.com>") >= 2,
        "{:?}",
        server.commands()
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

// ---------------------------------------------------------------------------
// rate_limit.
// ---------------------------------------------------------------------------

#[test]
fn rate_limit_paces_one_tenant_and_not_the_other() {
    let paced = TestServer::start(ServerOptions::default(), None);
    let free = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("rate_limit");
    configure(
        &daemon,
        "",
        &(plain_tenant("paced", "paced.test", &paced, "rate_limit = 2/s\n")
            + &plain_tenant("free", "free.test", &free, "")),
    );
    // Queued before the daemon starts, so all ten are due at once.
    for i in 1..=10 {
        daemon.submit_note("pbx@paced.test", "a@example.com", &format!("paced-{i}"));
        daemon.submit_note("pbx@free.test", "a@example.com", &format!("free-{i}"));
    }
    let started = Instant::now();
    let _running = Running::start(&daemon);

    let got_free = free.wait_for_messages(10, ARRIVAL);
    let free_took = started.elapsed();
    let paced_by_then = paced.messages().len();
    let got_paced = paced.wait_for_messages(10, Duration::from_secs(15));
    let paced_took = started.elapsed();
    assert_eq!(got_free.len(), 10, "{got_free:#?}");
    assert_eq!(
        got_paced.len(),
        10,
        "only {} paced arrived",
        got_paced.len()
    );
    // Burst 2, then one every 0.5 s: about 4 s for the other eight.
    assert!(
        paced_took >= Duration::from_secs(3),
        "rate_limit = 2/s did not pace: 10 messages in {paced_took:?}"
    );
    // The unlimited tenant's ten go in one session, not at the paced rate:
    // they are all in while the paced tenant still has some to send (a
    // comparison of two counts, not of clock readings on a loaded machine).
    assert!(
        paced_by_then < 10,
        "the unlimited tenant was paced too: its ten took {free_took:?}, \
         by when all ten paced ones were in as well (paced took {paced_took:?})"
    );
    let counts = subject_counts(&[&paced, &free]);
    assert_eq!(counts.len(), 20, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

// ---------------------------------------------------------------------------
// Reload (SIGHUP), and one daemon per spool.
// ---------------------------------------------------------------------------

#[test]
fn reload_adds_a_tenant() {
    let server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("reload_add");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &server, ""));
    let running = Running::start(&daemon);

    let refused = daemon.sendmail(
        &["-i", "a@example.com"],
        &note("pbx@newco.test", "a@example.com", "too early"),
    );
    assert_eq!(refused.code, 65, "{refused:?}");

    configure(
        &daemon,
        "",
        &(plain_tenant("acme", "acme.test", &server, "")
            + &plain_tenant("newco", "newco.test", &server, "")),
    );
    running.reload();
    daemon.submit_note("pbx@newco.test", "a@example.com", "welcome");
    daemon.submit_note("pbx@acme.test", "a@example.com", "still here");
    let got = server.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2, "{got:#?}");
    let counts = subject_counts(&[&server]);
    assert_eq!(counts.get("welcome"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("still here"), Some(&1), "{counts:?}");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn reload_removing_a_tenant_stops_it_and_keeps_its_mail() {
    let healthy = TestServer::start(ServerOptions::default(), None);
    let busy = TestServer::start(
        ServerOptions {
            rcpt_reply: Some("450 4.2.0 Mailbox busy".into()),
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("reload_remove");
    let both = plain_tenant("acme", "acme.test", &healthy, "")
        + &plain_tenant("gone", "gone.test", &busy, "");
    configure(&daemon, "", &both);
    let running = Running::start(&daemon);
    daemon.submit_note("pbx@gone.test", "a@example.com", "left behind");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1 && attempts(&q[0]) >= 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");

    configure(
        &daemon,
        "",
        &plain_tenant("acme", "acme.test", &healthy, ""),
    );
    running.reload();
    let after_reload = busy.connections();
    // retry_max is 4 s: a tenant still running would try again within ~4.4 s.
    // One attempt may already have been under way when the signal came.
    let retried = wait_until(Duration::from_secs(6), || {
        busy.connections() > after_reload + 1
    });
    assert!(
        !retried,
        "the removed tenant kept trying: {} connections after the reload",
        busy.connections() - after_reload
    );
    let queue = daemon.queue();
    assert_eq!(
        queue.len(),
        1,
        "the removed tenant's mail is gone: {queue:#?}"
    );
    assert_eq!(str_of(&queue[0], "tenant"), "gone");
    assert_eq!(recipients(&queue[0]), ["a@example.com"]);
    assert_ne!(str_of(&queue[0], "state"), "failed", "{queue:#?}");
    // The remaining tenant still delivers.
    daemon.submit_note("pbx@acme.test", "b@example.com", "acme after");
    assert_eq!(healthy.wait_for_messages(1, ARRIVAL).len(), 1);

    // Back, with a relay that works: the kept mail goes out.
    configure(
        &daemon,
        "",
        &(plain_tenant("acme", "acme.test", &healthy, "")
            + &plain_tenant("gone", "gone.test", &healthy, "")),
    );
    running.reload();
    let got = healthy.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2, "{got:#?}");
    let counts = subject_counts(&[&healthy]);
    assert_eq!(counts.get("left behind"), Some(&1), "{counts:?}");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert!(busy.messages().is_empty());
}

#[test]
fn reload_moves_a_changed_tenant_and_its_deferred_mail_to_the_new_relay() {
    // The old relay takes one message, then says 450 to every further RCPT.
    let old_faults = (2..=200)
        .map(|n| {
            let fault = Fault::Reply("450 4.3.2 old relay busy".into());
            ("RCPT".to_string(), n, fault)
        })
        .collect();
    let old = TestServer::start(
        ServerOptions {
            faults: old_faults,
            ..ServerOptions::default()
        },
        None,
    );
    let new = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("reload_change");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &old, ""));
    let running = Running::start(&daemon);
    daemon.submit_note("pbx@acme.test", "a@example.com", "before");
    assert_eq!(old.wait_for_messages(1, ARRIVAL).len(), 1);
    daemon.submit_note("pbx@acme.test", "b@example.com", "deferred");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1 && attempts(&q[0]) >= 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "state"), "deferred", "{queue:#?}");

    configure(&daemon, "", &plain_tenant("acme", "acme.test", &new, ""));
    running.reload();
    daemon.submit_note("pbx@acme.test", "c@example.com", "after");
    // Both the mail deferred under the old settings and the new mail go to
    // the new relay. (Without a status command the test cannot see the exact
    // moment of the reload, so one more 450 at the old relay is tolerated.)
    let got = new.wait_for_messages(2, ARRIVAL);
    assert_eq!(
        got.len(),
        2,
        "not everything reached the new relay: {got:#?}"
    );
    let counts = subject_counts(&[&new]);
    assert_eq!(counts.get("deferred"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("after"), Some(&1), "{counts:?}");
    assert_eq!(old.messages().len(), 1, "{:#?}", old.messages());
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn reload_with_an_invalid_config_keeps_the_old_one() {
    let server = TestServer::start(ServerOptions::default(), None);
    let elsewhere = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("reload_invalid");
    let good = config_text(&daemon, "", &plain_tenant("acme", "acme.test", &server, ""));
    daemon.write_config(&good);
    // A copy for sendmail, which reads the config too.
    let submit_config = daemon.write_file("submit.ini", &good);
    let mut running = Running::start(&daemon);

    // Invalid (an unknown key), and would move the tenant if it were applied.
    let bad = plain_tenant("acme", "acme.test", &elsewhere, "no_such_key = 1\n");
    configure(&daemon, "", &bad);
    let check = daemon.run(&["check-config"], b"");
    assert_eq!(
        check.code, 78,
        "the test's config should be invalid: {check:?}"
    );
    running.reload();

    submit_with_config(
        &submit_config,
        "pbx@acme.test",
        "a@example.com",
        "after bad reload",
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "the old config stopped delivering");
    assert_eq!(subject(&got[0]), "after bad reload");
    assert!(elsewhere.messages().is_empty());
    assert_eq!(elsewhere.connections(), 0);
    assert!(
        running.is_running(),
        "the daemon exited on an invalid reload"
    );

    // A later valid reload is applied.
    configure(
        &daemon,
        "",
        &plain_tenant("acme", "acme.test", &elsewhere, ""),
    );
    running.reload();
    daemon.submit_note("pbx@acme.test", "a@example.com", "after good reload");
    let got = elsewhere.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "the valid reload was not applied");
    assert_eq!(subject(&got[0]), "after good reload");
}

#[test]
fn reload_restarting_every_tenant_does_not_wait_for_a_stuck_one() {
    // A [daemon] change (postmaster) restarts every tenant. One of them is
    // stuck in a 30 s session with a black hole; the other must come back at
    // once, not when the stuck session ends.
    let hole = TestServer::start(
        ServerOptions {
            greet: false,
            ..ServerOptions::default()
        },
        None,
    );
    let healthy = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("reload_with_stuck");
    let bad = plain_tenant(
        "bad",
        "bad.test",
        &hole,
        "connect_timeout = 30s\ncommand_timeout = 30s\n",
    );
    // Before the reload "good" points at a closed port, so only its restarted
    // worker can deliver: mail reaching `healthy` proves the restart happened.
    let dead_relay = format!("127.0.0.1:{}", closed_port());
    configure(
        &daemon,
        "",
        &(bad.clone() + &tenant_at("good", "good.test", &dead_relay, "")),
    );
    let running = Running::start(&daemon);
    daemon.submit_note("pbx@bad.test", "x@example.com", "stuck");
    assert_eq!(hole.wait_for_connections(1, ARRIVAL), 1);

    let tenants = bad + &plain_tenant("good", "good.test", &healthy, "");
    configure(&daemon, "postmaster = pm@good.test", &tenants);
    running.reload();
    let started = Instant::now();
    for i in 1..=3 {
        daemon.submit_note("pbx@good.test", "y@example.com", &format!("good-{i}"));
    }
    let got = healthy.wait_for_messages(3, ISOLATION_BOUND);
    assert_eq!(
        got.len(),
        3,
        "the healthy tenant waited for the stuck one after the reload ({:?})",
        started.elapsed()
    );
    let queue = daemon.queue();
    let bad = of_tenant(&queue, "bad");
    assert_eq!(bad.len(), 1, "{queue:#?}");
}

/// A relay that holds its reply to the final "." of each of its first
/// `replies` messages for `hold`.
fn relay_holding_replies(hold: Duration, replies: usize) -> TestServer {
    let faults = (1..=replies)
        .map(|n| (".".to_string(), n, Fault::Delay(hold)))
        .collect();
    TestServer::start(
        ServerOptions {
            faults,
            ..ServerOptions::default()
        },
        None,
    )
}

/// A changed tenant's session in flight when the reload comes finishes on
/// the old relay, and the new settings' thread starts only after it: nothing
/// is lost, and nothing is sent twice (once by each thread). Both ways of
/// asking: SIGHUP, then `pbxmail reload`. Each of the first two relays holds
/// its reply to the first message's final "." for 5 s, and the test checks
/// that each reload was applied while that message was in flight.
#[test]
fn reload_with_mail_in_flight_delivers_each_message_exactly_once() {
    const HOLD: Duration = Duration::from_secs(5);
    let first = relay_holding_replies(HOLD, 1);
    let second = relay_holding_replies(HOLD, 1);
    let third = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("reload_in_flight");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &first, ""));
    for i in 1..=3 {
        daemon.submit_note("pbx@acme.test", "a@example.com", &format!("queued-{i}"));
    }
    let running = Running::start(&daemon);

    // SIGHUP while the first relay holds a complete message.
    assert_eq!(
        first.wait_for_verb(".", 1, ARRIVAL),
        1,
        "no message reached the first relay"
    );
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &second, ""));
    running.reload();
    assert!(
        first.messages().is_empty(),
        "the SIGHUP reload was applied only after the message in flight was done"
    );

    // `pbxmail reload` while the second relay holds one; mail submitted
    // after it goes by the new settings.
    assert_eq!(
        second.wait_for_verb(".", 1, HOLD + ARRIVAL),
        1,
        "no message reached the second relay after the first reload"
    );
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &third, ""));
    let reloaded = daemon.run(&["reload"], b"");
    assert_eq!(reloaded.code, 0, "pbxmail reload: {reloaded:?}");
    assert!(
        second.messages().is_empty(),
        "`pbxmail reload` was applied only after the message in flight was done"
    );
    for i in 1..=2 {
        daemon.submit_note("pbx@acme.test", "a@example.com", &format!("after-{i}"));
    }

    let queue = daemon.wait_for_queue(HOLD + ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // Nothing more can come once every session has ended.
    for relay in [&first, &second, &third] {
        assert!(relay.wait_for_idle(ARRIVAL), "a session is still open");
    }
    let counts = subject_counts(&[&first, &second, &third]);
    let expected: BTreeMap<String, usize> =
        ["queued-1", "queued-2", "queued-3", "after-1", "after-2"]
            .into_iter()
            .map(|s| (s.to_string(), 1))
            .collect();
    assert_eq!(
        counts, expected,
        "each message exactly once over all relays"
    );
    // Each old session finished its message and began no other.
    for (name, relay) in [("first", &first), ("second", &second)] {
        assert_eq!(relay.messages().len(), 1, "{name}: {:?}", relay.commands());
        assert_eq!(
            count_commands(relay, "MAIL"),
            1,
            "{name}: {:?}",
            relay.commands()
        );
    }
}

/// Reload after reload, each aimed at a message in flight, while mail keeps
/// coming: the tenant moves back and forth between two relays, and every
/// message arrives exactly once over both. Every final reply is held 300 ms,
/// so each reload (SIGHUP and `pbxmail reload` in turn) lands while the
/// relay holds a complete message; the submitter keeps a few messages
/// queued, so submissions meet reloads too.
#[test]
fn repeated_reloads_under_a_steady_flow_deliver_each_message_exactly_once() {
    const MESSAGES: usize = 20;
    const RELOADS: usize = 6;
    /// Submitted but not yet arrived, at most.
    const BACKLOG: usize = 3;
    let held = Duration::from_millis(300);
    let relays = [
        relay_holding_replies(held, MESSAGES),
        relay_holding_replies(held, MESSAGES),
    ];
    let arrived = || relays.iter().map(|r| r.messages().len()).sum::<usize>();
    let daemon = Daemon::bare("reload_steady_flow");
    let config = config_text(
        &daemon,
        "",
        &plain_tenant("acme", "acme.test", &relays[0], ""),
    );
    daemon.write_config(&config);
    // sendmail reads a config too: a copy of its own, which the reloads
    // do not rewrite under it.
    let submit_config = daemon.write_file("submit.ini", &config);
    let running = Running::start(&daemon);

    std::thread::scope(|scope| {
        let submitter = scope.spawn(|| {
            for i in 0..MESSAGES {
                let room = wait_until(HOLD_BOUND, || arrived() + BACKLOG > i);
                assert!(room, "flow-{i}: the earlier messages stopped arriving");
                submit_with_config(
                    &submit_config,
                    "pbx@acme.test",
                    "a@example.com",
                    &format!("flow-{i}"),
                );
            }
        });
        for k in 0..RELOADS {
            let current = &relays[k % 2];
            let before = current.wait_for_verb(".", 0, Duration::ZERO);
            assert!(
                current.wait_for_verb(".", before + 1, HOLD_BOUND) > before,
                "reload {k}: no message in flight on relay {}",
                k % 2
            );
            let next = &relays[(k + 1) % 2];
            configure(&daemon, "", &plain_tenant("acme", "acme.test", next, ""));
            if k % 2 == 0 {
                running.reload();
            } else {
                let reloaded = daemon.run(&["reload"], b"");
                assert_eq!(reloaded.code, 0, "reload {k}: {reloaded:?}");
            }
        }
        submitter.join().expect("submitter thread");
    });

    let queue = daemon.wait_for_queue(HOLD_BOUND, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    for relay in &relays {
        assert!(relay.wait_for_idle(ARRIVAL), "a session is still open");
    }
    let counts = subject_counts(&[&relays[0], &relays[1]]);
    let expected: BTreeMap<String, usize> =
        (0..MESSAGES).map(|i| (format!("flow-{i}"), 1)).collect();
    assert_eq!(
        counts, expected,
        "each message exactly once over both relays"
    );
    assert!(
        relays.iter().all(|r| !r.messages().is_empty()),
        "the reloads did not move the tenant"
    );
}

#[test]
fn second_daemon_on_the_same_spool_is_refused() {
    let server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("second_daemon");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &server, ""));
    let mut first = Running::start(&daemon);

    let mut second = Command::new(PBXMAIL)
        .arg("daemon")
        .arg("-c")
        .arg(daemon.config_path())
        .env_remove("PBXMAIL_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second daemon");
    let mut status = None;
    wait_until(ARRIVAL, || {
        status = second.try_wait().ok().flatten();
        status.is_some()
    });
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        panic!("the second daemon kept running");
    };
    let out = second.wait_with_output().expect("second daemon output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(70), "{stderr}");
    assert!(!stderr.trim().is_empty(), "exited without saying why");

    // The first one is unharmed: it still takes and delivers mail.
    assert!(first.is_running());
    assert!(daemon.spool_dir().join("pickup.sock").exists());
    daemon.submit_note("pbx@acme.test", "a@example.com", "first still works");
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);
    assert_eq!(first.stop_within(ARRIVAL).and_then(|s| s.code()), Some(0));
}

// ---------------------------------------------------------------------------
// SIGTERM and worker restarts.
// ---------------------------------------------------------------------------

#[test]
fn sigterm_lets_the_session_in_flight_finish_and_loses_nothing() {
    // The reply to the first message's final "." takes 5 s: time enough for
    // SIGTERM to land while that message is in flight, even on a loaded box.
    let slow = TestServer::start(
        ServerOptions {
            faults: vec![(".".into(), 1, Fault::Delay(Duration::from_secs(5)))],
            ..ServerOptions::default()
        },
        None,
    );
    let fresh = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("sigterm_in_flight");
    configure(&daemon, "", &plain_tenant("acme", "acme.test", &slow, ""));
    for i in 1..=3 {
        daemon.submit_note("pbx@acme.test", "a@example.com", &format!("flight-{i}"));
    }
    let mut running = Running::start(&daemon);
    assert!(slow.wait_for_command("DATA", ARRIVAL), "no session started");

    let started = Instant::now();
    let status = running.stop_within(SIGTERM_BOUND + Duration::from_secs(3));
    let took = started.elapsed();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "no clean exit after SIGTERM ({took:?})"
    );
    assert!(took <= SIGTERM_BOUND, "SIGTERM took {took:?}");
    // The message in flight was finished, not cut off; no new one was begun.
    assert_eq!(slow.messages().len(), 1, "{:#?}", slow.messages());
    assert_eq!(count_commands(&slow, "MAIL"), 1, "{:?}", slow.commands());
    let queue = daemon.queue();
    assert_eq!(queue.len(), 2, "{queue:#?}");

    configure(&daemon, "", &plain_tenant("acme", "acme.test", &fresh, ""));
    let _restarted = Running::start(&daemon);
    assert_eq!(fresh.wait_for_messages(2, ARRIVAL).len(), 2);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    let counts = subject_counts(&[&slow, &fresh]);
    // Exactly once: the in-flight result was recorded before the exit.
    for i in 1..=3 {
        let subject = format!("flight-{i}");
        assert_eq!(counts.get(&subject), Some(&1), "{subject}: {counts:?}");
    }
}

#[test]
fn panicking_tenant_worker_is_restarted_and_delivers() {
    let server = TestServer::start(ServerOptions::default(), None);
    let other = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("panic_restart");
    configure(
        &daemon,
        "",
        &(plain_tenant("acme", "acme.test", &server, "")
            + &plain_tenant("other", "other.test", &other, "")),
    );
    for i in 1..=3 {
        daemon.submit_note("pbx@acme.test", "a@example.com", &format!("acme-{i}"));
    }
    daemon.submit_note("pbx@other.test", "a@example.com", "other-1");
    let started = Instant::now();
    let mut running = Running::start_with_env(&daemon, &[("PBXMAIL_DEBUG_PANIC_ONCE", "acme")]);

    assert_eq!(other.wait_for_messages(1, ARRIVAL).len(), 1);
    let got = server.wait_for_messages(3, ARRIVAL);
    assert_eq!(got.len(), 3, "{got:#?}");
    // The replacement worker starts ~1 s after the panic, which came after the spawn.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "delivered too soon for a restarted worker: did the injected panic happen? {:?}",
        started.elapsed()
    );
    let counts = subject_counts(&[&server]);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert!(running.is_running());
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");

    // It panics only once: new mail flows straight through.
    daemon.submit_note("pbx@acme.test", "a@example.com", "acme-later");
    assert_eq!(server.wait_for_messages(4, ARRIVAL).len(), 4);
}
