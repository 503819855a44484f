//! The admin interface, end to end: `status` (JSON shape and counts, the
//! human table), `flush`, `hold`, `release`, `delete` and `reload` over the
//! control socket of a real daemon; what each says without a daemon; `pbxmail
//! test` against scripted relays (transcript, redaction, advice); the
//! `mailq` and `sendmail` personalities through symlinks; and the delivery
//! log line's format with and without `JOURNAL_STREAM` (the format is part of
//! the interface). The harness gives each test its temp dir, spool and
//! config; the daemon is spawned here so a test can set its environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::harness::{
    closed_port, count_commands, plain_tenant, str_of, tenant, wait_until, Daemon, Run, Running,
    PBXMAIL,
};
use crate::support::mail::{note, queued_id, subject, subjects};
use crate::support::smtp_server::{Fault, ServerOptions, TestCa, TestServer, Tls};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::Value;

/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(10);
/// What "delivered within a few seconds" of a flush means.
const FLUSH_BOUND: Duration = Duration::from_secs(5);
/// Retry settings under which nothing is retried during a test on its own.
const SLOW_RETRY: (&str, &str) = ("1h", "2h");

const USER: &str = "pbx@acme.test";
const PASSWORD: &str = "Pw-7f3kq9-zz";

// ---------------------------------------------------------------------------
// Configuration, submission and CLI helpers.
// ---------------------------------------------------------------------------

/// The control socket every test's config names: inside its own temp dir.
fn control_socket(daemon: &Daemon) -> PathBuf {
    daemon.dir().join("control.sock")
}

/// The whole config: a `[daemon]` section for this spool and control socket
/// with the given retry_min / retry_max, then the tenant sections.
fn config_text(daemon: &Daemon, retry: (&str, &str), tenants: &str) -> String {
    let keys = format!("retry_min = {}\nretry_max = {}", retry.0, retry.1);
    format!("{}\n{tenants}", daemon.daemon_section(&keys))
}

fn configure(daemon: &Daemon, retry: (&str, &str), tenants: &str) {
    daemon.write_config(&config_text(daemon, retry, tenants));
}

/// `pbxmail ARGS...` with PBXMAIL_CONFIG set to the test's config.
fn cli(daemon: &Daemon, args: &[&str]) -> Run {
    daemon.run(args, b"")
}

/// Runs `program` (a symlink to the binary, say) with PBXMAIL_CONFIG set.
fn run_program(program: &Path, args: &[&str], config: &Path, stdin: &[u8]) -> Run {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .env("PBXMAIL_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    let mut input = child.stdin.take().expect("stdin pipe");
    // A command that does not read stdin closes the pipe early; not a failure.
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().expect("wait for the command");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A symlink named `name` to the binary under test, in the test's dir.
fn personality(daemon: &Daemon, name: &str) -> PathBuf {
    let link = daemon.dir().join(name);
    std::os::unix::fs::symlink(PBXMAIL, &link).expect("symlink to the binary");
    link
}

/// The queue entry with this ID, if the queue holds it.
fn entry<'a>(queue: &'a [Value], id: &str) -> Option<&'a Value> {
    queue.iter().find(|e| str_of(e, "id") == id)
}

fn state_of(queue: &[Value], id: &str) -> String {
    entry(queue, id)
        .map(|e| str_of(e, "state").to_string())
        .unwrap_or_default()
}

/// Waits until the server has seen `n` QUITs: the n-th session is over, so
/// whatever it was going to send has been sent.
fn wait_for_sessions_ended(server: &TestServer, n: usize) {
    let ended = wait_until(ARRIVAL, || count_commands(server, "QUIT") >= n);
    assert!(
        ended,
        "session {n} did not end; commands: {:#?}",
        server.commands()
    );
}

/// `pbxmail status --json`, parsed; panics unless it exits 0.
fn status(daemon: &Daemon) -> Value {
    let run = cli(daemon, &["status", "--json"]);
    assert_eq!(run.code, 0, "status --json failed: {run:?}");
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", run.stdout))
}

/// One tenant's object in a status reply (Null if absent).
fn tenant_status(status: &Value, name: &str) -> Value {
    status["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Polls `status --json` until `cond` holds for the tenant; returns the last
/// object seen either way.
fn wait_for_tenant(daemon: &Daemon, name: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    wait_until(ARRIVAL, || {
        last = tenant_status(&status(daemon), name);
        cond(&last)
    });
    last
}

fn number(t: &Value, key: &str) -> u64 {
    t[key].as_u64().unwrap_or(u64::MAX)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `YYYY-MM-DDTHH:MM:SSZ` → Unix seconds; None unless exactly that shape.
fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let shape_ok = b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape_ok {
        return None;
    }
    let num = |from: usize, to: usize| text[from..to].parse::<i64>().ok();
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hh, mm, ss) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    // Days from civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// A server whose first `n` RCPTs get a 450, so the first attempt at each of
/// the first `n` single-recipient messages is deferred.
fn server_deferring_first_rcpts(n: usize) -> TestServer {
    let faults = (1..=n)
        .map(|i| {
            (
                "RCPT".to_string(),
                i,
                Fault::Reply("450 4.2.0 Mailbox busy, try later".to_string()),
            )
        })
        .collect();
    TestServer::start(
        ServerOptions {
            faults,
            ..ServerOptions::default()
        },
        None,
    )
}

/// Submits `subjects` to tenant acme while the daemon is stopped, starts it,
/// and waits until every message was tried once and deferred. Returns the IDs
/// in the order of `subjects`.
fn deferred_messages(daemon: &Daemon, subjects: &[&str]) -> (Running, Vec<String>) {
    let ids: Vec<String> = subjects
        .iter()
        .map(|s| daemon.submit_note("pbx@acme.test", "alice@example.com", s))
        .collect();
    let running = Running::start(daemon);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == ids.len() && q.iter().all(|e| str_of(e, "state") == "deferred")
    });
    assert!(
        queue.len() == ids.len() && queue.iter().all(|e| str_of(e, "state") == "deferred"),
        "messages were not deferred after the first attempt: {queue:#?}"
    );
    (running, ids)
}

// ---------------------------------------------------------------------------
// The daemon as a child process with an environment of the test's choosing.
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

const COUNT_KEYS: [&str; 6] = [
    "queued",
    "deferred",
    "held",
    "failed",
    "delivered",
    "bounced",
];

/// Every key of the interface's status shape, each with its type.
fn assert_status_shape(t: &Value) {
    let obj = t
        .as_object()
        .unwrap_or_else(|| panic!("tenant entry is not an object: {t}"));
    for key in ["name", "relay", "state"] {
        assert!(obj.get(key).is_some_and(Value::is_string), "{key}: {t:#}");
    }
    assert!(
        ["idle", "sending", "backoff"].contains(&str_of(t, "state")),
        "state: {t:#}"
    );
    for key in COUNT_KEYS {
        assert!(obj.get(key).is_some_and(Value::is_u64), "{key}: {t:#}");
    }
    for key in ["last_success", "last_error"] {
        let value = obj
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing: {t:#}"));
        assert!(value.is_string() || value.is_null(), "{key}: {t:#}");
    }
}

#[test]
fn status_json_has_the_interface_shape_and_counts_per_tenant() {
    let server = TestServer::start(ServerOptions::default(), None);
    let dead_relay = format!("127.0.0.1:{}", closed_port());
    let daemon = Daemon::bare("adm_status");
    configure(
        &daemon,
        SLOW_RETRY,
        &format!(
            "{}{}",
            plain_tenant("acme", "acme.test", &server, ""),
            tenant(
                "dead",
                "dead.test",
                &dead_relay,
                "tls = none\nconnect_timeout = 2s\n"
            )
        ),
    );
    // Spooled before the start, so the dead tenant's first session tries both.
    for n in 1..=3 {
        daemon.submit_note("pbx@acme.test", "a@example.com", &format!("ok {n}"));
    }
    for n in 1..=2 {
        daemon.submit_note("pbx@dead.test", "b@example.com", &format!("dead {n}"));
    }
    let _running = Running::start(&daemon);
    assert_eq!(server.wait_for_messages(3, ARRIVAL).len(), 3);

    let acme = wait_for_tenant(&daemon, "acme", |t| {
        number(t, "delivered") >= 3 && str_of(t, "state") == "idle"
    });
    let dead = wait_for_tenant(&daemon, "dead", |t| number(t, "deferred") == 2);
    let whole = status(&daemon);
    let tenants = whole["tenants"].as_array().expect("tenants is an array");
    assert_eq!(tenants.len(), 2, "{whole:#}");
    for t in tenants {
        assert_status_shape(t);
    }

    assert_eq!(
        str_of(&acme, "relay"),
        format!("127.0.0.1:{}", server.port())
    );
    assert_eq!(str_of(&acme, "state"), "idle", "{acme:#}");
    assert!(number(&acme, "delivered") >= 3, "{acme:#}");
    for key in ["queued", "deferred", "held", "failed", "bounced"] {
        assert_eq!(number(&acme, key), 0, "{key}: {acme:#}");
    }
    let success = str_of(&acme, "last_success");
    let at = parse_rfc3339(success)
        .unwrap_or_else(|| panic!("last_success is not RFC 3339 UTC: {acme:#}"));
    assert!(at.abs_diff(now_secs()) < 300, "last_success: {success}");

    assert_eq!(str_of(&dead, "relay"), dead_relay);
    assert_eq!(str_of(&dead, "state"), "backoff", "{dead:#}");
    assert_eq!(number(&dead, "deferred"), 2, "{dead:#}");
    for key in ["queued", "held", "failed", "delivered", "bounced"] {
        assert_eq!(number(&dead, key), 0, "{key}: {dead:#}");
    }
    assert!(dead["last_success"].is_null(), "{dead:#}");
    assert!(!str_of(&dead, "last_error").is_empty(), "{dead:#}");

    // The human table: a header, then one row per tenant.
    let table = cli(&daemon, &["status"]);
    assert_eq!(table.code, 0, "{table:?}");
    let lines: Vec<&str> = table
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "header + 2 rows expected:\n{}",
        table.stdout
    );
    for column in [
        "TENANT",
        "STATE",
        "RELAY",
        "QUEUED",
        "DEFERRED",
        "HELD",
        "DELIVERED",
    ] {
        assert!(
            lines[0].contains(column),
            "header lacks {column}: {}",
            lines[0]
        );
    }
    let row = |name: &str| -> Vec<&str> {
        lines[1..]
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{}", table.stdout))
            .split_whitespace()
            .collect()
    };
    let dead_row = row("dead");
    assert_eq!(dead_row.get(1), Some(&"backoff"), "{dead_row:?}");
    assert_eq!(dead_row.get(2), Some(&dead_relay.as_str()), "{dead_row:?}");
    assert_eq!(dead_row.get(4), Some(&"2"), "deferred column: {dead_row:?}");
    assert_eq!(row("acme").get(1), Some(&"idle"));
}

// ---------------------------------------------------------------------------
// Without a daemon
// ---------------------------------------------------------------------------

/// Mail of a tenant removed from the configuration stays queued and says so:
/// `tenant_configured: false`, no next attempt, a line in the table; the
/// daemon refuses to act on it by ID with a reason, and changes nothing.
#[test]
fn mail_of_a_removed_tenant_is_shown_as_having_no_tenant() {
    let server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("adm_no_tenant");
    let staying = plain_tenant("staying", "staying.test", &server, "");
    configure(
        &daemon,
        SLOW_RETRY,
        &(plain_tenant("gone", "gone.test", &server, "") + &staying),
    );
    let id = daemon.submit_note("pbx@gone.test", "a@example.com", "orphan");
    configure(&daemon, SLOW_RETRY, &staying);

    let run = cli(&daemon, &["queue", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let queue: Value = serde_json::from_str(&run.stdout).expect("queue JSON");
    let entry = &queue[0];
    assert_eq!(entry["id"], id.as_str(), "{queue:#}");
    assert_eq!(entry["tenant"], "gone", "{queue:#}");
    assert_eq!(entry["tenant_configured"], false, "{queue:#}");
    assert!(entry["next_attempt"].is_null(), "{queue:#}");
    let table = cli(&daemon, &["queue"]);
    assert!(
        table
            .stdout
            .contains("no tenant: [tenant:gone] is not in the configuration"),
        "{}",
        table.stdout
    );

    let _running = Running::start(&daemon);
    let run = cli(&daemon, &["hold", &id]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(run.stderr.contains("no longer configured"), "{run:?}");
    let after: Value =
        serde_json::from_str(&cli(&daemon, &["queue", "--json"]).stdout).expect("queue JSON");
    assert_eq!(after[0]["state"], "queued", "{after:#}");
    assert!(server.messages().is_empty());
}

/// A request from a newer or broken client is refused with a reason, never
/// taken for another command.
#[test]
fn control_socket_is_0660_and_answers_an_unknown_request_with_an_error() {
    use std::io::{BufRead, BufReader, Write};
    let server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("adm_unknown_request");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    // Mode 0660, in the daemon's group: the admins' group may steer it, nobody else.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(control_socket(&daemon)).expect("stat the control socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "{meta:?}");
    let own_group = std::fs::metadata(daemon.dir())
        .expect("stat the test dir")
        .gid();
    assert_eq!(meta.gid(), own_group, "{meta:?}");
    for request in [&b"{\"command\":\"explode\"}\n"[..], b"status\n"] {
        let mut stream =
            std::os::unix::net::UnixStream::connect(control_socket(&daemon)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(request).expect("send the request");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("read the reply");
        let reply: Value = serde_json::from_str(&line).expect("a JSON reply");
        assert_eq!(reply["ok"], false, "{line}");
        assert!(reply["result"].is_null(), "{line}");
        assert!(
            reply["error"]
                .as_str()
                .is_some_and(|e| e.contains("not a request")),
            "{line}"
        );
    }
}

/// A relay whose deferral carries a bare CR and ESC sequences that would
/// erase the line and print a fake green "sent": `pbxmail queue` and `status`
/// show them escaped, never raw on the admin's terminal.
#[test]
fn relay_control_characters_in_the_last_error_are_escaped_by_queue_and_status() {
    let hostile = "450 4.2.0 busy\r\x1b[2K\x1b[32m250 2.0.0 status=sent\x1b[0m";
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply: Some(hostile.to_string()),
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("adm_escape_relay_text");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let (_running, ids) = deferred_messages(&daemon, &["escaped"]);
    let table = cli(&daemon, &["queue"]);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains(&ids[0]), "{table:?}");
    assert!(
        !table.stdout.contains('\x1b') && !table.stdout.contains('\r'),
        "raw control characters reached the terminal: {:?}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains("busy\\r\\x1b[2K\\x1b[32m250 2.0.0 status=sent\\x1b[0m"),
        "{}",
        table.stdout
    );
    // The JSON keeps the text as it was (it is data, escaped by JSON itself).
    let json: Vec<Value> =
        serde_json::from_str(&cli(&daemon, &["queue", "--json"]).stdout).expect("queue JSON");
    assert!(str_of(&json[0], "last_error").contains('\x1b'), "{json:?}");

    let status = wait_for_tenant(&daemon, "acme", |t| !t["last_error"].is_null());
    assert!(status["last_error"]
        .as_str()
        .is_some_and(|e| e.contains('\x1b')));
    let table = cli(&daemon, &["status"]);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        !table.stdout.contains('\x1b') && !table.stdout.contains('\r'),
        "{table:?}"
    );
    assert!(table.stdout.contains("\\x1b[32m250"), "{}", table.stdout);
}

/// 32 admin connections that never send a request must not lock out
/// `status`: past the limit it is answered busy (exit 75), and the idle ones
/// are closed after the control socket's idle timeout, so `status` answers.
#[test]
fn idle_control_connections_time_out_and_status_past_the_limit_is_told_busy() {
    use std::io::Read;
    let server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("adm_idle_control");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    let idle: Vec<_> = (0..32)
        .map(|_| std::os::unix::net::UnixStream::connect(control_socket(&daemon)).expect("connect"))
        .collect();

    // The daemon accepts in order: the 33rd connection is status's.
    let busy = cli(&daemon, &["status"]);
    assert_eq!(busy.code, 75, "{busy:?}");
    assert!(busy.stderr.contains("busy, try again"), "{busy:?}");

    // Each idle connection is told why and closed by the daemon (EOF), well
    // within the bound; the read timeout only keeps a broken daemon from
    // hanging the test.
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .expect("the daemon closes an idle connection");
        assert!(text.contains("no request within"), "{text}");
    }
    let table = cli(&daemon, &["status"]);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.starts_with("TENANT"), "{table:?}");
    assert!(table.stdout.contains("acme"), "{table:?}");
}

#[test]
fn admin_commands_without_a_daemon_exit_69_and_name_the_socket() {
    let daemon = Daemon::bare("adm_nodaemon");
    configure(
        &daemon,
        SLOW_RETRY,
        &tenant("acme", "acme.test", "127.0.0.1:25", "tls = none\n"),
    );
    let socket = control_socket(&daemon);
    let socket_text = socket.display().to_string();
    let commands: [&[&str]; 9] = [
        &["status"],
        &["status", "--json"],
        &["flush"],
        &["flush", "--tenant", "acme"],
        &["hold", "0000000000000000000000A"],
        &["release", "0000000000000000000000A"],
        &["delete", "--tenant", "acme"],
        &["reload"],
        &["sendmail", "-q"],
    ];
    let check_all = |when: &str| {
        for args in commands {
            let run = cli(&daemon, args);
            assert_eq!(run.code, 69, "{when}: {args:?}: {run:?}");
            assert!(
                run.stderr.contains(&socket_text),
                "{when}: {args:?}: the message does not name {socket_text}: {}",
                run.stderr
            );
            assert!(run.stdout.is_empty(), "{when}: {args:?}: {run:?}");
        }
    };
    assert!(!socket.exists());
    check_all("no socket file");

    // A socket file left by a daemon that died: nobody listens on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a stale socket"));
    assert!(socket.exists());
    check_all("stale socket file");
}

// ---------------------------------------------------------------------------
// hold, release, delete
// ---------------------------------------------------------------------------

#[test]
fn held_message_is_not_sent_even_by_flush_until_released() {
    let server = server_deferring_first_rcpts(2);
    let daemon = Daemon::bare("adm_hold");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let (_running, ids) = deferred_messages(&daemon, &["held one", "other one"]);
    let (held, other) = (&ids[0], &ids[1]);
    wait_for_sessions_ended(&server, 1);
    assert!(server.messages().is_empty());

    let run = cli(&daemon, &["hold", held]);
    assert_eq!(run.code, 0, "{run:?}");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| state_of(q, held) == "held");
    assert_eq!(state_of(&queue, held), "held", "{queue:#?}");
    assert_eq!(state_of(&queue, other), "deferred", "{queue:#?}");
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "held") == 1);
    assert_eq!(number(&acme, "held"), 1, "{acme:#}");
    assert_eq!(number(&acme, "deferred"), 1, "{acme:#}");

    // Flush sends the other message, and the session ends without the held one.
    let run = cli(&daemon, &["flush"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(server.wait_for_messages(1, FLUSH_BOUND).len(), 1);
    wait_for_sessions_ended(&server, 2);
    assert_eq!(subjects(&server), ["other one"]);
    let queue = daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(state_of(&queue, held), "held", "{queue:#?}");

    // Released, it goes out without a flush.
    let run = cli(&daemon, &["release", held]);
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(2, FLUSH_BOUND);
    assert_eq!(got.len(), 2, "the released message was not delivered");
    assert_eq!(subject(&got[1]), "held one");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "delivered") == 2);
    assert_eq!(number(&acme, "held"), 0, "{acme:#}");
    assert_eq!(number(&acme, "delivered"), 2, "{acme:#}");
}

#[test]
fn hold_is_durable_across_a_daemon_restart() {
    let server = server_deferring_first_rcpts(1);
    let daemon = Daemon::bare("adm_hold_restart");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let (mut running, ids) = deferred_messages(&daemon, &["held across restart"]);
    let held = &ids[0];
    assert_eq!(cli(&daemon, &["hold", held]).code, 0);
    let queue = daemon.wait_for_queue(ARRIVAL, |q| state_of(q, held) == "held");
    assert_eq!(state_of(&queue, held), "held", "{queue:#?}");
    running.stop();

    // Restarted: still held, counted as held, and a flush does not send it.
    let _running = Running::start(&daemon);
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "held") == 1);
    assert_eq!(number(&acme, "held"), 1, "{acme:#}");
    assert_eq!(
        number(&acme, "deferred") + number(&acme, "queued"),
        0,
        "{acme:#}"
    );
    assert_eq!(cli(&daemon, &["flush"]).code, 0);
    daemon.submit_note("pbx@acme.test", "alice@example.com", "marker");
    assert_eq!(server.wait_for_messages(1, FLUSH_BOUND).len(), 1);
    wait_for_sessions_ended(&server, 2);
    assert_eq!(subjects(&server), ["marker"]);
    assert_eq!(state_of(&daemon.queue(), held), "held");

    assert_eq!(cli(&daemon, &["release", held]).code, 0);
    let got = server.wait_for_messages(2, FLUSH_BOUND);
    assert_eq!(got.len(), 2, "the released message was not delivered");
    assert_eq!(subject(&got[1]), "held across restart");
}

#[test]
fn status_and_queue_agree_on_a_released_message_that_was_never_tried() {
    // The tenant backs off after its relay refused the first message; a
    // second one waits untried ("queued"), is held and released.
    let dead_relay = format!("127.0.0.1:{}", closed_port());
    let daemon = Daemon::bare("adm_release_new");
    configure(
        &daemon,
        SLOW_RETRY,
        &tenant("acme", "acme.test", &dead_relay, "tls = none\n"),
    );
    let _running = Running::start(&daemon);
    let first = daemon.submit_note("pbx@acme.test", "a@example.com", "first");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| state_of(q, &first) == "deferred");
    assert_eq!(state_of(&queue, &first), "deferred", "{queue:#?}");
    let second = daemon.submit_note("pbx@acme.test", "a@example.com", "second");
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "queued") == 1);
    assert_eq!(number(&acme, "queued"), 1, "{acme:#}");
    assert_eq!(number(&acme, "deferred"), 1, "{acme:#}");
    assert_eq!(state_of(&daemon.queue(), &second), "queued");

    assert_eq!(cli(&daemon, &["hold", &second]).code, 0);
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "held") == 1);
    assert_eq!(number(&acme, "held"), 1, "{acme:#}");
    assert_eq!(cli(&daemon, &["release", &second]).code, 0);
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "held") == 0);
    let queue = daemon.queue();
    assert_eq!(state_of(&queue, &second), "queued", "{queue:#?}");
    // Each state the queue shows is counted under the same name by status.
    assert_eq!(
        (number(&acme, "queued"), number(&acme, "deferred")),
        (1, 1),
        "status after release: {acme:#} but queue: {queue:#?}"
    );
}

#[test]
fn status_shows_sending_while_a_session_is_open() {
    // The relay takes 3 s to answer the end of the body.
    let server = TestServer::start(
        ServerOptions {
            faults: vec![(".".to_string(), 1, Fault::Delay(Duration::from_secs(3)))],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("adm_sending");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    daemon.submit_note("pbx@acme.test", "a@example.com", "slow");
    assert!(server.wait_for_command("DATA", ARRIVAL));
    let acme = wait_for_tenant(&daemon, "acme", |t| str_of(t, "state") == "sending");
    assert_eq!(str_of(&acme, "state"), "sending", "{acme:#}");
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);
    let acme = wait_for_tenant(&daemon, "acme", |t| {
        str_of(t, "state") == "idle" && number(t, "delivered") == 1
    });
    assert_eq!(str_of(&acme, "state"), "idle", "{acme:#}");
}

#[test]
fn hold_and_delete_by_tenant_act_on_all_of_its_mail() {
    let server = server_deferring_first_rcpts(2);
    let daemon = Daemon::bare("adm_hold_tenant");
    // beta's relay is dead: its mail stays deferred beside acme's.
    let dead_relay = format!("127.0.0.1:{}", closed_port());
    configure(
        &daemon,
        SLOW_RETRY,
        &format!(
            "{}{}",
            plain_tenant("acme", "acme.test", &server, ""),
            tenant("beta", "beta.test", &dead_relay, "tls = none\n")
        ),
    );
    let (_running, ids) = deferred_messages(&daemon, &["first", "second"]);
    wait_for_sessions_ended(&server, 1);
    let beta_id = daemon.submit_note("pbx@beta.test", "b@example.com", "beta's");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| state_of(q, &beta_id) == "deferred");
    assert_eq!(state_of(&queue, &beta_id), "deferred", "{queue:#?}");

    let run = cli(&daemon, &["hold", "--tenant", "acme"]);
    assert_eq!(run.code, 0, "{run:?}");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| ids.iter().all(|id| state_of(q, id) == "held"));
    assert!(
        ids.iter().all(|id| state_of(&queue, id) == "held"),
        "{queue:#?}"
    );
    assert_eq!(state_of(&queue, &beta_id), "deferred", "{queue:#?}");
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "held") == 2);
    assert_eq!(number(&acme, "held"), 2, "{acme:#}");
    assert_eq!(number(&acme, "deferred"), 0, "{acme:#}");
    assert_eq!(number(&tenant_status(&status(&daemon), "beta"), "held"), 0);

    // New mail still flows, and flushing does not take the held mail along.
    daemon.submit_note("pbx@acme.test", "alice@example.com", "third");
    assert_eq!(cli(&daemon, &["flush", "--tenant", "acme"]).code, 0);
    assert_eq!(server.wait_for_messages(1, FLUSH_BOUND).len(), 1);
    wait_for_sessions_ended(&server, 2);
    assert_eq!(subjects(&server), ["third"]);

    // Deleting acme's mail leaves beta's alone.
    let run = cli(&daemon, &["delete", "--tenant", "acme"]);
    assert_eq!(run.code, 0, "{run:?}");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| q.len() == 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(state_of(&queue, &beta_id), "deferred", "{queue:#?}");
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "held") == 0);
    assert_eq!(number(&acme, "held"), 0, "{acme:#}");

    // Deleted mail never goes out; later mail does.
    assert_eq!(cli(&daemon, &["flush", "--tenant", "acme"]).code, 0);
    daemon.submit_note("pbx@acme.test", "alice@example.com", "fourth");
    assert_eq!(server.wait_for_messages(2, FLUSH_BOUND).len(), 2);
    wait_for_sessions_ended(&server, 3);
    assert_eq!(subjects(&server), ["third", "fourth"]);
}

#[test]
fn deleted_message_leaves_the_queue_and_is_never_delivered() {
    let server = server_deferring_first_rcpts(2);
    let daemon = Daemon::bare("adm_delete");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let (_running, ids) = deferred_messages(&daemon, &["doomed", "kept"]);
    let (doomed, kept) = (&ids[0], &ids[1]);
    wait_for_sessions_ended(&server, 1);

    let run = cli(&daemon, &["delete", doomed]);
    assert_eq!(run.code, 0, "{run:?}");
    let queue = daemon.wait_for_queue(ARRIVAL, |q| entry(q, doomed).is_none());
    assert!(entry(&queue, doomed).is_none(), "{queue:#?}");
    assert_eq!(state_of(&queue, kept), "deferred", "{queue:#?}");
    let acme = wait_for_tenant(&daemon, "acme", |t| number(t, "deferred") == 1);
    assert_eq!(number(&acme, "deferred"), 1, "{acme:#}");

    assert_eq!(cli(&daemon, &["flush"]).code, 0);
    assert_eq!(server.wait_for_messages(1, FLUSH_BOUND).len(), 1);
    wait_for_sessions_ended(&server, 2);
    assert_eq!(subjects(&server), ["kept"]);
    assert!(daemon.wait_for_queue(ARRIVAL, |q| q.is_empty()).is_empty());

    // Deleting it again: it is gone, so it is an unknown ID now.
    let run = cli(&daemon, &["delete", doomed]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(run.stderr.contains(doomed.as_str()), "{run:?}");
}

#[test]
fn unknown_ids_exit_65_and_ids_with_tenant_exit_64() {
    let server = server_deferring_first_rcpts(1);
    let daemon = Daemon::bare("adm_badids");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let (_running, ids) = deferred_messages(&daemon, &["only"]);
    let known = &ids[0];

    for command in ["hold", "release", "delete"] {
        for unknown in ["0000000000000000000000A", "not-an-id"] {
            let run = cli(&daemon, &[command, unknown]);
            assert_eq!(run.code, 65, "{command} {unknown}: {run:?}");
            assert!(
                run.stderr
                    .contains(&format!("no queued message with ID {unknown}")),
                "{command} {unknown}: {}",
                run.stderr
            );
        }
        let run = cli(&daemon, &[command, known, "--tenant", "acme"]);
        assert_eq!(run.code, 64, "{command} ID --tenant: {run:?}");
        let run = cli(&daemon, &[command, "--tenant", "acme", known]);
        assert_eq!(run.code, 64, "{command} --tenant ID: {run:?}");
        let run = cli(&daemon, &[command]);
        assert_eq!(run.code, 64, "{command} with nothing: {run:?}");
    }
    let run = cli(&daemon, &["flush", "--tenant", "nosuch"]);
    assert_eq!(run.code, 65, "flush of an unknown tenant: {run:?}");
    assert!(run.stderr.contains("nosuch"), "{run:?}");

    // None of that touched the message.
    let queue = daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(state_of(&queue, known), "deferred", "{queue:#?}");
}

// ---------------------------------------------------------------------------
// flush
// ---------------------------------------------------------------------------

/// Asserts the single queued message waits for a retry at least 30 minutes
/// away (retry_min = 1h), so only a flush can send it during the test.
fn assert_next_retry_is_far(daemon: &Daemon) {
    let queue = daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
    let next = parse_rfc3339(str_of(&queue[0], "next_attempt"))
        .unwrap_or_else(|| panic!("no next_attempt: {queue:#?}"));
    assert!(
        next > now_secs() + 30 * 60,
        "the next retry is not far away: {queue:#?}"
    );
}

#[test]
fn flush_ends_a_tenant_backoff_and_delivers_at_once() {
    // The relay fails once as a whole (hangs up on EHLO): the tenant backs
    // off for an hour.
    let server = TestServer::start(
        ServerOptions {
            faults: vec![("EHLO".to_string(), 1, Fault::Disconnect)],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("adm_flush_backoff");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    daemon.submit_note("pbx@acme.test", "alice@example.com", "after backoff");
    let acme = wait_for_tenant(&daemon, "acme", |t| {
        str_of(t, "state") == "backoff" && number(t, "deferred") == 1
    });
    assert_eq!(str_of(&acme, "state"), "backoff", "{acme:#}");
    assert_eq!(number(&acme, "deferred"), 1, "{acme:#}");
    assert_next_retry_is_far(&daemon);
    assert_eq!(server.connections(), 1);

    let run = cli(&daemon, &["flush"]);
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, FLUSH_BOUND);
    assert_eq!(got.len(), 1, "flush did not deliver within {FLUSH_BOUND:?}");
    assert_eq!(subject(&got[0]), "after backoff");
    let acme = wait_for_tenant(&daemon, "acme", |t| {
        number(t, "delivered") == 1 && str_of(t, "state") == "idle"
    });
    assert_eq!(str_of(&acme, "state"), "idle", "{acme:#}");
    assert_eq!(number(&acme, "deferred"), 0, "{acme:#}");
    assert!(daemon.wait_for_queue(ARRIVAL, |q| q.is_empty()).is_empty());
}

#[test]
fn flush_of_one_tenant_retries_a_deferred_message_now() {
    let server = server_deferring_first_rcpts(1);
    let daemon = Daemon::bare("adm_flush_tenant");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let (_running, _ids) = deferred_messages(&daemon, &["deferred once"]);
    assert_next_retry_is_far(&daemon);

    let run = cli(&daemon, &["flush", "--tenant", "acme"]);
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, FLUSH_BOUND);
    assert_eq!(got.len(), 1, "flush --tenant did not deliver");
    assert_eq!(subject(&got[0]), "deferred once");
    assert!(daemon.wait_for_queue(ARRIVAL, |q| q.is_empty()).is_empty());
}

#[test]
fn sendmail_q_through_a_sendmail_symlink_flushes() {
    let server = server_deferring_first_rcpts(1);
    let daemon = Daemon::bare("adm_sendmail_q");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let sendmail = personality(&daemon, "sendmail");
    let (_running, _ids) = deferred_messages(&daemon, &["queued for q"]);
    assert_next_retry_is_far(&daemon);

    let run = run_program(&sendmail, &["-q"], daemon.config_path(), b"");
    assert_eq!(run.code, 0, "sendmail -q: {run:?}");
    let got = server.wait_for_messages(1, FLUSH_BOUND);
    assert_eq!(got.len(), 1, "sendmail -q did not deliver");
    assert_eq!(subject(&got[0]), "queued for q");
}

// ---------------------------------------------------------------------------
// reload
// ---------------------------------------------------------------------------

#[test]
fn reload_command_adds_a_tenant() {
    let acme_server = TestServer::start(ServerOptions::default(), None);
    let beta_server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("adm_reload_add");
    let acme = plain_tenant("acme", "acme.test", &acme_server, "");
    configure(&daemon, SLOW_RETRY, &acme);
    let _running = Running::start(&daemon);
    assert_eq!(status(&daemon)["tenants"].as_array().map(Vec::len), Some(1));

    let beta = plain_tenant("beta", "beta.test", &beta_server, "");
    configure(&daemon, SLOW_RETRY, &format!("{acme}{beta}"));
    let run = cli(&daemon, &["reload"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("2 tenants"), "{run:?}");
    assert!(tenant_status(&status(&daemon), "beta").is_object());

    daemon.submit_note("pbx@beta.test", "b@example.com", "for beta");
    daemon.submit_note("pbx@acme.test", "a@example.com", "for acme");
    let got = beta_server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "mail for the added tenant was not delivered");
    assert_eq!(subject(&got[0]), "for beta");
    assert_eq!(acme_server.wait_for_messages(1, ARRIVAL).len(), 1);
}

/// Writes an invalid config for the daemon's file (an unknown key on a known
/// line, moving acme elsewhere if it were applied); returns that line number.
fn write_invalid_config(daemon: &Daemon, elsewhere: &TestServer) -> usize {
    let bad = format!(
        "{}\nno_such_key = 1\n",
        plain_tenant("acme", "acme.test", elsewhere, "").trim_end()
    );
    let text = config_text(daemon, SLOW_RETRY, &format!("{bad}\n"));
    let line = text
        .lines()
        .position(|l| l.starts_with("no_such_key"))
        .expect("the bad line")
        + 1;
    daemon.write_config(&text);
    line
}

#[test]
fn reload_command_with_an_invalid_config_exits_78_and_keeps_the_old_one() {
    // The request reaches the daemon (the CLI reads a valid copy that names
    // the same control socket), which refuses the invalid file.
    let server = TestServer::start(ServerOptions::default(), None);
    let elsewhere = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("adm_reload_bad");
    let good = config_text(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    daemon.write_config(&good);
    let copy = daemon.write_file("copy.ini", &good);
    let _running = Running::start(&daemon);

    let line = write_invalid_config(&daemon, &elsewhere);
    let copy_text = copy.display().to_string();
    let run = cli(&daemon, &["reload", "-c", &copy_text]);
    assert_eq!(run.code, 78, "{run:?}");
    let problem = format!("{}:{line}:", daemon.config_path().display());
    assert!(
        run.stderr.contains(&problem),
        "stderr does not list {problem}: {}",
        run.stderr
    );
    assert!(run.stderr.contains("no_such_key"), "{}", run.stderr);

    // The old configuration stays in force.
    let run = run_program(
        Path::new(PBXMAIL),
        &["sendmail", "-i", "a@example.com"],
        &copy,
        &note("pbx@acme.test", "a@example.com", "after bad reload"),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "the old config stopped delivering");
    assert_eq!(subject(&got[0]), "after bad reload");
    assert_eq!(elsewhere.connections(), 0);
    assert_eq!(
        str_of(&tenant_status(&status_with(&copy), "acme"), "relay"),
        format!("127.0.0.1:{}", server.port())
    );
}

/// `pbxmail status --json -c CONFIG`, parsed.
fn status_with(config: &Path) -> Value {
    let config = config.display().to_string();
    let run = run_program(
        Path::new(PBXMAIL),
        &["status", "--json", "-c", &config],
        Path::new(&config),
        b"",
    );
    assert_eq!(run.code, 0, "{run:?}");
    serde_json::from_str(&run.stdout).expect("status --json is JSON")
}

#[test]
fn reload_command_after_an_admin_broke_the_file_exits_78_listing_the_problem() {
    // What an admin does: edit the one config file, then `pbxmail reload`.
    // The CLI reads the same file first, finds it invalid and says so with
    // EX_CONFIG (78), as every command does; the daemon keeps the old one.
    let server = TestServer::start(ServerOptions::default(), None);
    let elsewhere = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("adm_reload_same");
    let good = config_text(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    daemon.write_config(&good);
    let copy = daemon.write_file("copy.ini", &good);
    let _running = Running::start(&daemon);

    let line = write_invalid_config(&daemon, &elsewhere);
    let run = cli(&daemon, &["reload"]);
    let problem = format!("{}:{line}:", daemon.config_path().display());
    assert!(
        run.stderr.contains(&problem),
        "stderr does not list {problem}: {}",
        run.stderr
    );
    // Old configuration in force either way.
    let run_mail = run_program(
        Path::new(PBXMAIL),
        &["sendmail", "-i", "a@example.com"],
        &copy,
        &note("pbx@acme.test", "a@example.com", "still acme"),
    );
    assert_eq!(run_mail.code, 0, "{run_mail:?}");
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);
    assert_eq!(elsewhere.connections(), 0);
    assert_eq!(run.code, 78, "reload of an invalid file: {run:?}");
}

// ---------------------------------------------------------------------------
// pbxmail test
// ---------------------------------------------------------------------------

/// Every form of the password a transcript could leak: itself, its base64
/// (AUTH LOGIN), and AUTH PLAIN's base64 of "\0user\0password".
fn secret_forms(user: &str, password: &str) -> Vec<String> {
    vec![
        password.to_string(),
        BASE64.encode(password),
        BASE64.encode(format!("\0{user}\0{password}")),
        BASE64.encode(format!("{user}\0{user}\0{password}")),
    ]
}

fn assert_no_secret(run: &Run, user: &str, password: &str) {
    for secret in secret_forms(user, password) {
        assert!(
            !run.stdout.contains(&secret) && !run.stderr.contains(&secret),
            "a form of the password ({secret}) appears in the output: {run:?}"
        );
    }
}

/// A STARTTLS relay requiring AUTH as USER/PASSWORD, with these overrides.
fn auth_server(ca: &TestCa, opts: ServerOptions) -> TestServer {
    TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            require_auth: Some((USER.to_string(), PASSWORD.to_string())),
            ..opts
        },
        Some(ca),
    )
}

/// Config with one STARTTLS + AUTH tenant for `server`; `ca_file` is
/// written unless `trust` is false.
fn configure_tls_tenant(
    daemon: &Daemon,
    ca: &TestCa,
    server: &TestServer,
    password: &str,
    trust: bool,
) {
    let ca_file = daemon.dir().join("ca.pem");
    let mut extra = format!("tls = starttls\nusername = {USER}\npassword = {password}\n");
    if trust {
        ca.write_ca_pem(&ca_file);
        extra.push_str(&format!("ca_file = {}\n", ca_file.display()));
    }
    configure(
        daemon,
        SLOW_RETRY,
        &tenant(
            "acme",
            "acme.test",
            &format!("localhost:{}", server.port()),
            &extra,
        ),
    );
}

fn run_test_command(daemon: &Daemon) -> Run {
    let config = daemon.config_path().display().to_string();
    cli(
        daemon,
        &[
            "test",
            "--tenant",
            "acme",
            "--to",
            "check@example.com",
            "-c",
            &config,
        ],
    )
}

fn has_line(run: &Run, prefix: &str) -> bool {
    run.stdout.lines().any(|l| l.starts_with(prefix))
}

/// The advice line of a failed `pbxmail test`, asserting FAILED: comes too.
fn advice(run: &Run) -> String {
    assert_eq!(run.code, 69, "{run:?}");
    assert!(has_line(run, "FAILED: "), "no FAILED: line: {run:?}");
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("What to do: "))
        .unwrap_or_else(|| panic!("no 'What to do:' line: {run:?}"))
        .to_string()
}

#[test]
fn test_command_over_starttls_with_auth_plain_redacts_and_delivers() {
    let ca = TestCa::new();
    let server = auth_server(&ca, ServerOptions::default());
    let daemon = Daemon::bare("adm_test_ok");
    configure_tls_tenant(&daemon, &ca, &server, PASSWORD, true);

    let run = run_test_command(&daemon);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(has_line(&run, "C: STARTTLS"), "{}", run.stdout);
    assert!(has_line(&run, "-- TLS established"), "{}", run.stdout);
    assert!(
        run.stdout
            .lines()
            .any(|l| l == "C: AUTH PLAIN <credentials redacted>"),
        "{}",
        run.stdout
    );
    assert!(has_line(&run, "S: 235"), "{}", run.stdout);
    assert!(has_line(&run, "OK:"), "{}", run.stdout);
    assert!(!has_line(&run, "FAILED:"), "{}", run.stdout);
    assert_no_secret(&run, USER, PASSWORD);

    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "the relay did not receive the test message");
    assert_eq!(got[0].rcpt_to, ["check@example.com"]);
    assert!(got[0].tls);
    assert_eq!(got[0].auth_user.as_deref(), Some(USER));
}

#[test]
fn test_command_with_auth_login_redacts_both_steps() {
    let ca = TestCa::new();
    let server = auth_server(
        &ca,
        ServerOptions {
            auth_mechanisms: vec!["LOGIN".to_string()],
            ..ServerOptions::default()
        },
    );
    let daemon = Daemon::bare("adm_test_login");
    configure_tls_tenant(&daemon, &ca, &server, PASSWORD, true);

    let run = run_test_command(&daemon);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.lines().any(|l| l == "C: AUTH LOGIN"),
        "{}",
        run.stdout
    );
    let redacted = run
        .stdout
        .lines()
        .filter(|l| *l == "C: <credentials redacted>")
        .count();
    assert_eq!(redacted, 2, "user and password steps: {}", run.stdout);
    assert!(!run.stdout.contains(&BASE64.encode(USER)), "{}", run.stdout);
    assert_no_secret(&run, USER, PASSWORD);
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);
}

#[test]
fn test_command_with_a_wrong_password_fails_with_advice_and_no_secret() {
    let ca = TestCa::new();
    let server = auth_server(&ca, ServerOptions::default());
    let daemon = Daemon::bare("adm_test_badpw");
    let wrong = "Wrong-pw-4411";
    configure_tls_tenant(&daemon, &ca, &server, wrong, true);

    let run = run_test_command(&daemon);
    let what = advice(&run);
    assert!(what.contains("password"), "{what}");
    assert!(has_line(&run, "S: 535"), "{}", run.stdout);
    assert_no_secret(&run, USER, wrong);
    assert!(server.messages().is_empty());
    assert_eq!(count_commands(&server, "MAIL"), 0);
}

#[test]
fn test_command_on_microsoft_365_basic_auth_refusal_advises_about_it() {
    let ca = TestCa::new();
    let refusal = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.";
    let server = auth_server(
        &ca,
        ServerOptions {
            faults: vec![("AUTH".to_string(), 1, Fault::Reply(refusal.to_string()))],
            ..ServerOptions::default()
        },
    );
    let daemon = Daemon::bare("adm_test_m365");
    configure_tls_tenant(&daemon, &ca, &server, PASSWORD, true);

    let run = run_test_command(&daemon);
    let what = advice(&run);
    assert!(what.contains("Microsoft 365"), "{what}");
    assert_no_secret(&run, USER, PASSWORD);
    assert!(server.messages().is_empty());
}

#[test]
fn test_command_on_must_issue_starttls_advises_tls_starttls() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![(
                "MAIL".to_string(),
                1,
                Fault::Reply("530 5.7.0 Must issue a STARTTLS command first".to_string()),
            )],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("adm_test_530");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let run = run_test_command(&daemon);
    let what = advice(&run);
    assert!(what.contains("tls = starttls"), "{what}");
    assert!(server.messages().is_empty());
}

#[test]
fn test_command_on_a_closed_port_fails_with_advice() {
    let daemon = Daemon::bare("adm_test_closed");
    configure(
        &daemon,
        SLOW_RETRY,
        &tenant(
            "acme",
            "acme.test",
            &format!("127.0.0.1:{}", closed_port()),
            "tls = none\nconnect_timeout = 3s\n",
        ),
    );
    let run = run_test_command(&daemon);
    let what = advice(&run);
    assert!(what.contains("relay"), "{what}");
}

#[test]
fn test_command_with_an_untrusted_certificate_advises_ca_file() {
    let ca = TestCa::new();
    let server = auth_server(&ca, ServerOptions::default());
    let daemon = Daemon::bare("adm_test_untrusted");
    configure_tls_tenant(&daemon, &ca, &server, PASSWORD, false);

    let run = run_test_command(&daemon);
    let what = advice(&run);
    assert!(what.contains("ca_file"), "{what}");
    assert!(
        !has_line(&run, "C: AUTH"),
        "AUTH after a failed handshake: {}",
        run.stdout
    );
    assert_no_secret(&run, USER, PASSWORD);
    assert_eq!(count_commands(&server, "AUTH"), 0);
    assert!(server.messages().is_empty());
}

// ---------------------------------------------------------------------------
// mailq and sendmail personalities
// ---------------------------------------------------------------------------

#[test]
fn mailq_and_sendmail_symlinks_list_and_submit() {
    let server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare("adm_personality");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let sendmail = personality(&daemon, "sendmail");
    let mailq = personality(&daemon, "mailq");
    let config = daemon.config_path().to_path_buf();

    // Submitted through the `sendmail` name, daemon stopped.
    let run = run_program(
        &sendmail,
        &["-v", "-i", "voicemail@example.com"],
        &config,
        &note("pbx@acme.test", "voicemail@example.com", "via symlink"),
    );
    assert_eq!(run.code, 0, "sendmail symlink: {run:?}");
    let id = queued_id(&run.stderr);
    let queue = daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "id"), id);

    let listed = run_program(&mailq, &[], &config, b"");
    assert_eq!(listed.code, 0, "mailq: {listed:?}");
    assert!(
        listed.stdout.contains(&id),
        "mailq does not list {id}: {listed:?}"
    );
    assert!(
        listed.stdout.contains("voicemail@example.com"),
        "{listed:?}"
    );

    let bp = cli(&daemon, &["sendmail", "-bp"]);
    assert_eq!(bp.code, 0, "sendmail -bp: {bp:?}");
    assert_eq!(bp.stdout, listed.stdout, "sendmail -bp differs from mailq");
    let link_bp = run_program(&sendmail, &["-bp"], &config, b"");
    assert_eq!(link_bp.code, 0, "{link_bp:?}");
    assert_eq!(link_bp.stdout, listed.stdout);

    // And what it queued is delivered once the daemon runs.
    let _running = Running::start(&daemon);
    let got = server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(subject(&got[0]), "via symlink");
    assert_eq!(got[0].rcpt_to, ["voicemail@example.com"]);
    assert!(daemon.wait_for_queue(ARRIVAL, |q| q.is_empty()).is_empty());
    let empty = run_program(&mailq, &[], &config, b"");
    assert_eq!(empty.code, 0);
    assert!(!empty.stdout.contains(&id), "{empty:?}");
}

// ---------------------------------------------------------------------------
// Delivery log line format
// ---------------------------------------------------------------------------

/// Checks `ID tenant=acme to=<TO> relay=127.0.0.1[127.0.0.1]:PORT delay=N.Ns
/// status=sent (250 ...)` by hand (no regex crate): Err says what is wrong.
fn check_delivery_line(rest: &str, id: &str, to: &str, port: u16) -> Result<(), String> {
    let (got_id, rest) = rest.split_once(' ').ok_or("no space after the ID")?;
    if got_id.is_empty()
        || !got_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return Err(format!("ID {got_id:?} is not upper-case hex"));
    }
    if got_id != id {
        return Err(format!("ID {got_id} is not the submitted {id}"));
    }
    let head = format!("tenant=acme to=<{to}> relay=127.0.0.1[127.0.0.1]:{port} delay=");
    let rest = rest
        .strip_prefix(&head)
        .ok_or(format!("does not continue with {head:?}"))?;
    let (delay, rest) = rest.split_once("s ").ok_or("no 's ' after the delay")?;
    if delay.is_empty()
        || !delay.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || !delay.bytes().next().is_some_and(|b| b.is_ascii_digit())
    {
        return Err(format!("delay {delay:?} is not [0-9.]+"));
    }
    let reply = rest
        .strip_prefix("status=sent (250 ")
        .ok_or("no 'status=sent (250 ' after the delay")?;
    if !reply.ends_with(')') || reply.len() < 2 {
        return Err("does not end with the reply in parentheses".into());
    }
    Ok(())
}

/// Delivers one message with the daemon's environment extended by `env` and
/// returns (the delivery log line, its ID, the relay port).
/// Where the daemon's stderr goes, as JOURNAL_STREAM describes it.
enum Journal {
    Absent,
    /// `device:inode` of the daemon's stderr, as systemd sets it.
    IsStderr,
    /// Inherited from a parent whose stderr was the journal; ours is a file.
    Elsewhere,
}

fn delivery_log_line(test: &str, journal: Journal) -> (String, String, u16) {
    use std::os::unix::fs::MetadataExt;
    let server = TestServer::start(ServerOptions::default(), None);
    let daemon = Daemon::bare(test);
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    // The daemon's stderr is this file (Running appends to it).
    let log = daemon.write_file("daemon.log", "");
    let meta = std::fs::metadata(&log).expect("stat daemon.log");
    let stream = match journal {
        Journal::Absent => None,
        Journal::IsStderr => Some(format!("{}:{}", meta.dev(), meta.ino())),
        Journal::Elsewhere => Some(format!("{}:{}", meta.dev(), meta.ino() + 1)),
    };
    let env: Vec<(&str, &str)> = stream
        .as_deref()
        .map(|value| ("JOURNAL_STREAM", value))
        .into_iter()
        .collect();
    let _running = Running::start_with_env(&daemon, &env);
    let id = daemon.submit_note("pbx@acme.test", "log@example.com", "logged");
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);
    let mut line = None;
    let logged = wait_until(ARRIVAL, || {
        line = daemon
            .log()
            .lines()
            .find(|l| l.contains(&id) && l.contains(" status="))
            .map(str::to_string);
        line.is_some()
    });
    assert!(logged, "no delivery line for {id}:\n{}", daemon.log());
    (line.unwrap_or_default(), id, server.port())
}

#[test]
fn under_journald_the_delivery_line_starts_with_the_level() {
    let (line, id, port) = delivery_log_line("adm_log_journal", Journal::IsStderr);
    let rest = line
        .strip_prefix("INFO: ")
        .unwrap_or_else(|| panic!("does not start with 'INFO: ': {line:?}"));
    if let Err(why) = check_delivery_line(rest, &id, "log@example.com", port) {
        panic!("{why}: {line:?}");
    }
}

#[test]
fn without_journald_the_delivery_line_starts_with_a_utc_timestamp() {
    for (test, journal) in [
        ("adm_log_stamp", Journal::Absent),
        ("adm_log_inherited", Journal::Elsewhere),
    ] {
        timestamped_delivery_line(test, journal);
    }
}

fn timestamped_delivery_line(test: &str, journal: Journal) {
    let (line, id, port) = delivery_log_line(test, journal);
    let (stamp, rest) = line
        .split_once(' ')
        .unwrap_or_else(|| panic!("no timestamp: {line:?}"));
    let at = parse_rfc3339(stamp).unwrap_or_else(|| panic!("not an RFC 3339 UTC stamp: {line:?}"));
    assert!(at.abs_diff(now_secs()) < 300, "{line:?}");
    let rest = rest
        .strip_prefix("INFO: ")
        .unwrap_or_else(|| panic!("no 'INFO: ' after the stamp: {line:?}"));
    if let Err(why) = check_delivery_line(rest, &id, "log@example.com", port) {
        panic!("{why}: {line:?}");
    }
}

// ---------------------------------------------------------------------------
// Admin commands answer once durable (issue 14 item 18).
// ---------------------------------------------------------------------------

/// A relay that takes 3 s to answer the first message's final dot, so its
/// tenant is in the middle of a session when the admin acts.
fn slow_dot_server() -> TestServer {
    TestServer::start(
        ServerOptions {
            faults: vec![(".".to_string(), 1, Fault::Delay(Duration::from_secs(3)))],
            ..ServerOptions::default()
        },
        None,
    )
}

#[test]
fn hold_during_a_slow_session_is_on_disk_when_it_exits_0_and_survives_kill_9() {
    let server = slow_dot_server();
    let daemon = Daemon::bare("adm_hold_kill9");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let mut running = Running::start(&daemon);
    daemon.submit_note("pbx@acme.test", "a@example.com", "slow one");
    assert!(server.wait_for_command("DATA", ARRIVAL));
    // Queued while the tenant's thread waits on the relay: it would ride
    // this session once the slow message is answered.
    let held = daemon.submit_note("pbx@acme.test", "a@example.com", "held one");

    let run = cli(&daemon, &["hold", &held]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.lines().any(|l| l == format!("{held}: held")),
        "{}",
        run.stdout
    );
    // The answer came after the effect: nothing may be lost now.
    running.kill9();
    let sessions_before = count_commands(&server, "QUIT");
    assert!(
        !subjects(&server).iter().any(|s| s == "held one"),
        "{:?}",
        subjects(&server)
    );

    let _running = Running::after_kill(&daemon);
    let queue = daemon.queue();
    assert_eq!(state_of(&queue, &held), "held", "{queue:#?}");
    // A later message goes out; the held one does not go with it.
    daemon.submit_note("pbx@acme.test", "alice@example.com", "marker");
    assert!(wait_until(ARRIVAL, || subjects(&server)
        .iter()
        .any(|s| s == "marker")));
    wait_for_sessions_ended(&server, sessions_before + 1);
    assert!(
        !subjects(&server).iter().any(|s| s == "held one"),
        "{:?}",
        subjects(&server)
    );
    let queue = daemon.queue();
    assert_eq!(state_of(&queue, &held), "held", "{queue:#?}");
}

#[test]
fn hold_of_the_message_being_sent_says_so_and_what_became_of_it() {
    let server = slow_dot_server();
    let daemon = Daemon::bare("adm_hold_sending");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start(&daemon);
    let sending = daemon.submit_note("pbx@acme.test", "a@example.com", "in flight");
    assert!(server.wait_for_command("DATA", ARRIVAL));
    wait_for_tenant(&daemon, "acme", |t| str_of(t, "state") == "sending");

    let run = cli(&daemon, &["hold", &sending]);
    // The relay took it (250 after the delay): it was sent, not held.
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with(&format!("{sending}: was being sent"))),
        "{}",
        run.stdout
    );
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);
    assert!(daemon.wait_for_queue(ARRIVAL, |q| q.is_empty()).is_empty());
}

#[test]
fn test_command_escapes_control_characters_in_relay_replies() {
    // ESC sequences and a bare CR that would draw a fake line on a terminal.
    let hostile = "250 2.0.0 \u{1b}[2K\rOK: forged \u{1b}[32mgreen";
    let server = TestServer::start(
        ServerOptions {
            data_reply: Some(hostile.to_string()),
            greeting: Some("220 relay \u{1b}]0;title\u{7} ready".to_string()),
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("adm_test_escape");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let run = run_test_command(&daemon);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stdout.contains('\u{1b}'), "{:?}", run.stdout);
    assert!(!run.stdout.contains('\r'), "{:?}", run.stdout);
    assert!(!run.stdout.contains('\u{7}'), "{:?}", run.stdout);
    assert!(
        run.stdout.contains("\\x1b[2K\\rOK: forged \\x1b[32mgreen"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("\\x1b]0;title\\x07"), "{}", run.stdout);
}

#[test]
fn hold_on_a_tenant_stuck_in_a_session_past_the_bound_exits_75_and_still_takes_effect() {
    // The relay stalls the first message's final dot far longer than the
    // daemon waits for its tenant (shortened to 300 ms in this test build).
    let server = TestServer::start(
        ServerOptions {
            faults: vec![(".".to_string(), 1, Fault::Delay(Duration::from_secs(4)))],
            ..ServerOptions::default()
        },
        None,
    );
    let daemon = Daemon::bare("adm_hold_pending");
    configure(
        &daemon,
        SLOW_RETRY,
        &plain_tenant("acme", "acme.test", &server, ""),
    );
    let _running = Running::start_with_env(&daemon, &[("PBXMAIL_DEBUG_ADMIN_WAIT_MS", "300")]);
    daemon.submit_note("pbx@acme.test", "a@example.com", "stalled");
    assert!(server.wait_for_command("DATA", ARRIVAL));
    let held = daemon.submit_note("pbx@acme.test", "a@example.com", "held later");

    let run = cli(&daemon, &["hold", &held]);
    assert_eq!(run.code, 75, "{run:?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l == format!("{held}: queued, not yet recorded")),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("not yet recorded"), "{run:?}");
    // Queued, not lost: once the stalled message is answered the hold is
    // applied before the next message, so it never reaches the relay.
    let queue = daemon.wait_for_queue(ARRIVAL, |q| state_of(q, &held) == "held");
    assert_eq!(state_of(&queue, &held), "held", "{queue:#?}");
    wait_for_sessions_ended(&server, 1);
    assert_eq!(subjects(&server), ["stalled"]);
}
