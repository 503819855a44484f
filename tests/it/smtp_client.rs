//! Integration tests of the daemon's SMTP client against scripted relays:
//! ESMTP extensions (PIPELINING, SIZE, 8BITMIME, SMTPUTF8, CHUNKING, keyword
//! case, HELO fallback), session reuse, refused recipients and the status
//! codes they carry, relay faults (421, drops, tarpits, malformed, overlong,
//! bare-LF or unasked replies), transparency on the wire, and TLS safety
//! (refused or hijacked STARTTLS, bad certificates). Each test runs its own
//! daemon and servers on 127.0.0.1 and asserts on what arrived and what the
//! spool still holds.

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use crate::support::harness::{
    attempts, commands, plain_tenant, recipients, str_of, tenant, wait_until, Daemon,
};
use crate::support::mail::{body_bytes, message, subject};
use crate::support::smtp_server::{
    CertKind, CommandRecord, Fault, Received, ServerOptions, TestCa, TestServer, Tls,
};
use serde_json::Value;

/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(10);

const USER: &str = "pbx@acme.test";
const PASSWORD: &str = "s3cret-pw";

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// A STARTTLS tenant trusting `ca_file`, relay named `localhost` (the name
/// the test certificates are issued for).
fn starttls_tenant(name: &str, domain: &str, server: &TestServer, extra: &str) -> String {
    let relay = format!("localhost:{}", server.port());
    tenant(name, domain, &relay, &format!("tls = starttls\n{extra}"))
}

/// A daemon whose retries wait a minute, so a deferred message stays
/// visibly deferred (untried again) for the rest of the test.
fn slow_retry_daemon(test: &str, tenants: &str) -> Daemon {
    let daemon = Daemon::bare(test);
    write_slow_retry_config(&daemon, tenants);
    daemon
}

/// The config of `slow_retry_daemon`, for a daemon made with `Daemon::bare`.
fn write_slow_retry_config(daemon: &Daemon, tenants: &str) {
    daemon.configure_with("retry_min = 1m\nretry_max = 1h", tenants);
}

/// Submits `count` messages to alice@ with subjects n0, n1, ... while the
/// daemon is stopped, so that all of them are due together at the next start.
fn queue_while_stopped(daemon: &mut Daemon, count: usize) {
    daemon.start();
    assert_eq!(daemon.stop().code(), Some(0));
    for n in 0..count {
        daemon.submit(
            &["alice@example.com"],
            &message("pbx@acme.test", "alice@example.com", &format!("n{n}"), "x"),
        );
    }
}

fn sent_verb(server: &TestServer, verb: &str) -> bool {
    commands(server)
        .iter()
        .any(|c| c.to_ascii_uppercase().starts_with(verb))
}

/// Waits until the tenant's one queued message has been tried; returns it.
fn wait_for_attempt(daemon: &Daemon, tenant: &str) -> Value {
    wait_for_attempt_within(daemon, tenant, ARRIVAL)
}

fn wait_for_attempt_within(daemon: &Daemon, tenant: &str, timeout: Duration) -> Value {
    let pick = |q: &[Value]| -> Option<Value> {
        q.iter()
            .find(|e| str_of(e, "tenant") == tenant && attempts(e) >= 1)
            .cloned()
    };
    let queue = daemon.wait_for_queue(timeout, |q| pick(q).is_some());
    pick(&queue).unwrap_or_else(|| panic!("tenant {tenant}: never attempted: {queue:#?}"))
}

/// Messages with a sender: what the daemon relayed, not the bounces it made.
fn relayed(server: &TestServer) -> Vec<Received> {
    server
        .messages()
        .into_iter()
        .filter(|m| !m.mail_from.is_empty())
        .collect()
}

/// Waits for the bounce (null sender, RFC 3464) to `sender` that reports
/// `rcpt` as failed; returns its text.
fn wait_for_bounce(server: &TestServer, sender: &str, rcpt: &str) -> String {
    let field = format!("Final-Recipient: rfc822; {rcpt}");
    let find = || {
        server
            .messages()
            .into_iter()
            .find(|m| m.mail_from.is_empty() && m.rcpt_to == [sender] && m.text().contains(&field))
    };
    wait_until(ARRIVAL, || find().is_some());
    match find() {
        Some(m) => m.text(),
        None => panic!(
            "no bounce to <{sender}> for {rcpt}: {:#?}",
            server.messages()
        ),
    }
}

/// The per-recipient fields of a delivery status report for `rcpt`: the
/// block from its Final-Recipient line to the next empty line.
fn dsn_fields(report: &str, rcpt: &str) -> String {
    let start = format!("Final-Recipient: rfc822; {rcpt}\r\n");
    let at = report
        .find(&start)
        .unwrap_or_else(|| panic!("no fields for {rcpt} in {report}"));
    let block = &report[at..];
    let end = block.find("\r\n\r\n").unwrap_or(block.len());
    block[..end].to_string()
}

/// The command lines `server` received after the first one starting with
/// `prefix`, in order.
fn commands_after(server: &TestServer, prefix: &str) -> Vec<String> {
    let cmds = commands(server);
    let at = cmds
        .iter()
        .position(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {cmds:?}"));
    cmds[at + 1..].to_vec()
}

/// Asserts that a relay got nothing that matters: no MAIL, no AUTH, no message.
fn assert_nothing_sent(server: &TestServer) {
    assert!(!sent_verb(server, "MAIL"), "{:?}", commands(server));
    assert!(!sent_verb(server, "AUTH"), "{:?}", commands(server));
    assert!(server.messages().is_empty(), "{:#?}", server.messages());
}

// ---------------------------------------------------------------------------
// ESMTP extensions.
// ---------------------------------------------------------------------------

#[test]
fn pipelining_sends_mail_and_rcpts_without_waiting_when_offered() {
    let (mut daemon, server) = Daemon::with_relay("pipelining_on", ServerOptions::default(), "");
    daemon.start();
    daemon.submit(
        &["a@example.com", "b@example.com"],
        &message("pbx@acme.test", "a@example.com", "piped", "x"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["a@example.com", "b@example.com"]);

    let log = server.command_log();
    let from_mail: Vec<_> = log
        .iter()
        .skip_while(|c| !c.line.starts_with("MAIL"))
        .take(4)
        .collect();
    let lines: Vec<&str> = from_mail.iter().map(|c| c.line.as_str()).collect();
    assert_eq!(
        lines.iter().map(|l| &l[..4]).collect::<Vec<_>>(),
        ["MAIL", "RCPT", "RCPT", "DATA"],
        "{log:#?}"
    );
    // MAIL and both RCPTs arrived together with what follows them; DATA
    // is the end of the group (the body waits for 354).
    let pipelined: Vec<bool> = from_mail.iter().map(|c| c.pipelined).collect();
    assert_eq!(pipelined, [true, true, true, false], "{log:#?}");
}

#[test]
fn without_pipelining_every_command_waits_for_its_reply() {
    let (mut daemon, server) = Daemon::with_relay(
        "pipelining_off",
        ServerOptions {
            pipelining: false,
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["a@example.com", "b@example.com"],
        &message("pbx@acme.test", "a@example.com", "lockstep", "x"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["a@example.com", "b@example.com"]);
    let log = server.command_log();
    assert!(log.iter().any(|c| c.line == "DATA"), "{log:#?}");
    assert!(log.iter().all(|c| !c.pipelined), "{log:#?}");
}

/// The message is refused locally (552 5.3.4) before MAIL, so it bounces;
/// the bounce (headers only) is small enough to go to the same relay.
#[test]
fn message_over_the_relays_size_limit_bounces_without_mail_from() {
    let (mut daemon, server) = Daemon::with_relay(
        "size_limit",
        ServerOptions {
            size_limit: Some(8000),
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message(
            "pbx@acme.test",
            "alice@example.com",
            "big",
            &"0123456789".repeat(2000),
        ),
    );
    let report = wait_for_bounce(&server, "pbx@acme.test", "alice@example.com");
    assert!(report.contains("Status: 5.3.4"), "{report}");
    assert!(report.contains("limit of 8000"), "{report}");
    assert!(
        !commands(&server)
            .iter()
            .any(|c| c.starts_with("MAIL FROM:<pbx@")),
        "the oversized message was offered: {:?}",
        commands(&server)
    );
    assert!(relayed(&server).is_empty());
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn mail_from_declares_the_exact_size_and_no_8bitmime_for_ascii() {
    let (mut daemon, server) = Daemon::with_relay("size_param", ServerOptions::default(), "");
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "sized", "plain ascii"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    let params = &got[0].mail_params;
    assert!(
        params
            .split_whitespace()
            .any(|p| p == format!("SIZE={}", got[0].data.len())),
        "MAIL parameters {params:?} for {} octets",
        got[0].data.len()
    );
    assert!(!params.contains("BODY="), "{params:?}");
    assert!(!params.contains("SMTPUTF8"), "{params:?}");
}

#[test]
fn eight_bit_body_declares_8bitmime_only_where_offered() {
    let offers = TestServer::start(ServerOptions::default(), None);
    let lacks = TestServer::start(
        ServerOptions {
            eight_bit_mime: false,
            ..ServerOptions::default()
        },
        None,
    );
    let config =
        plain_tenant("a", "a.test", &offers, "") + &plain_tenant("b", "b.test", &lacks, "");
    let mut daemon = Daemon::new("eight_bit", &config);
    daemon.start();
    let umlauts = "Gr\u{fc}\u{df}e aus K\u{f6}ln";
    daemon.submit(
        &["x@example.com"],
        &message("pbx@a.test", "x@example.com", "8bit", umlauts),
    );
    daemon.submit(
        &["y@example.com"],
        &message("pbx@b.test", "y@example.com", "8bit", umlauts),
    );
    // Without 8BITMIME the body may not go raw (RFC 6152 §3, issue 14
    // item 14): it arrives quoted-printable, decoding to the same text.
    let converted = "Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n".to_string();
    for (server, expect_param, expect_body) in [
        (&offers, true, format!("{umlauts}\r\n")),
        (&lacks, false, converted),
    ] {
        let got = server.wait_for_messages(1, ARRIVAL);
        assert_eq!(got.len(), 1);
        assert_eq!(body_bytes(&got[0]), expect_body.into_bytes());
        let params = &got[0].mail_params;
        assert_eq!(
            params.split_whitespace().any(|p| p == "BODY=8BITMIME"),
            expect_param,
            "8BITMIME offered: {expect_param}; MAIL parameters {params:?}"
        );
    }
}

/// Decodes a quoted-printable body (RFC 2045 §6.7) with CRLF line ends.
fn decode_quoted_printable(encoded: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut lines = encoded.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        let (line, soft) = match line.strip_suffix('=') {
            Some(line) => (line, true),
            None => (line, false),
        };
        let mut bytes = line.bytes();
        while let Some(b) = bytes.next() {
            if b == b'=' {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap());
            } else {
                out.push(b);
            }
        }
        if !soft && lines.peek().is_some() {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Issue 14 (14): through the real daemon to a relay without 8BITMIME, a
/// voicemail with an 8-bit text part and a base64 WAV arrives 7-bit, its
/// text part quoted-printable and decoding to the original, the WAV part
/// untouched; what cannot be converted (an 8-bit attached message: 5.6.3;
/// a UTF-8 header without SMTPUTF8: 5.6.7) bounces at once, never sent raw
/// and never left to retry.
#[test]
fn eight_bit_voicemail_to_a_relay_without_8bitmime_arrives_quoted_printable() {
    let (mut daemon, server) = Daemon::with_relay(
        "seven_bit",
        ServerOptions {
            eight_bit_mime: false,
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    let text = "Neue Sprachnachricht von J\u{fc}rgen M\u{fc}ller\r\nDauer: 0:42 \u{2013} \u{bb}R\u{fc}ckruf\u{ab}\r\n";
    let wav = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=\r\n";
    let voicemail = format!(
        "From: pbx@acme.test\r\nTo: x@example.com\r\nSubject: voicemail\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"vm-42\"\r\n\r\n\
         --vm-42\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n{text}--vm-42\r\n\
         Content-Type: audio/x-wav; name=msg0001.wav\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{wav}--vm-42--\r\n"
    );
    daemon.submit(&["x@example.com"], voicemail.as_bytes());
    // An attached message with an 8-bit body: a message/* part may not be
    // encoded itself (RFC 2046 §5.2.1) and pbxmail does not convert inside
    // it (5.6.3); a UTF-8 Subject: an internationalized header (5.6.7).
    let attached = "From: pbx@acme.test\r\nTo: y@example.com\r\nSubject: fwd\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
         --b\r\nContent-Type: message/rfc822\r\n\r\nSubject: old\r\n\r\n\
         Gr\u{fc}\u{df}e\r\n--b--\r\n";
    daemon.submit(&["y@example.com"], attached.as_bytes());
    daemon.submit(
        &["z@example.com"],
        &message(
            "pbx@acme.test",
            "z@example.com",
            "Anruf von J\u{fc}rgen",
            "x",
        ),
    );

    wait_until(ARRIVAL, || !relayed(&server).is_empty());
    let got = relayed(&server);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpt_to, ["x@example.com"]);
    assert!(got[0].data.is_ascii(), "{}", got[0].text());
    assert!(
        !got[0].mail_params.contains("BODY="),
        "{:?}",
        got[0].mail_params
    );
    let arrived = got[0].text();
    let part = "--vm-42\r\nContent-Type: text/plain; charset=utf-8\r\n\
                Content-Transfer-Encoding: quoted-printable\r\n\r\n";
    let (_, rest) = arrived
        .split_once(part)
        .unwrap_or_else(|| panic!("no quoted-printable text part in {arrived}"));
    let (encoded, wav_part) = rest.split_once("--vm-42\r\n").unwrap();
    assert_eq!(decode_quoted_printable(encoded), text.as_bytes());
    assert_eq!(
        wav_part,
        format!(
            "Content-Type: audio/x-wav; name=msg0001.wav\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{wav}--vm-42--\r\n"
        )
    );

    for (rcpt, status) in [("y@example.com", "5.6.3"), ("z@example.com", "5.6.7")] {
        let report = wait_for_bounce(&server, "pbx@acme.test", rcpt);
        assert!(
            dsn_fields(&report, rcpt).contains(&format!("Status: {status}\r\n")),
            "{report}"
        );
        assert!(
            relayed(&server).iter().all(|m| m.rcpt_to != [rcpt]),
            "a header with 8-bit octets went to a relay without 8BITMIME"
        );
    }
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

/// RFC 5321 §2.4: EHLO keywords are case-insensitive. A relay that
/// advertises them in lower and mixed case still gets pipelined commands,
/// SIZE= and BODY=8BITMIME.
#[test]
fn ehlo_keywords_in_lower_or_mixed_case_are_recognised() {
    let ehlo = "250-test.invalid\r\n250-pipelining\r\n250-Size 100000\r\n250 8bitmime";
    let (mut daemon, server) = Daemon::with_relay(
        "ehlo_keyword_case",
        ServerOptions {
            size_limit: Some(100_000),
            faults: vec![("EHLO".into(), 1, Fault::Reply(ehlo.into()))],
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["a@example.com", "b@example.com"],
        &message("pbx@acme.test", "a@example.com", "case", "Gr\u{fc}\u{df}e"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{:#?}", daemon.queue());
    // Sent in the session that saw the lower-case EHLO reply.
    assert_eq!(got[0].connection, 0);
    assert_eq!(server.connections(), 1);
    let params: Vec<&str> = got[0].mail_params.split_whitespace().collect();
    let size = format!("SIZE={}", got[0].data.len());
    assert!(params.contains(&size.as_str()), "{params:?}");
    assert!(params.contains(&"BODY=8BITMIME"), "{params:?}");

    let log = server.command_log();
    let group: Vec<(&str, bool)> = log
        .iter()
        .skip_while(|c| !c.line.starts_with("MAIL"))
        .take(4)
        .map(|c| (c.line.get(..4).unwrap_or(""), c.pipelined))
        .collect();
    assert_eq!(
        group,
        [
            ("MAIL", true),
            ("RCPT", true),
            ("RCPT", true),
            ("DATA", false)
        ],
        "{log:#?}"
    );
}

/// RFC 5321 §3.2: a relay that does not know EHLO (500, or 502 "not
/// implemented") is greeted with HELO, and the mail goes without any ESMTP
/// extension: no SIZE=, no pipelining.
#[test]
fn relay_refusing_ehlo_gets_helo_and_the_mail() {
    let refuses_500 = TestServer::start(
        ServerOptions {
            refuse_ehlo: true,
            ..ServerOptions::default()
        },
        None,
    );
    let refuses_502 = TestServer::start(
        ServerOptions {
            faults: vec![(
                "EHLO".into(),
                1,
                Fault::Reply("502 5.5.1 Command not implemented".into()),
            )],
            ..ServerOptions::default()
        },
        None,
    );
    let config = plain_tenant("a", "a.test", &refuses_500, "")
        + &plain_tenant("b", "b.test", &refuses_502, "");
    // No quick retry: the first session has to get it right.
    let mut daemon = slow_retry_daemon("helo_fallback", &config);
    daemon.start();
    for (tenant, to) in [("a", "x@example.com"), ("b", "y@example.com")] {
        let from = format!("pbx@{tenant}.test");
        daemon.submit(&[to], &message(&from, to, "helo", "x"));
    }
    for (server, to) in [
        (&refuses_500, "x@example.com"),
        (&refuses_502, "y@example.com"),
    ] {
        let got = server.wait_for_messages(1, ARRIVAL);
        assert_eq!(
            got.len(),
            1,
            "{:?}; {:#?}",
            commands(server),
            daemon.queue()
        );
        assert_eq!(got[0].rcpt_to, [to]);
        assert_eq!(got[0].mail_params, "", "ESMTP parameter after HELO");
        let cmds = commands(server);
        assert_eq!(
            cmds.get(..2),
            Some(&["EHLO pbx.test".to_string(), "HELO pbx.test".to_string()][..]),
            "{cmds:?}"
        );
        let log = server.command_log();
        assert!(
            log.iter().all(|c| !c.pipelined),
            "pipelined after HELO: {log:#?}"
        );
    }
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn non_ascii_recipient_without_smtputf8_fails_alone() {
    let (mut daemon, server) = Daemon::with_relay("utf8_refused", ServerOptions::default(), "");
    daemon.start();
    daemon.submit(
        &["j\u{f6}rg@example.com", "ok@example.com"],
        &message("pbx@acme.test", "ok@example.com", "utf8", "x"),
    );
    let report = wait_for_bounce(&server, "pbx@acme.test", "j\u{f6}rg@example.com");
    assert!(report.contains("Status: 5.6.7"), "{report}");
    let got = relayed(&server);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpt_to, ["ok@example.com"]);
    assert!(
        !commands(&server).iter().any(|c| !c.is_ascii()),
        "a non-ASCII command went to a relay without SMTPUTF8: {:?}",
        commands(&server)
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn non_ascii_recipient_goes_with_smtputf8_where_offered() {
    let (mut daemon, server) = Daemon::with_relay(
        "utf8_offered",
        ServerOptions {
            smtputf8: true,
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["j\u{f6}rg@example.com", "ok@example.com"],
        &message("pbx@acme.test", "ok@example.com", "utf8", "x"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["j\u{f6}rg@example.com", "ok@example.com"]);
    assert!(
        got[0]
            .mail_params
            .split_whitespace()
            .any(|p| p == "SMTPUTF8"),
        "{:?}",
        got[0].mail_params
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

/// Lines that test transparency: dots, the 998-octet limit and past it, a
/// bare CR, and no newline at the very end. Returns (what is submitted after
/// the header block, the body expected on arrival).
fn tricky_body() -> (String, Vec<u8>) {
    let (x998, y999, z1000) = ("x".repeat(998), "y".repeat(999), "z".repeat(1000));
    let lines = [".", "..", ".x", &x998, &y999, &z1000, "a\rb", "", "end"];
    let submitted = lines.join("\n");
    let expected = format!(
        ".\r\n..\r\n.x\r\n{x998}\r\n{y}\r\n y\r\n{z}\r\n zz\r\na\r\nb\r\n\r\nend\r\n",
        y = "y".repeat(998),
        z = "z".repeat(998),
    );
    (submitted, expected.into_bytes())
}

/// Panics with the first differing offset when two bodies differ.
fn assert_same_bytes(actual: &[u8], expected: &[u8]) {
    if actual == expected {
        return;
    }
    let at = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    let around = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.saturating_sub(30)..(at + 30).min(b.len())]).into_owned()
    };
    panic!(
        "bodies differ at byte {at} (lengths {} vs {} expected): got {:?}, want {:?}",
        actual.len(),
        expected.len(),
        around(actual),
        around(expected)
    );
}

#[test]
fn dots_long_lines_and_bare_cr_arrive_byte_exact_over_data() {
    let (mut daemon, server) =
        Daemon::with_relay("transparency_exact", ServerOptions::default(), "");
    daemon.start();
    let (submitted, expected) = tricky_body();
    let msg = format!("From: pbx@acme.test\nTo: alice@example.com\nSubject: dots\n\n{submitted}");
    daemon.submit(&["alice@example.com"], msg.as_bytes());
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert!(!got[0].bdat);
    assert_same_bytes(&body_bytes(&got[0]), &expected);
}

#[test]
fn chunking_sends_bdat_chunks_byte_exact() {
    let (mut daemon, server) = Daemon::with_relay(
        "bdat",
        ServerOptions {
            chunking: true,
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    let (submitted, expected) = tricky_body();
    // About 200 KB more, so the body needs several chunks.
    let filler: Vec<String> = (0..2500)
        .map(|i| format!(".{i:05} {}", "f".repeat(72)))
        .collect();
    let msg = format!(
        "From: pbx@acme.test\nTo: alice@example.com\nSubject: chunks\n\n{}\n{submitted}",
        filler.join("\n")
    );
    daemon.submit(&["alice@example.com"], msg.as_bytes());
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert!(got[0].bdat, "not sent with BDAT: {:?}", commands(&server));
    let mut want = format!("{}\r\n", filler.join("\r\n")).into_bytes();
    want.extend_from_slice(&expected);
    assert_same_bytes(&body_bytes(&got[0]), &want);

    let cmds = commands(&server);
    assert!(!cmds.iter().any(|c| c == "DATA"), "{cmds:?}");
    let bdat: Vec<&String> = cmds.iter().filter(|c| c.starts_with("BDAT")).collect();
    assert!(bdat.len() >= 2, "one chunk for 200 KB: {bdat:?}");
    assert!(
        bdat.last().is_some_and(|c| c.ends_with(" LAST")),
        "{bdat:?}"
    );
    assert_eq!(
        bdat.iter().filter(|c| c.ends_with(" LAST")).count(),
        1,
        "{bdat:?}"
    );
    let counted: usize = bdat
        .iter()
        .filter_map(|c| c.split_whitespace().nth(1)?.parse::<usize>().ok())
        .sum();
    assert_eq!(counted, got[0].data.len());
}

// ---------------------------------------------------------------------------
// Sessions.
// ---------------------------------------------------------------------------

#[test]
fn messages_per_session_two_carries_three_messages_over_two_connections() {
    let (mut daemon, server) = Daemon::with_relay(
        "per_session_two",
        ServerOptions::default(),
        "messages_per_session = 2\n",
    );
    queue_while_stopped(&mut daemon, 3);
    daemon.start();
    let got = server.wait_for_messages(3, ARRIVAL);
    assert_eq!(got.len(), 3);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert_eq!(server.connections(), 2, "{:?}", server.commands());
    let on_first = got.iter().filter(|m| m.connection == 0).count();
    assert_eq!(on_first, 2, "{got:#?}");
}

#[test]
fn messages_per_session_one_opens_a_connection_per_message() {
    let (mut daemon, server) = Daemon::with_relay(
        "per_session_one",
        ServerOptions::default(),
        "messages_per_session = 1\n",
    );
    queue_while_stopped(&mut daemon, 3);
    daemon.start();
    let got = server.wait_for_messages(3, ARRIVAL);
    assert_eq!(got.len(), 3);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert_eq!(server.connections(), 3);
    let mut connections: Vec<usize> = got.iter().map(|m| m.connection).collect();
    connections.sort();
    assert_eq!(connections, [0, 1, 2]);
}

#[test]
fn reply_421_to_second_mail_ends_the_session_and_keeps_the_rest_queued() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![(
                "MAIL".into(),
                2,
                Fault::Reply("421 4.3.2 Service shutting down".into()),
            )],
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = slow_retry_daemon("mail_421", &plain_tenant("acme", "acme.test", &server, ""));
    queue_while_stopped(&mut daemon, 3);
    daemon.start();

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    // Two left: the one the 421 answered and the one never tried.
    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 2 && q.iter().any(|e| str_of(e, "last_error").contains("421"))
    });
    assert_eq!(queue.len(), 2, "{queue:#?}");
    let delivered = subject(&got[0]);
    let mut tried: Vec<&Value> = queue.iter().filter(|e| attempts(e) >= 1).collect();
    assert_eq!(tried.len(), 1, "{queue:#?}");
    let tried = tried.remove(0);
    assert_eq!(str_of(tried, "state"), "deferred", "{tried:#?}");
    assert!(str_of(tried, "last_error").contains("421"), "{tried:#?}");
    let untried: Vec<&Value> = queue.iter().filter(|e| attempts(e) == 0).collect();
    assert_eq!(untried.len(), 1, "{queue:#?}");
    assert_ne!(str_of(untried[0], "state"), "failed", "{queue:#?}");
    // The session ended at the 421: MAIL for the delivered one and the refused
    // one, none for the third; the tenant backs off rather than reconnecting.
    let mails = commands(&server)
        .iter()
        .filter(|c| c.starts_with("MAIL"))
        .count();
    assert_eq!(mails, 2, "{:?}", commands(&server));
    assert_eq!(server.connections(), 1);
    assert_eq!(server.messages().len(), 1, "{delivered} only");
}

#[test]
fn connection_dropped_before_the_final_reply_loses_nothing() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![(".".into(), 2, Fault::Disconnect)],
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = slow_retry_daemon(
        "drop_in_data",
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    queue_while_stopped(&mut daemon, 3);
    daemon.start();

    // The first goes through, the second's body is sent but never
    // acknowledged (so it must stay queued), the third goes in a new session.
    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 1 && attempts(&q[0]) >= 1 && server.messages().len() >= 2
    });
    let got = server.messages();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(queue.len(), 1, "{queue:#?}");
    let entry = &queue[0];
    assert_eq!(str_of(entry, "state"), "deferred", "{entry:#?}");
    assert_eq!(recipients(entry), ["alice@example.com"]);
    assert!(!str_of(entry, "last_error").is_empty(), "{entry:#?}");

    let mut delivered: Vec<String> = got.iter().map(subject).collect();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), 2, "a duplicate arrived: {got:#?}");
    assert_eq!(got[0].connection, 0);
    assert_eq!(got[1].connection, 1);
}

/// A running daemon with one plain tenant relaying to `server`, and one
/// message to five recipients submitted; returns the daemon and them.
fn five_recipients(
    test: &str,
    server: &TestServer,
    subject: &str,
    body: &str,
) -> (Daemon, [&'static str; 5]) {
    let mut daemon = Daemon::new(test, &plain_tenant("acme", "acme.test", server, ""));
    daemon.start();
    let rcpts = [
        "r1@example.com",
        "r2@example.com",
        "r3@example.com",
        "r4@example.com",
        "r5@example.com",
    ];
    daemon.submit(
        &rcpts,
        &message("pbx@acme.test", "r1@example.com", subject, body),
    );
    (daemon, rcpts)
}

#[test]
fn recipients_beyond_the_relays_limit_go_in_following_transactions() {
    let server = TestServer::start(
        ServerOptions {
            max_rcpts_per_transaction: Some(2),
            ..ServerOptions::default()
        },
        None,
    );
    let (daemon, rcpts) = five_recipients("rcpt_limit", &server, "many", "same body");
    let got = server.wait_for_messages(3, ARRIVAL);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert!(got.len() >= 3, "{got:#?}");
    let mut all: Vec<String> = got.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    all.sort();
    assert_eq!(all, rcpts, "every recipient exactly once");
    for m in &got {
        assert_eq!(m.connection, 0, "not on the same session: {got:#?}");
        assert!(m.rcpt_to.len() <= 2);
        assert_eq!(body_bytes(m), b"same body\r\n");
    }
    assert_eq!(server.connections(), 1);
}

/// A relay that takes two recipients per transaction and drops the
/// connection at the end of the second: the first two were answered 250 and
/// must not be sent again; the other three are retried, each exactly once.
#[test]
fn dropped_connection_after_a_452_split_resends_only_the_unanswered() {
    let server = TestServer::start(
        ServerOptions {
            max_rcpts_per_transaction: Some(2),
            faults: vec![(".".into(), 2, Fault::Disconnect)],
            ..ServerOptions::default()
        },
        None,
    );
    let (daemon, rcpts) = five_recipients("split_then_drop", &server, "split", "body");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    let got = server.messages();
    let mut all: Vec<String> = got.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    all.sort();
    assert_eq!(all, rcpts, "every recipient exactly once: {got:#?}");
    // The break really came between the transactions, and the retry was a new session.
    assert_eq!(got[0].rcpt_to, ["r1@example.com", "r2@example.com"]);
    assert!(got[1..].iter().all(|m| m.connection > 0), "{got:#?}");
}

// ---------------------------------------------------------------------------
// Misbehaving relays.
// ---------------------------------------------------------------------------

#[test]
fn unasked_extra_reply_aborts_the_session_undelivered() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![("RCPT".into(), 1, Fault::ReplyTwice("250 2.1.5 Ok".into()))],
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = slow_retry_daemon(
        "unasked_reply",
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "twice", "x"),
    );
    let entry = wait_for_attempt(&daemon, "acme");
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert_eq!(recipients(&entry), ["alice@example.com"]);
    assert!(server.messages().is_empty(), "{:#?}", server.messages());
}

/// Regression guard: only 354 invites the body. A relay answering DATA with
/// 250 has not received the message, so it must not count as delivered.
#[test]
fn positive_reply_to_data_is_not_taken_as_delivery() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![("DATA".into(), 1, Fault::Reply("250 2.0.0 Ok".into()))],
            ..ServerOptions::default()
        },
        None,
    );
    // Default retries (1 s): the second DATA is answered properly.
    let mut daemon = Daemon::new("data_250", &plain_tenant("acme", "acme.test", &server, ""));
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "no 354", "body"),
    );
    // The queue empties only once the relay has the message (or, wrongly, on the 250).
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    let got = server.messages();
    assert_eq!(
        got.len(),
        1,
        "removed from the queue as delivered, but the relay never got the body; commands: {:?}",
        commands(&server)
    );
    assert_eq!(body_bytes(&got[0]), b"body\r\n");
}

#[test]
fn authentication_refusal_to_mail_or_rcpt_defers_instead_of_failing() {
    let at_mail = TestServer::start(
        ServerOptions {
            mail_reply: Some("530 5.7.0 Authentication required".into()),
            ..ServerOptions::default()
        },
        None,
    );
    let at_rcpt = TestServer::start(
        ServerOptions {
            rcpt_reply: Some("550 5.7.30 Basic authentication is not supported".into()),
            ..ServerOptions::default()
        },
        None,
    );
    let config =
        plain_tenant("a", "a.test", &at_mail, "") + &plain_tenant("b", "b.test", &at_rcpt, "");
    let mut daemon = slow_retry_daemon("auth_refusal_codes", &config);
    daemon.start();
    daemon.submit(
        &["x@example.com"],
        &message("pbx@a.test", "x@example.com", "login", "x"),
    );
    daemon.submit(
        &["y@example.com"],
        &message("pbx@b.test", "y@example.com", "login", "y"),
    );
    for (tenant, code) in [("a", "530"), ("b", "5.7.30")] {
        let entry = wait_for_attempt(&daemon, tenant);
        assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
        assert!(str_of(&entry, "last_error").contains(code), "{entry:#?}");
    }
    assert!(at_mail.messages().is_empty() && at_rcpt.messages().is_empty());
}

#[test]
fn refused_transaction_is_reset_and_the_session_goes_on() {
    let (mut daemon, server) = Daemon::with_relay(
        "rset_after_refusal",
        ServerOptions {
            rcpt_reply_for: vec![("gone@example.com".into(), "550 5.1.1 No such user".into())],
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    assert_eq!(daemon.stop().code(), Some(0));
    for to in ["gone@example.com", "ok@example.com"] {
        daemon.submit(&[to], &message("pbx@acme.test", to, to, "x"));
    }
    daemon.start();
    let report = wait_for_bounce(&server, "pbx@acme.test", "gone@example.com");
    assert!(report.contains("Status: 5.1.1"), "{report}");
    let got = relayed(&server);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpt_to, ["ok@example.com"]);
    assert_eq!(got[0].connection, 0, "not the refused one's session");
    // Right after the refused recipient's transaction comes RSET (the
    // pipelined DATA was answered 554), never a second MAIL in its place.
    let cmds = commands(&server);
    let refused = cmds
        .iter()
        .position(|c| c.contains("gone@example.com"))
        .expect("RCPT for gone@");
    assert_eq!(
        cmds.get(refused + 1..refused + 3),
        Some(&["DATA".to_string(), "RSET".to_string()][..]),
        "{cmds:?}"
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

/// One message to two recipients, both refused (550 5.1.1) by a pipelining
/// relay (`data_without_recipients`: one that answers DATA 354 all the
/// same). The RCPT replies decide: the message bounces with them. Right
/// after the second RCPT come DATA and RSET, then the bounce's MAIL: body
/// lines sent outside a DATA the relay took would show here as commands.
/// Returns the relay, once the queue is empty, for the test's own checks.
fn both_recipients_refused(test: &str, data_without_recipients: bool) -> TestServer {
    let rcpts = ["gone1@example.com", "gone2@example.com"];
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: rcpts
                .iter()
                .map(|r| (r.to_string(), format!("550 5.1.1 <{r}>: user unknown")))
                .collect(),
            data_without_recipients,
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = Daemon::new(test, &plain_tenant("acme", "acme.test", &server, ""));
    daemon.start();
    daemon.submit(
        &rcpts,
        &message("pbx@acme.test", "gone1@example.com", "nobody", "the body"),
    );
    let report = wait_for_bounce(&server, "pbx@acme.test", rcpts[0]);
    for rcpt in rcpts {
        let fields = dsn_fields(&report, rcpt);
        assert!(fields.contains("Status: 5.1.1"), "{fields}");
        assert!(
            fields.contains(&format!("<{rcpt}>: user unknown")),
            "{fields}"
        );
    }
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // MAIL went in a pipelined group (RFC 2920), DATA at its end.
    let log = server.command_log();
    let mail = log.iter().find(|c| c.line.starts_with("MAIL FROM:<pbx@"));
    assert!(mail.is_some_and(|c| c.pipelined), "{log:#?}");
    let after = commands_after(&server, "RCPT TO:<gone2@");
    assert!(
        after.len() >= 3 && after[..2] == ["DATA", "RSET"] && after[2].starts_with("MAIL FROM:<>"),
        "{after:?}"
    );
    server
}

/// RFC 2920 §3.1: DATA is sent in the pipeline before the RCPT replies are
/// known. When every RCPT failed the relay answers DATA 554, and no body
/// goes out: RSET follows.
#[test]
fn no_body_goes_out_when_every_recipient_is_refused() {
    let server = both_recipients_refused("all_refused", false);
    assert!(relayed(&server).is_empty(), "{:#?}", relayed(&server));
}

/// RFC 2920 §3.1 again, against a relay that answers the pipelined DATA
/// 354 although no recipient was accepted: the client ends the data at
/// once with a lone "." and resets. The relay records what the final 250
/// closed: no recipients and an empty body. That 250 is no delivery.
#[test]
fn pipelined_data_taken_with_no_recipient_gets_only_the_final_dot() {
    let server = both_recipients_refused("all_refused_354", true);
    let got = relayed(&server);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].rcpt_to.is_empty(), "{got:#?}");
    assert_eq!(got[0].text(), "", "body lines were sent");
}

/// RFC 3463 enhanced status codes travel from the relay's reply to where a
/// sender or an admin reads them: a bounce's Status and Diagnostic-Code, and
/// the queue's last_error for a deferral. A reply without one gets a status
/// from its class (5.0.0), not a made-up detail.
#[test]
fn enhanced_status_codes_reach_the_bounce_and_the_queue() {
    let dmarc =
        "550 5.7.509 Access denied, sending domain acme.test does not pass DMARC verification";
    let bare = "550 Requested action not taken: mailbox unavailable";
    let later = "451 4.7.650 The mail server has been temporarily rate limited";
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![
                ("dmarc@example.com".into(), dmarc.into()),
                ("bare@example.com".into(), bare.into()),
                ("later@example.com".into(), later.into()),
            ],
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = slow_retry_daemon(
        "enhanced_codes",
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    daemon.start();
    daemon.submit(
        &["dmarc@example.com", "bare@example.com"],
        &message("pbx@acme.test", "dmarc@example.com", "refused", "x"),
    );
    daemon.submit(
        &["later@example.com"],
        &message("pbx@acme.test", "later@example.com", "deferred", "y"),
    );

    let report = wait_for_bounce(&server, "pbx@acme.test", "dmarc@example.com");
    let fields = dsn_fields(&report, "dmarc@example.com");
    assert!(fields.contains("Status: 5.7.509\r\n"), "{fields}");
    assert!(
        fields.contains(&format!("Diagnostic-Code: smtp; {dmarc}")),
        "{fields}"
    );
    let fields = dsn_fields(&report, "bare@example.com");
    assert!(fields.contains("Status: 5.0.0\r\n"), "{fields}");
    assert!(
        fields.contains(&format!("Diagnostic-Code: smtp; {bare}")),
        "{fields}"
    );

    let tried = |q: &[Value]| {
        q.len() == 1 && attempts(&q[0]) >= 1 && recipients(&q[0]) == ["later@example.com"]
    };
    let queue = daemon.wait_for_queue(ARRIVAL, tried);
    assert!(tried(&queue), "{queue:#?}");
    assert_eq!(str_of(&queue[0], "state"), "deferred", "{queue:#?}");
    assert!(
        str_of(&queue[0], "last_error").contains(later),
        "{queue:#?}"
    );
}

/// The first MAIL is answered with `reply`; that message must be deferred,
/// and the next message must still go out over a new session.
fn malformed_reply_defers_and_the_next_message_goes(test: &str, reply: &str) {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![("MAIL".into(), 1, Fault::Reply(reply.into()))],
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = slow_retry_daemon(test, &plain_tenant("acme", "acme.test", &server, ""));
    daemon.start();
    daemon.submit(
        &["first@example.com"],
        &message("pbx@acme.test", "first@example.com", "first", "x"),
    );
    let entry = wait_for_attempt(&daemon, "acme");
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        str_of(&entry, "last_error").contains("protocol error"),
        "{entry:#?}"
    );
    assert!(server.messages().is_empty());

    daemon.submit(
        &["second@example.com"],
        &message("pbx@acme.test", "second@example.com", "second", "y"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "daemon stopped delivering: {}", daemon.log());
    assert_eq!(got[0].rcpt_to, ["second@example.com"]);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(recipients(&queue[0]), ["first@example.com"]);
}

#[test]
fn garbage_reply_defers_and_the_daemon_keeps_delivering() {
    malformed_reply_defers_and_the_next_message_goes("reply_garbage", "hello there, friend");
}

#[test]
fn nul_in_reply_defers_and_the_daemon_keeps_delivering() {
    malformed_reply_defers_and_the_next_message_goes("reply_nul", "250 2.1.0 O\0k");
}

#[test]
fn overlong_reply_line_defers_and_the_daemon_keeps_delivering() {
    let long = format!("250 2.1.0 {}", "x".repeat(5000));
    malformed_reply_defers_and_the_next_message_goes("reply_overlong", &long);
}

/// An EHLO-style reply of `lines` lines: "250-" on all but the last.
fn reply_of_lines(lines: usize, first: &str, filler: &str, last: &str) -> String {
    let mut text = vec![format!("250-{first}")];
    text.extend((2..lines).map(|n| format!("250-{filler}{n}")));
    text.push(format!("250 {last}"));
    text.join("\r\n")
}

/// The relay breaks the protocol as `faults` script it, so the first attempt
/// fails: the message must be deferred (not delivered, not bounced) with a
/// protocol error saying `why`. After a flush the relay answers sanely and
/// the same message goes out on a new connection.
fn protocol_failure_defers_until_a_flush_delivers(
    test: &str,
    faults: Vec<(String, usize, Fault)>,
    why: &str,
) {
    let server = TestServer::start(
        ServerOptions {
            faults,
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = slow_retry_daemon(test, &plain_tenant("acme", "acme.test", &server, ""));
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "retried", "x"),
    );
    // Tried, or (wrongly) gone from the queue.
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty() || attempts(&q[0]) >= 1);
    let entry = queue.first().unwrap_or_else(|| {
        panic!(
            "delivered despite the broken reply: {:#?}",
            server.messages()
        )
    });
    assert_eq!(str_of(entry, "state"), "deferred", "{entry:#?}");
    assert_eq!(recipients(entry), ["alice@example.com"]);
    let error = str_of(entry, "last_error");
    assert!(
        error.contains("protocol error") && error.contains(why),
        "{entry:#?}"
    );
    assert!(server.messages().is_empty(), "{:#?}", server.messages());

    let run = daemon.run(&["flush"], b"");
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(
        got.len(),
        1,
        "not delivered after the flush: {}",
        daemon.log()
    );
    assert_eq!(got[0].mail_from, "pbx@acme.test", "{got:#?}");
    assert_eq!(got[0].rcpt_to, ["alice@example.com"]);
    assert_eq!(got[0].connection, 1);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

/// A reply is at most 100 lines: an EHLO reply of 101 ends the session as a
/// protocol failure; on the retry, 100 lines (the most allowed) are fine.
#[test]
fn ehlo_reply_over_100_lines_defers_and_100_lines_deliver() {
    let ehlo = |lines| reply_of_lines(lines, "test.invalid", "X-FILLER-", "8BITMIME");
    let faults = vec![
        ("EHLO".into(), 1, Fault::Reply(ehlo(101))),
        ("EHLO".into(), 2, Fault::Reply(ehlo(100))),
    ];
    protocol_failure_defers_until_a_flush_delivers("ehlo_101_lines", faults, "more than 100 lines");
}

/// The same bound on a RCPT reply: the session ends mid-transaction, before
/// any body, and the message waits for its retry.
#[test]
fn rcpt_reply_over_100_lines_defers_the_message() {
    let rcpt = reply_of_lines(101, "2.1.5 Ok", "2.1.5 and more ", "2.1.5 Ok");
    protocol_failure_defers_until_a_flush_delivers(
        "rcpt_101_lines",
        vec![("RCPT".into(), 1, Fault::Reply(rcpt))],
        "more than 100 lines",
    );
}

/// RFC 5321 wants CRLF, but a relay ending its replies in LF alone (multi-
/// line EHLO and pipelined replies included) is understood and gets the mail.
#[test]
fn relay_replying_with_bare_lf_line_ends_gets_the_mail() {
    let (mut daemon, server) = Daemon::with_relay(
        "bare_lf_replies",
        ServerOptions {
            bare_lf_replies: true,
            ..ServerOptions::default()
        },
        "",
    );
    daemon.start();
    daemon.submit(
        &["a@example.com", "b@example.com"],
        &message("pbx@acme.test", "a@example.com", "lf", "body"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(
        got.len(),
        1,
        "{:?}; {:#?}",
        commands(&server),
        daemon.queue()
    );
    assert_eq!(got[0].rcpt_to, ["a@example.com", "b@example.com"]);
    assert_eq!(body_bytes(&got[0]), b"body\r\n");
    // Understood as an ESMTP relay: SIZE and PIPELINING were used.
    assert!(
        got[0].mail_params.contains("SIZE="),
        "{:?}",
        got[0].mail_params
    );
    let log = server.command_log();
    assert!(
        log.iter()
            .any(|c| c.line.starts_with("MAIL") && c.pipelined),
        "{log:#?}"
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn tarpit_longer_than_command_timeout_defers_within_seconds() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![("MAIL".into(), 1, Fault::Delay(Duration::from_secs(60)))],
            ..ServerOptions::default()
        },
        None,
    );
    let mut daemon = slow_retry_daemon(
        "tarpit",
        &plain_tenant("acme", "acme.test", &server, "command_timeout = 1s\n"),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "slow", "x"),
    );
    let started = Instant::now();
    let entry = wait_for_attempt(&daemon, "acme");
    let elapsed = started.elapsed();
    // Far below the 60 s tarpit: the 1 s timeout, not the relay, ended it.
    assert!(
        elapsed < Duration::from_secs(15),
        "a 1 s command_timeout took {elapsed:?}"
    );
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        str_of(&entry, "last_error").contains("timed out"),
        "{entry:#?}"
    );
    assert!(server.messages().is_empty());
}

#[test]
fn auth_auto_prefers_plain_and_uses_login_when_only_it_is_offered() {
    let opts = |mechanisms: &[&str]| ServerOptions {
        require_auth: Some((USER.into(), PASSWORD.into())),
        auth_mechanisms: mechanisms.iter().map(|m| m.to_string()).collect(),
        ..ServerOptions::default()
    };
    let both = TestServer::start(opts(&["LOGIN", "PLAIN"]), None);
    let login_only = TestServer::start(opts(&["LOGIN"]), None);
    let creds = format!(
        "auth = auto\nusername = {USER}\npassword = {PASSWORD}\nallow_plaintext_auth = yes\n"
    );
    let config = plain_tenant("a", "a.test", &both, &creds)
        + &plain_tenant("b", "b.test", &login_only, &creds);
    let mut daemon = Daemon::new("auth_auto", &config);
    daemon.start();
    daemon.submit(
        &["x@example.com"],
        &message("pbx@a.test", "x@example.com", "auth", "x"),
    );
    daemon.submit(
        &["y@example.com"],
        &message("pbx@b.test", "y@example.com", "auth", "y"),
    );
    for (server, mechanism) in [(&both, "PLAIN"), (&login_only, "LOGIN")] {
        let got = server.wait_for_messages(1, ARRIVAL);
        assert_eq!(got.len(), 1, "{:?}", commands(server));
        assert_eq!(got[0].auth_user.as_deref(), Some(USER));
        let auth: Vec<String> = commands(server)
            .into_iter()
            .filter(|c| c.starts_with("AUTH"))
            .collect();
        assert_eq!(auth.len(), 1, "{auth:?}");
        assert!(
            auth[0].starts_with(&format!("AUTH {mechanism}")),
            "expected {mechanism}: {auth:?}"
        );
    }
}

/// Where `localhost` has several addresses (::1 and 127.0.0.1 on most
/// systems), the server listens on 127.0.0.1 only, so the client must go
/// past a refused address. Where it has one, this covers only the name.
#[test]
fn relay_host_name_is_tried_on_every_address() {
    let server = TestServer::start(ServerOptions::default(), None);
    let addrs: Vec<_> = ("localhost", server.port())
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    if addrs.len() < 2 {
        eprintln!("note: localhost resolves to {addrs:?} here; only one address is tried");
    }
    let relay = format!("localhost:{}", server.port());
    let mut daemon = Daemon::new(
        "several_addresses",
        &tenant(
            "acme",
            "acme.test",
            &relay,
            "tls = none\nconnect_timeout = 5s\n",
        ),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "by name", "x"),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{:#?}", daemon.queue());
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

// ---------------------------------------------------------------------------
// TLS safety.
// ---------------------------------------------------------------------------

#[test]
fn refused_starttls_never_falls_back_to_plaintext() {
    let ca = TestCa::new();
    let replies = [
        "454 4.7.0 TLS not available due to temporary reason",
        "502 5.5.1 Not implemented",
        "554 5.7.0 TLS refused",
        "421 4.3.2 Service shutting down",
    ];
    let servers: Vec<TestServer> = replies
        .iter()
        .map(|reply| {
            TestServer::start(
                ServerOptions {
                    tls: Tls::StartTls,
                    starttls_reply: Some(reply.to_string()),
                    require_auth: Some((USER.into(), PASSWORD.into())),
                    ..ServerOptions::default()
                },
                Some(&ca),
            )
        })
        .collect();
    let mut daemon = Daemon::bare("starttls_refused");
    let extra = format!(
        "{}username = {USER}\npassword = {PASSWORD}\n",
        daemon.trust(&ca)
    );
    let config: String = servers
        .iter()
        .enumerate()
        .map(|(i, server)| starttls_tenant(&format!("t{i}"), &format!("t{i}.test"), server, &extra))
        .collect();
    daemon.configure(&config);
    daemon.start();
    for i in 0..servers.len() {
        let from = format!("pbx@t{i}.test");
        daemon.submit(
            &["alice@example.com"],
            &message(&from, "alice@example.com", "secret", "x"),
        );
    }
    for (i, (server, reply)) in servers.iter().zip(replies).enumerate() {
        let entry = wait_for_attempt(&daemon, &format!("t{i}"));
        assert_eq!(str_of(&entry, "state"), "deferred", "{reply}: {entry:#?}");
        let code = &reply[..3];
        assert!(
            str_of(&entry, "last_error").contains(code),
            "{reply}: {entry:#?}"
        );
        assert_nothing_sent(server);
        assert_eq!(server.tls_handshakes(), 0);
        let unexpected: Vec<String> = commands(server)
            .into_iter()
            .filter(|c| !(c.starts_with("EHLO") || c == "STARTTLS" || c == "QUIT"))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{reply}: plaintext after a refused STARTTLS: {unexpected:?}"
        );
    }
}

#[test]
fn bytes_injected_after_starttls_220_abort_before_tls() {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            inject_after_starttls: Some("250-PIPELINING\r\n250 AUTH PLAIN\r\n".into()),
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut daemon = Daemon::bare("starttls_injection");
    let extra = format!(
        "{}username = {USER}\npassword = {PASSWORD}\n",
        daemon.trust(&ca)
    );
    write_slow_retry_config(
        &daemon,
        &starttls_tenant("acme", "acme.test", &server, &extra),
    );
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "secret", "x"),
    );
    let entry = wait_for_attempt(&daemon, "acme");
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        str_of(&entry, "last_error").contains("injection"),
        "{entry:#?}"
    );
    assert_nothing_sent(&server);
    assert_eq!(server.tls_handshakes(), 0);
}

/// A STARTTLS relay whose plaintext EHLO offers `before_tls` and whose EHLO
/// in TLS follows `opts`; one message to two recipients, so pipelining would
/// show, is sent through it. Returns what arrived and the command log.
fn send_over_starttls(
    test: &str,
    opts: ServerOptions,
    before_tls: &[&str],
    body: &str,
) -> (Received, Vec<CommandRecord>) {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            ehlo_before_tls: Some(before_tls.iter().map(|k| k.to_string()).collect()),
            ..opts
        },
        Some(&ca),
    );
    let mut daemon = Daemon::bare(test);
    daemon.configure(&starttls_tenant(
        "acme",
        "acme.test",
        &server,
        &daemon.trust(&ca),
    ));
    daemon.start();
    daemon.submit(
        &["a@example.com", "b@example.com"],
        &message("pbx@acme.test", "a@example.com", "over tls", body),
    );
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(
        got.len(),
        1,
        "not delivered: {:?}; queue: {:#?}",
        commands(&server),
        daemon.queue()
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert_eq!(server.tls_handshakes(), 1);
    let m = got.into_iter().next().expect("one message");
    assert!(m.tls, "sent before TLS: {:?}", commands(&server));
    assert_eq!(m.rcpt_to, ["a@example.com", "b@example.com"]);
    (m, server.command_log())
}

/// RFC 3207 §4.2: after STARTTLS the client must discard what it learned
/// from the plaintext EHLO. Extensions offered only there (a man in the
/// middle can add them) are not used in TLS: no pipelining, no BDAT, and
/// the plaintext SIZE of 10 octets neither refuses the message nor appears
/// as a SIZE= parameter the relay no longer offers.
#[test]
fn extensions_offered_only_before_starttls_are_forgotten_after_it() {
    let opts = ServerOptions {
        pipelining: false,
        chunking: false,
        size_limit: None,
        ..ServerOptions::default()
    };
    let before_tls = ["PIPELINING", "CHUNKING", "SIZE 10", "8BITMIME"];
    let body = "far more than the ten octets the plaintext EHLO allowed";
    let (m, log) = send_over_starttls("starttls_forgets_plaintext_ehlo", opts, &before_tls, body);
    assert!(m.data.len() > 10, "{:?}", m.text());
    assert!(m.text().contains(body), "{:?}", m.text());
    assert!(!m.bdat, "sent with BDAT: {log:#?}");
    assert!(!m.mail_params.contains("SIZE="), "{:?}", m.mail_params);
    assert!(log.iter().any(|c| c.line == "STARTTLS"), "{log:#?}");
    assert!(log.iter().any(|c| c.line == "DATA"), "{log:#?}");
    assert!(!log.iter().any(|c| c.line.starts_with("BDAT")), "{log:#?}");
    assert!(log.iter().all(|c| !c.pipelined), "pipelined: {log:#?}");
}

/// The converse: extensions the relay offers only once in TLS are used.
#[test]
fn extensions_offered_only_after_starttls_are_used() {
    let opts = ServerOptions {
        pipelining: true,
        chunking: true,
        size_limit: Some(1_000_000),
        ..ServerOptions::default()
    };
    let (m, log) = send_over_starttls("starttls_learns_tls_ehlo", opts, &[], "x");
    assert!(m.bdat, "not sent with BDAT: {log:#?}");
    assert!(
        m.mail_params
            .split_whitespace()
            .any(|p| p == format!("SIZE={}", m.data.len())),
        "{:?} for {} octets",
        m.mail_params,
        m.data.len()
    );
    let from_mail: Vec<(&str, bool)> = log
        .iter()
        .skip_while(|c| !c.line.starts_with("MAIL"))
        .take(2)
        .map(|c| (c.line.get(..4).unwrap_or(""), c.pipelined))
        .collect();
    // MAIL and the first RCPT arrived together with what follows them.
    assert_eq!(from_mail, [("MAIL", true), ("RCPT", true)], "{log:#?}");
}

#[test]
fn stalled_tls_handshake_times_out_while_other_tenants_send() {
    let ca = TestCa::new();
    let stall = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            stall_after_starttls: true,
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let healthy = TestServer::start(ServerOptions::default(), None);
    // Long enough that b's delivery, process start-up included, fits inside
    // it on a loaded machine; short against the default of 5 minutes.
    let timeout = Duration::from_secs(10);
    let mut daemon = Daemon::bare("starttls_stall");
    let a_extra = format!("{}command_timeout = 10s\n", daemon.trust(&ca));
    let config = starttls_tenant("a", "a.test", &stall, &a_extra)
        + &plain_tenant("b", "b.test", &healthy, "");
    write_slow_retry_config(&daemon, &config);
    daemon.start();

    daemon.submit(
        &["x@example.com"],
        &message("pbx@a.test", "x@example.com", "stuck", "x"),
    );
    assert!(stall.wait_for_command("STARTTLS", ARRIVAL));
    let stalled_at = Instant::now();
    daemon.submit(
        &["y@example.com"],
        &message("pbx@b.test", "y@example.com", "meanwhile", "y"),
    );
    let got = healthy.wait_for_messages(1, timeout);
    assert_eq!(
        got.len(),
        1,
        "tenant b waited for tenant a's stalled handshake: {:?}",
        stalled_at.elapsed()
    );
    // b's mail went out while a's handshake was still stalled.
    let queue = daemon.queue();
    let a_entry = queue.iter().find(|e| str_of(e, "tenant") == "a");
    assert!(
        a_entry.is_some_and(|e| attempts(e) == 0),
        "a's attempt ended before b's delivery: {queue:#?}"
    );

    let entry = wait_for_attempt_within(&daemon, "a", timeout + Duration::from_secs(10));
    let elapsed = stalled_at.elapsed();
    assert!(
        elapsed < timeout + Duration::from_secs(10),
        "a {timeout:?} command_timeout took {elapsed:?}"
    );
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        str_of(&entry, "last_error").contains("timed out"),
        "{entry:#?}"
    );
    assert_nothing_sent(&stall);
}

/// One STARTTLS tenant trusting the test CA, against a server presenting
/// `cert`; returns the queue entry after the first attempt.
fn attempt_with_certificate(test: &str, cert: CertKind, extra: &str) -> (Value, TestServer) {
    let ca = TestCa::new();
    let server = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            cert,
            require_auth: Some((USER.into(), PASSWORD.into())),
            ..ServerOptions::default()
        },
        Some(&ca),
    );
    let mut daemon = Daemon::bare(test);
    let extra = format!(
        "{}username = {USER}\npassword = {PASSWORD}\n{extra}",
        daemon.trust(&ca)
    );
    daemon.configure(&starttls_tenant("acme", "acme.test", &server, &extra));
    daemon.start();
    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "secret", "x"),
    );
    (wait_for_attempt(&daemon, "acme"), server)
}

#[test]
fn expired_certificate_is_refused_with_advice() {
    let (entry, server) = attempt_with_certificate("cert_expired", CertKind::Expired, "");
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        str_of(&entry, "last_error").contains("expired"),
        "{entry:#?}"
    );
    assert_nothing_sent(&server);
    assert_eq!(server.tls_handshakes(), 0);
}

#[test]
fn certificate_for_another_name_is_refused_with_advice() {
    let (entry, server) = attempt_with_certificate("cert_wrong_name", CertKind::WrongName, "");
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(
        str_of(&entry, "last_error").contains("host name"),
        "{entry:#?}"
    );
    assert_nothing_sent(&server);
    assert_eq!(server.tls_handshakes(), 0);
}

#[test]
fn tls_verify_no_accepts_expired_and_untrusted_certificates() {
    let ca = TestCa::new();
    let start = |cert| {
        TestServer::start(
            ServerOptions {
                tls: Tls::StartTls,
                cert,
                require_auth: Some((USER.into(), PASSWORD.into())),
                ..ServerOptions::default()
            },
            Some(&ca),
        )
    };
    let expired = start(CertKind::Expired);
    let untrusted = start(CertKind::Valid);
    // No ca_file anywhere: the test CA is not trusted at all.
    let extra = format!("tls_verify = no\nusername = {USER}\npassword = {PASSWORD}\n");
    let config = starttls_tenant("a", "a.test", &expired, &extra)
        + &starttls_tenant("b", "b.test", &untrusted, &extra);
    let mut daemon = Daemon::new("tls_verify_no", &config);
    daemon.start();
    daemon.submit(
        &["x@example.com"],
        &message("pbx@a.test", "x@example.com", "expired", "x"),
    );
    daemon.submit(
        &["y@example.com"],
        &message("pbx@b.test", "y@example.com", "untrusted", "y"),
    );
    for server in [&expired, &untrusted] {
        let got = server.wait_for_messages(1, ARRIVAL);
        assert_eq!(got.len(), 1, "{:#?}", daemon.queue());
        assert!(got[0].tls);
        assert_eq!(got[0].auth_user.as_deref(), Some(USER));
    }
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
}

#[test]
fn implicit_tls_tenant_against_plaintext_relay_defers_cleanly() {
    let plaintext = TestServer::start(ServerOptions::default(), None);
    let healthy = TestServer::start(ServerOptions::default(), None);
    let relay = format!("localhost:{}", plaintext.port());
    let config = tenant("a", "a.test", &relay, "tls = implicit\n")
        + &plain_tenant("b", "b.test", &healthy, "");
    let mut daemon = slow_retry_daemon("implicit_on_plaintext", &config);
    daemon.start();
    daemon.submit(
        &["x@example.com"],
        &message("pbx@a.test", "x@example.com", "sealed", "x"),
    );
    let entry = wait_for_attempt(&daemon, "a");
    assert_eq!(str_of(&entry, "state"), "deferred", "{entry:#?}");
    assert!(str_of(&entry, "last_error").contains("TLS"), "{entry:#?}");
    assert_nothing_sent(&plaintext);

    // The daemon is alive and still delivering.
    daemon.submit(
        &["y@example.com"],
        &message("pbx@b.test", "y@example.com", "after", "y"),
    );
    let got = healthy.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{}", daemon.log());
}
