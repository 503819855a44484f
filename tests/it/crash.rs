//! Crash tests: the daemon and `sendmail` are killed with SIGKILL at random
//! moments and restarted, against a test SMTP server that records what
//! arrived. An accepted message (sendmail exited 0) must arrive complete at
//! least once; a duplicate may only come from the window between the relay's
//! final 250 and the spool record of it; a submission killed before it
//! finished must never be delivered, not even in part. Besides the random
//! kills, a few are aimed, so that each phase is hit on every run: while a
//! `sendmail` is writing, mid-DATA, and between the relay's final 250 and
//! the spool record of it. Two more tests put the spool in states a crash
//! at an exact moment leaves and check recovery.
//!
//! Random choices come from a seeded PRNG; the seed is printed, and
//! `PBXMAIL_CRASH_SEED=N` repeats a run.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::harness::{files_under, framed, wait_until, Daemon, Running, PBXMAIL};
use crate::support::rng::Rng;
use crate::support::smtp_server::{Fault, Received, ServerOptions, TestServer};

const SENDER: &str = "pbx@acme.test";
const RCPT: &str = "sink@example.com";
const MESSAGES_PER_SESSION: usize = 5;
/// Daemon kills at random moments per run of the first test (the issue asks
/// for at least 50); the aimed ones come on top.
const KILLS: usize = 60;
/// Aimed kills between the relay's final 250 and the spool record.
const AIMED_AFTER_250: usize = 2;
/// How long the relay holds its 354 for the aimed mid-DATA kill.
const HELD_DATA: Duration = Duration::from_secs(5);
/// How long the relay holds its final reply for an aimed after-250 kill:
/// time for the test to stop the daemon before the reply is written.
const HELD_REPLY: Duration = Duration::from_secs(3);
/// Longest wait for an aimed kill's moment to come (a daemon start and a
/// message of up to ~480 KB on the wire).
const AIM: Duration = Duration::from_secs(20);
/// Longest wait for the queue to drain once the daemon runs undisturbed.
const DRAIN: Duration = Duration::from_secs(60);
/// Longest wait for a daemon to create its pickup socket.
const READY: Duration = Duration::from_secs(10);

/// Daemon config: one tenant relaying to `server`, short retries and timeouts.
fn configure(d: &Daemon, server: &TestServer) {
    d.configure_with(
        "retry_max = 2s\nlog_level = info",
        &format!(
            "[tenant:acme]\n\
         domains = acme.test\n\
         relay = 127.0.0.1:{}\n\
         tls = none\n\
         messages_per_session = {MESSAGES_PER_SESSION}\n\
         connect_timeout = 5s\n\
         command_timeout = 10s\n\
         data_timeout = 10s\n",
            server.port()
        ),
    );
}

/// A body of `lines` lines of 80 octets (CRLF included), each naming its
/// message and line number, so a missing, repeated or foreign piece shows.
fn body(tag: &str, lines: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines * 80);
    for i in 0..lines {
        let start = out.len();
        out.extend_from_slice(format!("{tag} {i:08} ").as_bytes());
        let filled = out.len() - start;
        out.extend((filled..78).map(|j| b'a' + ((i + j) % 26) as u8));
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The header block (with its empty line) of the message `<tag@test>`.
fn header_block(tag: &str, body_len: usize) -> Vec<u8> {
    format!(
        "From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {tag}\r\n\
         Message-ID: <{tag}@test>\r\nX-Body-Len: {body_len}\r\n\r\n"
    )
    .into_bytes()
}

fn message(tag: &str, lines: usize) -> Vec<u8> {
    let body = body(tag, lines);
    let mut msg = header_block(tag, body.len());
    msg.extend_from_slice(&body);
    msg
}

/// Splits a received message into the tag of its Message-ID and its body.
fn parse(m: &Received) -> Option<(String, &[u8])> {
    let end = m.data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let headers = String::from_utf8_lossy(m.data.get(..end)?);
    let id = headers.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("Message-ID")
            .then(|| value.trim())
    })?;
    let tag = id.strip_prefix('<')?.strip_suffix("@test>")?;
    Some((tag.to_string(), m.data.get(end + 4..)?))
}

/// Submits with `-i`; returns the exit code and stderr.
fn submit(d: &Daemon, msg: &[u8]) -> (i32, String) {
    let run = d.sendmail(&["-i", "-f", SENDER, RCPT], msg);
    (run.code, run.stderr)
}

/// SIGKILL (what `Child::kill` sends on Unix) to a `sendmail` and reap;
/// returns the status.
fn kill9(child: &mut Child) -> ExitStatus {
    let _ = child.kill();
    child.wait().expect("wait for killed child")
}

/// Starts the daemon through the harness after a SIGKILL left its socket.
fn restart(d: &mut Daemon) {
    let _ = fs::remove_file(d.spool_dir().join("pickup.sock"));
    d.start();
}

/// Asserts that nothing is left in tmp/, queue/ or quarantine/.
fn assert_spool_empty(d: &Daemon) {
    for sub in ["tmp", "queue", "quarantine"] {
        let left = files_under(&d.spool_dir().join(sub));
        assert!(left.is_empty(), "left in the spool's {sub}/: {left:#?}");
    }
}

/// The one queued entry's envelope file (the daemon is not running).
fn only_envelope(d: &Daemon) -> PathBuf {
    let envs: Vec<PathBuf> = files_under(&d.spool_dir().join("queue"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "env"))
        .collect();
    assert_eq!(envs.len(), 1, "{envs:#?}");
    envs.into_iter().next().expect("one envelope")
}

fn append(path: &Path, bytes: &[u8]) {
    let mut file = File::options()
        .append(true)
        .open(path)
        .expect("open envelope");
    file.write_all(bytes).expect("append to envelope");
    file.sync_all().expect("fsync envelope");
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Body lines of crash message `n`: mostly small, every tenth ~480 KB and two
/// in ten ~96 KB, so some kills land while a body is on the wire.
fn crash_lines(n: usize) -> usize {
    match n % 10 {
        0 => 6000,
        1 | 2 => 1200,
        _ => 1 + n * 7 % 50,
    }
}

fn crash_tag(n: usize) -> String {
    format!("crash-{n}")
}

/// Where a kill found the daemon's last SMTP connection, and whether a
/// `sendmail` was writing its message at that moment.
#[derive(Default, Debug)]
struct KillPhases {
    /// A `sendmail` was writing its message (counted apart from the rest).
    submitting: usize,
    no_connection: usize,
    between_sessions: usize,
    before_data: usize,
    mid_data: usize,
    /// The relay had taken the connection's last message and the daemon had
    /// recorded it: it was not sent again.
    after_250_recorded: usize,
    /// The relay had taken the connection's last message and the daemon had
    /// not recorded it yet: it was sent again (the duplicate window).
    after_250_unrecorded: usize,
}

impl KillPhases {
    /// Classifies the kill of the daemon that opened connections `conns`;
    /// `resent` holds the connections whose last message was sent again.
    fn note(
        &mut self,
        conns: std::ops::Range<usize>,
        cmds: &[(usize, String)],
        msgs: &[Received],
        resent: &BTreeSet<usize>,
    ) {
        let Some(last) = conns.clone().last() else {
            self.no_connection += 1;
            return;
        };
        let on_last = |verb: &str| {
            cmds.iter()
                .filter(|(c, line)| *c == last && line.eq_ignore_ascii_case(verb))
                .count()
        };
        let received = msgs.iter().filter(|m| m.connection == last).count();
        if on_last("QUIT") > 0 {
            self.between_sessions += 1;
        } else if on_last("DATA") > received {
            self.mid_data += 1;
        } else if resent.contains(&last) {
            self.after_250_unrecorded += 1;
        } else if received > 0 {
            self.after_250_recorded += 1;
        } else {
            self.before_data += 1;
        }
    }
}

/// SIGKILL, asserting that the daemon was still there to be killed.
fn kill_daemon(daemon: &mut Running) {
    let status = daemon.kill9();
    assert_eq!(
        status.signal(),
        Some(9),
        "the daemon ended before it was killed ({status})"
    );
}

#[test]
fn daemon_killed_at_random_moments_loses_nothing() {
    let started = Instant::now();
    let mut rng = Rng::from_env("daemon_killed_at_random_moments_loses_nothing");
    // The aimed kills come first, so the relay's counts of DATA and "."
    // are known: it holds the first 354 and the first final replies.
    let mut faults = vec![("DATA".to_string(), 1, Fault::Delay(HELD_DATA))];
    for n in 1..=AIMED_AFTER_250 {
        faults.push((".".to_string(), n, Fault::Delay(HELD_REPLY)));
    }
    // Some later DATA commands are held 20-100 ms before the 354, widening
    // the mid-DATA window. (A random delay on "." is not used: the server
    // records the message after the delay even if the daemon was killed.)
    for n in 2..=2000 {
        if rng.below(4) == 0 {
            let delay = Duration::from_millis(20 + rng.below(81));
            faults.push(("DATA".to_string(), n, Fault::Delay(delay)));
        }
    }
    let server = TestServer::start(
        ServerOptions {
            faults,
            ..ServerOptions::default()
        },
        None,
    );
    let mut d = Daemon::bare("crash_daemon");
    configure(&d, &server);

    let mut next = 0usize;
    let mut accepted = BTreeSet::new();
    let mut refused = Vec::new();
    // Server connection count when each killed daemon started.
    let mut first_conn = Vec::with_capacity(KILLS + 2 + AIMED_AFTER_250);
    let mut killed_while_submitting = 0;

    // Aimed 1: killed while a `sendmail` is writing its message. The next
    // daemon (aimed 2's) starts while it still writes: its start-up
    // recovery must leave the open submission alone.
    first_conn.push(server.connections());
    let mut daemon = Running::after_kill(&d);
    let n = next;
    next += 1;
    let msg = message(&crash_tag(n), crash_lines(n));
    let tmp = d.spool_dir().join("tmp");
    let mut sendmail = Command::new(PBXMAIL)
        .args(["sendmail", "-i", "-f", SENDER, RCPT])
        .env("PBXMAIL_CONFIG", d.config_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pbxmail sendmail");
    let mut input = sendmail.stdin.take().expect("stdin pipe");
    let half = msg.len() / 2;
    input
        .write_all(&msg[..half])
        .expect("sendmail reads its input");
    let mut writing = None;
    wait_until(READY, || {
        writing = files_under(&tmp)
            .into_iter()
            .find(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0));
        writing.is_some()
    });
    let writing = writing.expect("sendmail wrote nothing to tmp/");
    kill_daemon(&mut daemon);
    killed_while_submitting += 1;
    first_conn.push(server.connections());
    let mut daemon = Running::after_kill(&d);
    assert!(
        writing.exists(),
        "start-up recovery removed {} while sendmail was writing it",
        writing.display()
    );
    input
        .write_all(&msg[half..])
        .expect("sendmail reads its input");
    drop(input);
    let out = sendmail.wait_with_output().expect("wait for sendmail");
    assert!(
        out.status.success(),
        "sendmail of {} across a daemon restart: {}",
        crash_tag(n),
        String::from_utf8_lossy(&out.stderr)
    );
    accepted.insert(n);

    // Aimed 2: the relay holds its first 354; the daemon is killed with
    // DATA sent, waiting for it.
    assert_eq!(
        server.wait_for_verb("DATA", 1, AIM),
        1,
        "the submitted message was not sent; queue: {:#?}",
        d.queue()
    );
    kill_daemon(&mut daemon);

    // Aimed 3: the relay has the whole message and holds its final reply;
    // the daemon is stopped meanwhile, so the 250 is written but never
    // read, then killed: the relay took the message, the spool does not
    // say so. The message must be sent again.
    let mut aimed_after_250 = Vec::new();
    for k in 1..=AIMED_AFTER_250 {
        first_conn.push(server.connections());
        let mut daemon = Running::after_kill(&d);
        // The message killed mid-DATA (or at the last aimed kill) is
        // still owed, so the restarted daemon sends it.
        assert_eq!(
            server.wait_for_verb(".", k, AIM),
            k,
            "the message owed since the last kill was not sent again; queue: {:#?}",
            d.queue()
        );
        let before = server.messages().len();
        daemon.freeze();
        assert_eq!(
            server.messages().len(),
            before,
            "the relay answered before the daemon was stopped; widen HELD_REPLY"
        );
        let got = server.wait_for_messages(before + 1, HELD_REPLY + READY);
        let Some(taken) = got.get(before) else {
            panic!("the relay did not take the held message");
        };
        aimed_after_250.push(taken.connection);
        kill_daemon(&mut daemon);
    }

    let mut take = |results: Vec<(usize, (i32, String))>| {
        for (n, (code, stderr)) in results {
            if code == 0 {
                accepted.insert(n);
            } else {
                refused.push((n, code, stderr));
            }
        }
    };
    for _ in 0..KILLS {
        // Now and then mail comes in while no daemon runs.
        if rng.below(4) == 0 {
            take(vec![(
                next,
                submit(&d, &message(&crash_tag(next), crash_lines(next))),
            )]);
            next += 1;
        }
        first_conn.push(server.connections());
        let mut daemon = Running::after_kill(&d);
        let batch: Vec<usize> = (next..next + 1 + rng.below(6) as usize).collect();
        next += batch.len();
        let delay = Duration::from_millis(rng.below(151));
        let in_flight = AtomicUsize::new(0);
        let results = thread::scope(|s| {
            // Submissions go on while the daemon starts, runs and dies.
            let submitter = s.spawn(|| {
                batch
                    .iter()
                    .map(|&n| {
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let result = submit(&d, &message(&crash_tag(n), crash_lines(n)));
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        (n, result)
                    })
                    .collect::<Vec<_>>()
            });
            thread::sleep(delay);
            if in_flight.load(Ordering::SeqCst) > 0 {
                killed_while_submitting += 1;
            }
            kill_daemon(&mut daemon);
            submitter.join().expect("submitter thread")
        });
        take(results);
    }
    let killed_conns = server.connections();
    first_conn.push(killed_conns);

    // Undisturbed at last: start-up recovery, then everything goes out.
    // Waits until no queued entry has a recipient left to send (an entry
    // whose recipients are all sent but that stays queued is checked below).
    restart(&mut d);
    d.wait_for_queue(DRAIN, |q| {
        q.iter().all(|e| e["recipients"] == serde_json::json!([]))
    });
    let status = d.stop();
    assert!(status.success(), "daemon stop: {status}");
    // Read again once stopped: an entry just recorded as sent may have been
    // on its way out when the queue was last looked at.
    let left = d.queue();
    assert!(
        refused.is_empty(),
        "sendmail refused submissions (the daemon's start-up recovery may have removed a live one): {refused:#?}"
    );

    let msgs = server.messages();
    let cmds = server.commands();
    let mut copies: BTreeMap<usize, Vec<usize>> = BTreeMap::new(); // n -> connections
    for m in &msgs {
        let Some((tag, got)) = parse(m) else {
            panic!(
                "a message without a crash Message-ID arrived: {:?}",
                m.text()
            );
        };
        let n: usize = tag
            .strip_prefix("crash-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unknown Message-ID tag {tag:?}"));
        assert!(
            accepted.contains(&n),
            "{tag} arrived but was never accepted"
        );
        let want = body(&tag, crash_lines(n));
        assert!(
            got == want.as_slice(),
            "{tag} arrived damaged: {} octets, {} expected",
            got.len(),
            want.len()
        );
        copies.entry(n).or_default().push(m.connection);
    }
    let lost: Vec<String> = accepted
        .iter()
        .filter(|n| !copies.contains_key(n))
        .map(|&n| crash_tag(n))
        .collect();

    // A message is sent again only if the daemon died after the relay took it
    // and before the result was on disk. The daemon records each message's
    // result right after its transaction and before the next MAIL or QUIT, so
    // an earlier copy must be the last message on a connection that was cut
    // (no QUIT) and that a killed daemon opened. One session is in progress
    // at a kill, so each kill causes at most one duplicate: the bound is
    // the number of kills, tighter than kills × messages_per_session.
    let kills = first_conn.len() - 1;
    let mut duplicates = Vec::new();
    let mut cut_conns = BTreeSet::new();
    for (&n, conns) in &copies {
        for &conn in conns.iter().take(conns.len() - 1) {
            let last_on_conn = msgs.iter().rev().find(|m| m.connection == conn);
            let quit = cmds
                .iter()
                .any(|(c, line)| *c == conn && line.eq_ignore_ascii_case("QUIT"));
            let tag = crash_tag(n);
            assert!(
                last_on_conn.and_then(parse).is_some_and(|(t, _)| t == tag),
                "{tag} was sent again although later mail followed it on connection {conn}, \
                 so its result must have been recorded"
            );
            assert!(
                !quit,
                "{tag} was sent again although its session on connection {conn} ended with QUIT"
            );
            assert!(
                conn < killed_conns,
                "{tag} was duplicated on connection {conn} of the undisturbed daemon"
            );
            assert!(
                cut_conns.insert(conn),
                "two duplicates from connection {conn}"
            );
            duplicates.push(format!("{tag} (first on connection {conn})"));
        }
    }

    let mut phases = KillPhases {
        submitting: killed_while_submitting,
        ..KillPhases::default()
    };
    for pair in first_conn.windows(2) {
        phases.note(pair[0]..pair[1], &cmds, &msgs, &cut_conns);
    }
    eprintln!(
        "crash: {kills} kills, {} accepted, {} delivered, {} duplicates, {} lost in {:.1?}",
        accepted.len(),
        copies.len(),
        duplicates.len(),
        lost.len(),
        started.elapsed()
    );
    eprintln!("crash: where the kills found the daemon's last connection: {phases:?}");
    if !duplicates.is_empty() {
        eprintln!("crash: duplicates: {duplicates:?}");
    }
    assert!(
        lost.is_empty(),
        "accepted but never delivered: {lost:?}; queue: {left:#?}"
    );
    assert!(duplicates.len() <= kills, "{duplicates:?}");
    // Every phase was hit, whatever the random kills did.
    assert!(phases.submitting >= 1, "{phases:?}");
    assert!(phases.mid_data >= 1, "{phases:?}");
    assert!(phases.after_250_unrecorded >= AIMED_AFTER_250, "{phases:?}");
    for conn in aimed_after_250 {
        assert!(
            cut_conns.contains(&conn),
            "the message the relay took on connection {conn} just before the kill was not \
             sent again: the daemon recorded it as sent before it had the relay's reply"
        );
    }
    // A crash after the last result was recorded and before the files were
    // removed must not leave the entry queued for ever.
    assert!(
        left.is_empty(),
        "{} entries stay queued although every recipient was sent: {left:#?}",
        left.len()
    );
    assert_spool_empty(&d);
}

/// How far a killed `sendmail` got.
enum Cut {
    /// This many octets of the message written, stdin left open.
    Open(usize),
    /// Everything written and stdin closed; killed this long after.
    AfterClose(Duration),
}

#[test]
fn sendmail_killed_mid_write_never_delivers_a_partial_message() {
    let started = Instant::now();
    let server = TestServer::start(ServerOptions::default(), None);
    let mut d = Daemon::bare("crash_sendmail");
    configure(&d, &server);
    d.start();
    let tmp = d.spool_dir().join("tmp");

    // 10 MB bodies for the kills while writing.
    const BIG: usize = 131_072;
    let header_len = header_block("killed-0", BIG * 80).len();
    let total = header_len + BIG * 80;
    let mib = 1 << 20;
    let open_cuts = [
        header_len / 2,  // inside the header block
        header_len,      // header block only
        header_len + 80, // one body line
        header_len + 65_536,
        header_len + mib,
        header_len + 2 * mib,
        header_len + 5 * mib,
        total - 80, // all but the last line
        total - 10, // inside the last line
        total,      // everything, but no end of input yet
    ];
    let mut cases: Vec<(String, usize, Cut)> = open_cuts
        .iter()
        .enumerate()
        .map(|(i, &cut)| (format!("killed-{i}"), BIG, Cut::Open(cut)))
        .collect();
    // Killed while committing: such a message may be accepted or not, but
    // is never delivered in part.
    for (i, ms) in [0, 2, 5, 15].into_iter().enumerate() {
        let after = Cut::AfterClose(Duration::from_millis(ms));
        cases.push((format!("closed-{i}"), 12_800, after));
    }

    // Messages that complete, submitted between the killed ones.
    let complete = [
        ("complete-0", 10),
        ("complete-1", 3750),
        ("complete-2", BIG),
    ];
    let mut complete_at = [0usize, 5, cases.len()]
        .into_iter()
        .zip(complete)
        .peekable();
    let mut must_arrive: BTreeMap<String, usize> = BTreeMap::new();
    let mut may_arrive: BTreeMap<String, usize> = BTreeMap::new();
    let mut never: BTreeSet<String> = BTreeSet::new();
    let mut abandoned_on_disk = 0;

    for i in 0..=cases.len() {
        while let Some((_, (tag, lines))) = complete_at.next_if(|(at, _)| *at == i) {
            let (code, stderr) = submit(&d, &message(tag, lines));
            assert_eq!(code, 0, "sendmail {tag}: {stderr}");
            must_arrive.insert(tag.to_string(), lines);
        }
        let Some((tag, lines, cut)) = cases.get(i) else {
            break;
        };
        let msg = message(tag, *lines);
        let before: BTreeSet<PathBuf> = files_under(&tmp).into_iter().collect();
        let mut child = Command::new(PBXMAIL)
            .args(["sendmail", "-i", "-f", SENDER, RCPT])
            .env("PBXMAIL_CONFIG", d.config_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pbxmail sendmail");
        let mut stdin = child.stdin.take().expect("stdin pipe");
        match cut {
            Cut::Open(cut) => {
                stdin
                    .write_all(&msg[..*cut])
                    .unwrap_or_else(|e| panic!("sendmail {tag} stopped reading: {e}"));
                // Once the header block is in, sendmail writes to tmp/: wait
                // until that file holds what it was given, less what may sit
                // in pipe and buffers, so the kill lands mid-write on disk.
                if *cut >= header_len {
                    let want = (*cut - header_len).saturating_sub(512 * 1024) as u64;
                    let on_disk = wait_until(Duration::from_secs(10), || {
                        files_under(&tmp).iter().any(|p| {
                            !before.contains(p)
                                && p.extension().is_some_and(|e| e == "msg")
                                && fs::metadata(p).is_ok_and(|m| m.len() >= want)
                        })
                    });
                    assert!(on_disk, "sendmail {tag} wrote no tmp file of {want} octets");
                    abandoned_on_disk += 1;
                }
                let status = kill9(&mut child);
                drop(stdin);
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "sendmail {tag} ended before the kill ({status})"
                );
                never.insert(tag.clone());
            }
            Cut::AfterClose(delay) => {
                stdin.write_all(&msg).expect("sendmail reads its input");
                drop(stdin);
                thread::sleep(*delay);
                let status = kill9(&mut child);
                if status.success() {
                    must_arrive.insert(tag.clone(), *lines);
                } else {
                    assert_eq!(status.signal(), Some(9), "sendmail {tag}: {status}");
                    may_arrive.insert(tag.clone(), *lines);
                }
            }
        }
    }
    let in_tmp = files_under(&tmp).len();
    assert!(
        in_tmp >= abandoned_on_disk,
        "{abandoned_on_disk} killed submissions wrote to tmp/, {in_tmp} files there"
    );

    // A restart runs start-up recovery; then everything accepted goes out.
    let status = d.stop();
    assert!(status.success(), "daemon stop: {status}");
    restart(&mut d);
    let tmp_cleared = wait_until(Duration::from_secs(10), || files_under(&tmp).is_empty());
    let left = d.wait_for_queue(DRAIN, |q| q.is_empty());
    let status = d.stop();
    assert!(status.success(), "daemon stop: {status}");
    assert!(left.is_empty(), "queue not drained in {DRAIN:?}: {left:#?}");
    assert!(
        tmp_cleared,
        "start-up recovery left tmp/: {:#?}",
        files_under(&tmp)
    );

    let mut arrived: BTreeMap<String, usize> = BTreeMap::new();
    for m in server.messages() {
        let Some((tag, got)) = parse(&m) else {
            panic!(
                "a message without a test Message-ID arrived: {:?}",
                m.text()
            );
        };
        assert!(
            !never.contains(&tag),
            "{tag}, killed while being written, was delivered ({} octets of body)",
            got.len()
        );
        let lines = must_arrive
            .get(&tag)
            .or_else(|| may_arrive.get(&tag))
            .unwrap_or_else(|| panic!("unknown message {tag} arrived"));
        assert!(
            got == body(&tag, *lines).as_slice(),
            "{tag} arrived damaged: {} octets of body, {} expected",
            got.len(),
            lines * 80
        );
        *arrived.entry(tag).or_default() += 1;
    }
    for tag in must_arrive.keys() {
        assert_eq!(
            arrived.get(tag),
            Some(&1),
            "{tag} was accepted: {arrived:?}"
        );
    }
    for tag in may_arrive.keys() {
        assert!(
            arrived.get(tag).is_none_or(|&n| n == 1),
            "{tag}: {arrived:?}"
        );
    }
    eprintln!(
        "crash: sendmail: {} killed while writing, none delivered; {} killed after closing \
         input ({} had exited 0 first; of the others, {} delivered, complete); \
         {} accepted, {} delivered; in {:.1?}",
        never.len(),
        may_arrive.len() + must_arrive.len() - complete.len(),
        must_arrive.len() - complete.len(),
        may_arrive
            .keys()
            .filter(|t| arrived.contains_key(*t))
            .count(),
        must_arrive.len(),
        arrived.len(),
        started.elapsed()
    );
    assert_spool_empty(&d);
}

/// The daemon appends the record that its last recipient was sent, then
/// removes the envelope: a crash between the two must not leave the message
/// in the queue for ever, nor send it again.
#[test]
fn message_recorded_as_sent_before_a_crash_is_removed_at_restart_not_resent() {
    let server = TestServer::start(ServerOptions::default(), None);
    let mut d = Daemon::bare("crash_recorded_sent");
    configure(&d, &server);
    let (code, stderr) = submit(&d, &message("sent-0", 3));
    assert_eq!(code, 0, "sendmail: {stderr}");
    let envelope = only_envelope(&d);
    let sent = serde_json::json!({
        "type": "attempt",
        "at_ms": unix_ms(),
        "results": [{"rcpt": 0, "status": "sent", "reply": "250 2.0.0 Ok: queued"}],
        "next_attempt_ms": null,
        "error": null,
    });
    append(&envelope, framed(&sent).as_bytes());

    d.start();
    let left = d.wait_for_queue(Duration::from_secs(5), |q| q.is_empty());
    let status = d.stop();
    assert!(status.success(), "daemon stop: {status}");
    assert!(
        left.is_empty(),
        "a message whose only recipient is recorded as sent stays queued: {left:#?}"
    );
    assert!(server.messages().is_empty(), "it was sent again");
    assert_spool_empty(&d);
}

/// docs/spool.md: a last record without LF is one the writer died in the
/// middle of; it is ignored, "at worst a recipient is tried again". So after
/// such a crash the message must still be retried until delivered, also when
/// its next attempt is deferred and recorded after the torn tail.
#[test]
fn envelope_torn_by_a_crash_mid_append_still_delivers_after_a_retry() {
    let server = TestServer::start(
        ServerOptions {
            faults: vec![(
                "RCPT".to_string(),
                1,
                Fault::Reply("450 4.2.0 try again later".to_string()),
            )],
            ..ServerOptions::default()
        },
        None,
    );
    let mut d = Daemon::bare("crash_torn_record");
    configure(&d, &server);
    let (code, stderr) = submit(&d, &message("torn-0", 3));
    assert_eq!(code, 0, "sendmail: {stderr}");
    let envelope = only_envelope(&d);
    let record = framed(&serde_json::json!({
        "type": "attempt",
        "at_ms": unix_ms(),
        "results": [{"rcpt": 0, "status": "pending", "reply": "451 4.3.0 later"}],
        "next_attempt_ms": unix_ms(),
        "error": null,
    }));
    append(&envelope, &record.as_bytes()[..record.len() / 2]);

    d.start();
    let got = server.wait_for_messages(1, Duration::from_secs(8));
    let left = d.wait_for_queue(Duration::from_secs(5), |q| q.is_empty());
    let status = d.stop();
    assert!(status.success(), "daemon stop: {status}");
    assert_eq!(
        got.len(),
        1,
        "not delivered after the retry; queue: {left:#?}; quarantine: {:#?}",
        files_under(&d.spool_dir().join("quarantine"))
    );
    assert_eq!(
        parse(&got[0]).map(|(tag, body_got)| (tag, body_got.to_vec())),
        Some(("torn-0".to_string(), body("torn-0", 3)))
    );
    assert!(left.is_empty(), "{left:#?}");
    assert_spool_empty(&d);
}
