//! `pbxmail sendmail`, the PBX's way in, end to end: what it spools with or
//! without a daemon (and before one ever ran), the headers it adds or strips
//! (Date, Message-ID, From; Bcc, folded or not, under `-t`), where input ends,
//! which tenant a sender's domain picks, and the invocations it refuses
//! without spooling. The daemon then delivers to a scripted relay on
//! 127.0.0.1 and the tests assert on what arrived and what the spool holds.

use std::time::Duration;

use crate::support::harness::{attempts, plain_tenant, recipients, str_of, Daemon};
use crate::support::mail::{body, headers, message};
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
