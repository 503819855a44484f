//! `pbxmail sendmail`, the PBX's way in, end to end: what it spools with or
//! without a daemon (and before one ever ran), the headers it adds or strips
//! (Date, Message-ID, From; Bcc, folded or not, under `-t`), where input ends,
//! which tenant a sender's domain picks, and the invocations it refuses
//! without spooling. The daemon then delivers to a scripted relay on
//! 127.0.0.1 and the tests assert on what arrived and what the spool holds.

use std::time::Duration;

use crate::support::harness::{attempts, plain_tenant, recipients, str_of, Daemon};
use crate::support::mail::{body, field, headers, message, parse_headers};
use crate::support::smtp_server::{ServerOptions, TestServer};
use serde_json::Value;

/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(10);

#[test]
fn mail_queued_while_daemon_stopped_is_delivered_after_start() {
    let (mut daemon, server) =
        Daemon::with_relay("queued_while_stopped", ServerOptions::default(), "");
    // A daemon that ran before (so the spool exists) and was stopped.
    daemon.start();
    assert_eq!(daemon.stop().code(), Some(0), "SIGTERM: orderly exit");

    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "offline", "waited"),
    );
    assert_queued_then_delivered_after_start(&mut daemon, &server);
}

/// Regression guard for a fresh install: a PBX may submit before the daemon
/// was ever started, when the spool folders do not exist yet.
#[test]
fn sendmail_before_the_daemon_ever_ran_spools_the_message() {
    let (mut daemon, server) =
        Daemon::with_relay("sendmail_fresh_spool", ServerOptions::default(), "");
    assert!(!daemon.spool_dir().exists());

    daemon.submit(
        &["alice@example.com"],
        &message("pbx@acme.test", "alice@example.com", "offline", "waited"),
    );
    assert_queued_then_delivered_after_start(&mut daemon, &server);
}

/// The one submitted message is listed as queued and untried while no daemon
/// runs; once one starts it arrives and leaves the spool.
fn assert_queued_then_delivered_after_start(daemon: &mut Daemon, server: &TestServer) {
    let queue = daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "state"), "queued");
    assert_eq!(str_of(&queue[0], "tenant"), "acme");
    assert_eq!(str_of(&queue[0], "sender"), "pbx@acme.test");
    assert_eq!(recipients(&queue[0]), ["alice@example.com"]);
    assert_eq!(attempts(&queue[0]), 0);
    assert_eq!(server.connections(), 0);

    daemon.start();
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["alice@example.com"]);
    assert_eq!(body(&got[0]), "waited\r\n");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert_eq!(daemon.stop().code(), Some(0), "SIGTERM: orderly exit");
}

#[test]
fn lone_dot_ends_input_without_dash_i() {
    let (mut daemon, server) = Daemon::with_relay("lone_dot", ServerOptions::default(), "");
    daemon.start();
    let msg = b"From: pbx@acme.test\nTo: alice@example.com\nSubject: dot\n\nbefore\n.\nafter\n";
    let run = daemon.sendmail(&["alice@example.com"], msg);
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(body(&got[0]), "before\r\n");
}

#[test]
fn sendmail_adds_missing_headers() {
    let (mut daemon, server) = Daemon::with_relay("added_headers", ServerOptions::default(), "");
    daemon.start();
    // No From, Date or Message-ID: the sender comes from -f, the name from -F.
    let run = daemon.sendmail(
        &[
            "-i",
            "-fpbx@acme.test",
            "-F",
            "Front Desk",
            "alice@example.com",
        ],
        b"Subject: bare\n\nhi\n",
    );
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "pbx@acme.test");
    let h = headers(&got[0]).to_ascii_lowercase();
    for name in ["\r\ndate:", "\r\nmessage-id:", "\r\nsubject: bare"] {
        assert!(
            format!("\r\n{h}").contains(name),
            "{name:?} missing in {h:?}"
        );
    }
    let from = format!("\r\n{h}")
        .split("\r\nfrom:")
        .nth(1)
        .map(|rest| rest.split("\r\n").next().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(
        from.contains("pbx@acme.test") && from.contains("front desk"),
        "From header: {from:?}"
    );
}

#[test]
fn sendmail_t_delivers_to_bcc_but_strips_the_header() {
    let (mut daemon, server) = Daemon::with_relay("bcc", ServerOptions::default(), "");
    daemon.start();
    let msg = b"From: pbx@acme.test\nTo: alice@example.com\nBcc: hidden@example.com\nSubject: bcc\n\nbody\n";
    let run = daemon.sendmail(&["-t", "-i"], msg);
    assert_eq!(run.code, 0, "{run:?}");

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    let mut rcpts = got[0].rcpt_to.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["alice@example.com", "hidden@example.com"]);
    let data = got[0].text().to_ascii_lowercase();
    assert!(!data.contains("bcc:"), "{data:?}");
    assert!(!data.contains("hidden@example.com"), "{data:?}");
    assert!(data.contains("to: alice@example.com"), "{data:?}");
}

#[test]
fn sendmail_refuses_bad_invocations_without_spooling() {
    let (mut daemon, server) =
        Daemon::with_relay("sendmail_refusals", ServerOptions::default(), "");
    daemon.start();
    let good = message("pbx@acme.test", "alice@example.com", "x", "x");

    let run = daemon.sendmail(&["-Q", "alice@example.com"], &good);
    assert_eq!(run.code, 64, "{run:?}");
    assert!(run.stderr.contains("-Q"), "option not named: {run:?}");

    let stranger = message("pbx@nobody.test", "alice@example.com", "x", "x");
    let run = daemon.sendmail(&["-i", "alice@example.com"], &stranger);
    assert_eq!(run.code, 65, "no tenant for nobody.test: {run:?}");

    let run = daemon.sendmail(&["-i"], &good);
    assert_eq!(run.code, 65, "no recipients: {run:?}");

    let run = daemon.sendmail(&["-i", "alice@example.com"], b"Subject: anonymous\n\nx\n");
    assert_eq!(run.code, 65, "no sender: {run:?}");

    // A bad config is the admin's problem, not the message's.
    let broken = daemon.write_file(
        "broken.ini",
        "[daemon]\nspool_dir = relative/path\nbogus = 1\n",
    );
    let broken = broken.to_string_lossy().into_owned();
    let run = daemon.sendmail(&["-C", &broken, "-i", "alice@example.com"], &good);
    assert_eq!(run.code, 78, "{run:?}");

    assert!(daemon.queue().is_empty(), "{:#?}", daemon.queue());
    assert_eq!(server.connections(), 0);
}

#[test]
fn sender_domain_picks_the_tenant_exact_before_wildcard() {
    let wild = TestServer::start(ServerOptions::default(), None);
    let exact = TestServer::start(ServerOptions::default(), None);
    let config = plain_tenant("wild", "*.acme.test", &wild, "")
        + &plain_tenant("exact", "desk.acme.test", &exact, "");
    let mut daemon = Daemon::new("tenant_routing", &config);
    // Queued with the daemon stopped, to check `queue --tenant` first.
    daemon.start();
    assert_eq!(daemon.stop().code(), Some(0));
    daemon.submit(
        &["a@example.com"],
        &message("pbx@DESK.Acme.test", "a@example.com", "exact", "x"),
    );
    daemon.submit(
        &["-f", "pbx@branch.ACME.test", "b@example.com"],
        &message("Front <pbx@desk.acme.test>", "b@example.com", "wild", "x"),
    );
    let config_path = daemon.config_path().to_string_lossy().into_owned();
    let run = daemon.run(
        &["queue", "-c", &config_path, "--tenant", "exact", "--json"],
        b"",
    );
    assert_eq!(run.code, 0, "{run:?}");
    let only: Value = serde_json::from_str(&run.stdout).expect("queue JSON");
    let only = only.as_array().cloned().unwrap_or_default();
    assert_eq!(only.len(), 1, "{only:#?}");
    assert_eq!(recipients(&only[0]), ["a@example.com"]);

    daemon.start();
    let to_exact = exact.wait_for_messages(1, ARRIVAL);
    let to_wild = wild.wait_for_messages(1, ARRIVAL);
    assert_eq!(to_exact.len(), 1);
    assert_eq!(to_exact[0].rcpt_to, ["a@example.com"]);
    assert_eq!(to_wild.len(), 1);
    // -f wins over the From header for both the envelope and the tenant.
    assert_eq!(to_wild[0].rcpt_to, ["b@example.com"]);
    assert_eq!(
        to_wild[0].mail_from.to_ascii_lowercase(),
        "pbx@branch.acme.test"
    );
}

#[test]
fn folded_bcc_header_is_removed_entirely() {
    let (mut daemon, server) = Daemon::with_relay("bcc_folded", ServerOptions::default(), "");
    daemon.start();
    let msg = b"From: pbx@acme.test\nBCC: one@example.com,\n\ttwo@example.com\nTo: alice@example.com\nSubject: folded\n\nbody\n";
    let run = daemon.sendmail(&["-t", "-i"], msg);
    assert_eq!(run.code, 0, "{run:?}");

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    let mut rcpts = got[0].rcpt_to.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["alice@example.com", "one@example.com", "two@example.com"]
    );
    let data = got[0].text().to_ascii_lowercase();
    assert!(!data.contains("bcc"), "{data:?}");
    assert!(!data.contains("one@example.com"), "{data:?}");
    assert!(!data.contains("two@example.com"), "{data:?}");
    assert!(data.contains("\r\nto: alice@example.com\r\n"), "{data:?}");
    assert!(data.contains("\r\nsubject: folded\r\n"), "{data:?}");
    assert_eq!(body(&got[0]), "body\r\n");
}

// ---------------------------------------------------------------------------
// Hostile or careless input (issue 14): what is parsed is what is sent, and
// every refusal says what is really wrong.
// ---------------------------------------------------------------------------

/// `printf 'Subject: x' | sendmail -f a@t b@x`: the end of input ends the
/// last header line; it is no "header line longer than 64 KiB" (exit 65,
/// which callers take as permanent and drop the message).
#[test]
fn header_block_without_a_final_newline_is_queued_not_refused() {
    let (mut daemon, server) =
        Daemon::with_relay("header_without_newline", ServerOptions::default(), "");
    daemon.start();
    let run = daemon.sendmail(&["-f", "pbx@acme.test", "alice@example.com"], b"Subject: x");
    assert_eq!(run.code, 0, "{run:?}");
    // With -t the unterminated line still names a recipient.
    let run = daemon.sendmail(
        &["-t", "-f", "pbx@acme.test"],
        b"Subject: y\nTo: bob@example.com",
    );
    assert_eq!(run.code, 0, "{run:?}");

    let mut got = server.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2);
    got.sort_by_key(|m| m.rcpt_to.clone());
    assert_eq!(got[0].rcpt_to, ["alice@example.com"]);
    assert_eq!(got[1].rcpt_to, ["bob@example.com"]);
    let fields = parse_headers(&headers(&got[0]));
    assert_eq!(field(&fields, "Subject"), Some("x"), "{fields:?}");
    assert_eq!(body(&got[0]), "");
    let fields = parse_headers(&headers(&got[1]));
    assert_eq!(field(&fields, "To"), Some("bob@example.com"), "{fields:?}");
}

/// A bare CR inside a header is data: `X-A: 1<CR>Bcc: secret@y` under `-t`
/// adds neither a Bcc field nor a recipient, and the copy sent is the one
/// parsed (the CR a space), so no reader after us sees a Bcc either.
#[test]
fn bare_cr_in_a_header_adds_neither_a_field_nor_a_recipient() {
    let (mut daemon, server) = Daemon::with_relay("bare_cr_header", ServerOptions::default(), "");
    daemon.start();
    let msg = b"From: pbx@acme.test\nTo: alice@example.com\nX-A: 1\rBcc: secret@example.com\nSubject: cr\rCc: other@example.com\n\nbody\n";
    let run = daemon.sendmail(&["-t", "-i"], msg);
    assert_eq!(run.code, 0, "{run:?}");

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["alice@example.com"]);
    let head = headers(&got[0]);
    let fields = parse_headers(&head);
    let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["From", "To", "X-A", "Subject", "Date", "Message-ID"],
        "{head:?}"
    );
    assert_eq!(field(&fields, "X-A"), Some("1 Bcc: secret@example.com"));
    assert_eq!(field(&fields, "Subject"), Some("cr Cc: other@example.com"));
    assert!(
        !got[0]
            .data
            .windows(2)
            .any(|w| w[0] == b'\r' && w[1] != b'\n'),
        "a bare CR went out: {head:?}"
    );
}

/// A Latin-1 `ü` in a Subject (a PBX's caller name) is kept as its byte,
/// not made U+FFFD; the body's 8-bit bytes too.
#[test]
fn header_bytes_that_are_not_utf8_arrive_unchanged() {
    let (mut daemon, server) = Daemon::with_relay("latin1_header", ServerOptions::default(), "");
    daemon.start();
    let msg =
        b"From: pbx@acme.test\nSubject: Anruf von M\xfcller\nX-Caller: Gr\xfc\xdfe\n\nK\xe4se\n";
    let run = daemon.sendmail(&["-i", "alice@example.com"], msg);
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    let data = &got[0].data;
    let wanted: &[u8] =
        b"From: pbx@acme.test\r\nSubject: Anruf von M\xfcller\r\nX-Caller: Gr\xfc\xdfe\r\n";
    assert!(
        data.starts_with(wanted),
        "{:?}",
        String::from_utf8_lossy(data)
    );
    assert!(data.ends_with(b"\r\n\r\nK\xe4se\r\n"), "{data:?}");
}

/// Every exit 65 (EX_DATAERR) says what is really wrong: a header line
/// refused as too long is one, a long body line is no reason to refuse, and
/// `-t` without any address is not told to "use -t".
#[test]
fn sendmail_data_errors_say_what_is_really_wrong() {
    let (mut daemon, server) =
        Daemon::with_relay("sendmail_true_errors", ServerOptions::default(), "");
    daemon.start();

    let long_header = format!("From: pbx@acme.test\nX-Long: {}\n\nx\n", "h".repeat(70_000));
    let run = daemon.sendmail(&["-i", "alice@example.com"], long_header.as_bytes());
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr.contains("header line is longer than 64 KiB"),
        "{run:?}"
    );

    let run = daemon.sendmail(
        &["-t", "-i", "-f", "pbx@acme.test"],
        b"To: undisclosed-recipients:;\n\nx\n",
    );
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr.contains("no address in To, Cc or Bcc"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("use -t"), "{run:?}");

    // The null sender without a From: nothing to route by, and it says so.
    let run = daemon.sendmail(
        &["-i", "-f", "<>", "alice@example.com"],
        b"Subject: bounce\n\nx\n",
    );
    assert_eq!(run.code, 65, "{run:?}");
    assert!(run.stderr.contains("no From address"), "{run:?}");

    let run = daemon.sendmail(&["-i", "alice@example.com", "-r"], b"");
    assert_eq!(run.code, 64, "{run:?}");
    assert!(run.stderr.contains("option -r needs a value"), "{run:?}");
    assert!(daemon.queue().is_empty(), "{:#?}", daemon.queue());

    // A line of 70 000 octets that is no header starts the body: queued.
    let long_body = format!("{}\n", "b".repeat(70_000));
    let run = daemon.sendmail(
        &["-i", "-f", "pbx@acme.test", "alice@example.com"],
        long_body.as_bytes(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(
        body(&got[0]).replace("\r\n ", "").trim_end(),
        "b".repeat(70_000)
    );
}
