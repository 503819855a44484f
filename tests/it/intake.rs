//! Local SMTP submission (`[daemon] listen`), end to end: real clients
//! (Python's smtplib, swaks, raw TCP and unix-socket clients written here)
//! talk to the real daemon, and the tests assert on the replies they get,
//! what the tenant's relay (a scripted `TestServer`) receives, and what the
//! spool holds (`pbxmail queue --json`). Each test owns its daemon, spool,
//! relay and listening port or socket.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::harness::{free_port, wait_until, Daemon};
use crate::support::mail::{body, field, headers, parse_headers, subject};
use crate::support::smtp_server::{Received, ServerOptions, TestServer};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(10);
/// Read and write timeout of every raw client socket: no read waits forever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for an external client (python3, swaks) to finish.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for tens of megabytes to be submitted, committed or relayed:
/// a debug build touches every byte several times (intake, dot transparency,
/// the test relay), and the fsync of that much data waits for a loaded disk.
const BIG_ARRIVAL: Duration = Duration::from_secs(60);
/// Upper bound for a reply or a delivery that waits behind many commits:
/// the one committer thread fsyncs each of them in turn.
const MANY_COMMITS: Duration = Duration::from_secs(30);
/// Upper bound for a reply the loop gives by itself (no disk sync), beside a
/// client that tries to hold it up.
const LOOP_REPLY: Duration = Duration::from_secs(2);
/// The default `listen_max_message_size` (50M), as EHLO must advertise it.
const DEFAULT_SIZE_LIMIT: u64 = 50 * 1024 * 1024;

const SENDER: &str = "101@acme.test";

// ---------------------------------------------------------------------------
// A daemon with `listen` set, and the relay of its one tenant.
// ---------------------------------------------------------------------------

/// Where the submission server listens.
enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

/// One daemon (tenant `acme`, sender domain `acme.test`) relaying without TLS
/// to `relay`. The daemon is declared first so it stops before its relay.
struct Site {
    daemon: Daemon,
    relay: TestServer,
    listen: Listen,
}

impl Site {
    /// Listens on a free loopback port; `daemon_extra` goes into `[daemon]`.
    fn tcp(test: &str, daemon_extra: &str) -> Site {
        Site::start(test, daemon_extra, |_| Listen::Tcp(free_port()))
    }

    /// Listens on `submit.sock` in the test dir.
    fn unix(test: &str, daemon_extra: &str) -> Site {
        Site::start(test, daemon_extra, |daemon| {
            Listen::Unix(daemon.dir().join("submit.sock"))
        })
    }

    fn start(test: &str, daemon_extra: &str, listen: impl FnOnce(&Daemon) -> Listen) -> Site {
        let relay = TestServer::start(ServerOptions::default(), None);
        let mut daemon = Daemon::bare(test);
        let listen = listen(&daemon);
        let listen_value = match &listen {
            Listen::Tcp(port) => format!("127.0.0.1:{port}"),
            Listen::Unix(path) => path.display().to_string(),
        };
        daemon.configure_with(
            &format!("listen = {listen_value}\n{daemon_extra}"),
            &format!(
                "[tenant:acme]\ndomains = acme.test\nrelay = 127.0.0.1:{}\ntls = none\n",
                relay.port()
            ),
        );
        daemon.start();
        Site {
            daemon,
            relay,
            listen,
        }
    }

    fn port(&self) -> u16 {
        match &self.listen {
            Listen::Tcp(port) => *port,
            Listen::Unix(path) => panic!("listening on {}, not TCP", path.display()),
        }
    }

    /// A raw client past the greeting (asserted to be 220).
    fn connect(&self) -> Client<TcpStream> {
        let mut client = Client::tcp(self.port());
        let greeting = client.reply();
        assert_eq!(greeting.code, 220, "greeting: {greeting:?}");
        client
    }

    /// A raw client past the greeting and `EHLO name` (both asserted).
    fn greeted(&self, name: &str) -> Client<TcpStream> {
        let mut client = self.connect();
        client.ehlo(name);
        client
    }

    /// Waits for `n` messages at the relay and asserts they came.
    fn delivered(&self, n: usize) -> Vec<Received> {
        self.delivered_within(n, ARRIVAL)
    }

    /// Waits up to `bound` for `n` messages at the relay and asserts they came.
    fn delivered_within(&self, n: usize, bound: Duration) -> Vec<Received> {
        let got = self.relay.wait_for_messages(n, bound);
        assert_eq!(
            got.len(),
            n,
            "the relay got {} of {n} messages within {bound:?}: {got:#?}",
            got.len()
        );
        got
    }

    /// Asserts the spool ends up empty (everything was delivered).
    fn assert_queue_drains(&self) {
        let left = self.daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
        assert!(left.is_empty(), "still queued: {left:#?}");
    }
}

// ---------------------------------------------------------------------------
// A raw SMTP client over any stream.
// ---------------------------------------------------------------------------

/// One (possibly multi-line) reply.
#[derive(Debug)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    /// The text of the last line after the code ("2.0.0 Ok: queued as …").
    fn text(&self) -> &str {
        self.lines
            .last()
            .and_then(|l| l.get(4..))
            .unwrap_or_default()
    }

    /// The ID from `250 2.0.0 Ok: queued as ID`; panics on any other reply.
    fn queued_id(&self) -> String {
        assert_eq!(self.code, 250, "not accepted: {self:?}");
        let id = self
            .text()
            .strip_prefix("2.0.0 Ok: queued as ")
            .unwrap_or_else(|| panic!("not a queued-as reply: {self:?}"));
        assert!(!id.is_empty(), "empty queue ID: {self:?}");
        id.to_string()
    }
}

struct Client<S: Read + Write> {
    reader: BufReader<S>,
}

impl Client<TcpStream> {
    fn tcp(port: u16) -> Client<TcpStream> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client::new(stream)
    }

    fn set_read_timeout(&self, timeout: Duration) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("set read timeout");
    }

    /// The next reply, asserted to come within `bound` (which may exceed
    /// `IO_TIMEOUT`, for a reply that waits for a commit).
    fn reply_within(&mut self, bound: Duration) -> Reply {
        let started = Instant::now();
        self.set_read_timeout(bound);
        let reply = self.reply();
        self.set_read_timeout(IO_TIMEOUT);
        let took = started.elapsed();
        assert!(
            took < bound,
            "{reply:?} came after {took:?}, not within {bound:?}"
        );
        reply
    }
}

impl Client<UnixStream> {
    fn unix(path: &Path) -> Client<UnixStream> {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        Client::new(stream)
    }
}

impl<S: Read + Write> Client<S> {
    fn new(stream: S) -> Client<S> {
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// Writes `bytes` in one write call (so a pipelined group leaves at once).
    fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let stream = self.reader.get_mut();
        stream
            .write_all(bytes.as_ref())
            .and_then(|()| stream.flush())
            .expect("write to the daemon");
    }

    /// The next reply; `Ok(None)` at a clean EOF before any line of it.
    fn next_reply(&mut self) -> io::Result<Option<Reply>> {
        let mut lines = Vec::new();
        // A bounded number of bounded lines: a runaway reply fails the test.
        for _ in 0..100 {
            let mut raw = Vec::new();
            let n = (&mut self.reader).take(4096).read_until(b'\n', &mut raw)?;
            if n == 0 {
                if lines.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF inside a reply after {lines:?}"),
                ));
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or_else(|| panic!("not a reply line: {line:?}"));
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Ok(Some(Reply { code, lines }));
            }
        }
        panic!("a reply of more than 100 lines: {lines:?}");
    }

    fn reply(&mut self) -> Reply {
        match self.next_reply() {
            Ok(Some(reply)) => reply,
            Ok(None) => panic!("the daemon closed the connection instead of replying"),
            Err(e) => panic!("no reply from the daemon: {e}"),
        }
    }

    fn command(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n"));
        self.reply()
    }

    /// Sends `line` and asserts the reply code.
    fn expect(&mut self, line: &str, code: u16) -> Reply {
        let reply = self.command(line);
        assert_eq!(reply.code, code, "{line:?} got {reply:?}");
        reply
    }

    fn ehlo(&mut self, name: &str) -> Reply {
        self.expect(&format!("EHLO {name}"), 250)
    }

    /// MAIL, RCPTs and DATA one by one (each asserted), then the dot-stuffed
    /// `message` (LF or CRLF line ends) and the final dot; returns the reply to it.
    fn submit(&mut self, from: &str, to: &[&str], message: &str) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(wire_body(message));
        self.reply()
    }

    /// Reads until EOF within `within`; true if the daemon closed the
    /// connection, false if data or nothing came instead.
    fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    continue
                }
                // A reset is a close too.
                Err(_) => return true,
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------
// Messages.
// ---------------------------------------------------------------------------

/// LF line ends to CRLF (the input has no CRs).
fn crlf(text: &str) -> String {
    text.replace('\n', "\r\n")
}

/// The DATA section as a client sends it: CRLF lines, leading dots doubled
/// (RFC 5321 §4.5.2), then the end-of-data line.
fn wire_body(message: &str) -> String {
    let message = crlf(&message.replace("\r\n", "\n"));
    let mut out = String::with_capacity(message.len() + 8);
    for line in message.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    if !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

fn simple_message(subject: &str, body: &str) -> String {
    crlf(&format!(
        "From: {SENDER}\nTo: alice@example.com\nSubject: {subject}\n\n{body}\n"
    ))
}

/// The relay's copy without the daemon's `Received:` field (first line and
/// its continuation lines); asserts that the field is there and, when `id`
/// is given, that it names the queue ID the client was told.
fn after_received<'a>(m: &'a Received, id: Option<&str>) -> &'a [u8] {
    let data = &m.data[..];
    assert!(
        data.starts_with(b"Received: from "),
        "no Received: field first: {:?}",
        String::from_utf8_lossy(&data[..data.len().min(300)])
    );
    let mut end = 0;
    let mut first = true;
    while end < data.len() {
        let rest = &data[end..];
        if !first && !rest.starts_with(b" ") && !rest.starts_with(b"\t") {
            break;
        }
        first = false;
        match rest.iter().position(|&b| b == b'\n') {
            Some(nl) => end += nl + 1,
            None => end = data.len(),
        }
    }
    let field = String::from_utf8_lossy(&data[..end]);
    assert!(
        field.contains("by pbx.test (pbxmail) with ESMTP id"),
        "unexpected Received: field {field:?}"
    );
    if let Some(id) = id {
        assert!(
            field.contains(&format!("with ESMTP id {id};")),
            "Received: field does not name queue ID {id}: {field:?}"
        );
    }
    &data[end..]
}

/// The relay's copy as the client submitted it: `after_received` less the
/// Date and Message-ID fields the daemon adds at the end of a header block
/// that lacks them (issue 13: both ways in apply the same cleanup). Asserts
/// that it added them.
fn as_submitted(m: &Received, id: Option<&str>) -> Vec<u8> {
    let data = after_received(m, id);
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(data.len(), |p| p + 2);
    let (head, body) = data.split_at(end);
    let head = String::from_utf8_lossy(head);
    let mut lines: Vec<&str> = head.split_inclusive("\r\n").collect();
    let message_id = lines.pop().unwrap_or_default();
    assert!(
        message_id.starts_with("Message-ID: <") && message_id.ends_with("@pbx.test>\r\n"),
        "no Message-ID added last: {head:?}"
    );
    let date = lines.pop().unwrap_or_default();
    assert!(date.starts_with("Date: "), "no Date added: {head:?}");
    let mut out = lines.concat().into_bytes();
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------
// External clients.
// ---------------------------------------------------------------------------

/// What an external client did.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with stdout and stderr into files in `dir` (no pipe can fill
/// up), killing it if it takes longer than `timeout`.
fn run_bounded(dir: &Path, tag: &str, cmd: &mut Command, timeout: Duration) -> Outcome {
    let out_path = dir.join(format!("{tag}.stdout"));
    let err_path = dir.join(format!("{tag}.stderr"));
    let out = fs::File::create(&out_path).expect("create stdout file");
    let err = fs::File::create(&err_path).expect("create stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut status = None;
    let finished = wait_until(timeout, || {
        status = child.try_wait().expect("wait for client");
        status.is_some()
    });
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        finished,
        "{tag} did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    Outcome {
        status: status.expect("exit status"),
        stdout,
        stderr,
    }
}

/// Sends the messages listed in a JSON spec over ONE connection with
/// `smtplib.SMTP.sendmail`, after an explicit `ehlo()`. The final DATA reply
/// of each message is captured by wrapping `data()`, which `sendmail` calls.
const SMTPLIB_CLIENT: &str = r#"
import json, smtplib, sys, time
spec = json.load(open(sys.argv[1]))
s = smtplib.SMTP(spec["host"], spec["port"], timeout=spec["timeout"])
s.ehlo("python.test")
features = sorted(s.esmtp_features)
replies = []
plain_data = s.data
def data(msg):
    reply = plain_data(msg)
    replies.append(reply)
    return reply
s.data = data
results = []
for m in spec["messages"]:
    with open(m["file"], "rb") as f:
        message = f.read()
    start = time.monotonic()
    refused = s.sendmail(m["from"], m["to"], message)
    seconds = time.monotonic() - start
    code, text = replies[-1]
    results.append({"refused": sorted(refused), "code": code,
                    "reply": text.decode(), "seconds": seconds})
s.quit()
print(json.dumps({"features": features, "results": results}))
"#;

/// One message for `smtplib_send`.
struct PyMessage<'a> {
    from: &'a str,
    to: &'a [&'a str],
    /// Exact bytes handed to `sendmail` (CRLF line ends).
    bytes: &'a [u8],
}

/// Runs `SMTPLIB_CLIENT`, killing it after `bound`, and returns its JSON
/// report; panics unless python3 exits 0 (smtplib raises on any refused step).
fn smtplib_send(site: &Site, tag: &str, messages: &[PyMessage], bound: Duration) -> Value {
    let dir = site.daemon.dir();
    let script = site.daemon.write_file("smtplib_client.py", SMTPLIB_CLIENT);
    let mut listed = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let file = dir.join(format!("{tag}-{i}.eml"));
        fs::write(&file, m.bytes).expect("write message file");
        listed.push(json!({"from": m.from, "to": m.to, "file": file}));
    }
    // smtplib's own timeout (per socket operation) ends a stall with its
    // message before `run_bounded` kills the process.
    let socket_timeout = bound.as_secs_f64() * 0.75;
    let spec = json!({
        "host": "127.0.0.1",
        "port": site.port(),
        "timeout": socket_timeout,
        "messages": listed,
    });
    let spec_path = site
        .daemon
        .write_file(&format!("{tag}.json"), &spec.to_string());
    let run = run_bounded(
        dir,
        tag,
        Command::new("python3").arg(&script).arg(&spec_path),
        bound,
    );
    assert!(
        run.status.success(),
        "smtplib client failed ({}):\n{}\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("smtplib client printed no JSON ({e}): {}", run.stdout))
}

/// Asserts a `smtplib_send` result accepted its message; returns the queue ID.
fn smtplib_queued(result: &Value) -> String {
    assert_eq!(result["code"], 250, "{result}");
    assert_eq!(result["refused"], json!([]), "{result}");
    let reply = result["reply"].as_str().unwrap_or_default();
    reply
        .strip_prefix("2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not a queued-as reply: {result}"))
        .to_string()
}

/// The swaks binary; the test fails (never skips) without it.
fn swaks() -> &'static str {
    let found = Command::new("swaks")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "swaks is not installed; `make test` installs it (apt-get install swaks)"
    );
    "swaks"
}

/// Runs swaks against the site with `args` after the common ones; asserts
/// exit 0 and returns its transcript.
fn run_swaks(site: &Site, tag: &str, args: &[&str]) -> String {
    let server = format!("127.0.0.1:{}", site.port());
    let run = run_bounded(
        site.daemon.dir(),
        tag,
        Command::new(swaks())
            .args(["--server", &server, "--timeout", "15"])
            .args(["--helo", "swaks.test", "--from", SENDER])
            .args(args),
        CLIENT_TIMEOUT,
    );
    let transcript = format!("{}{}", run.stdout, run.stderr);
    assert!(
        run.status.success(),
        "swaks failed ({}):\n{transcript}",
        run.status
    );
    transcript
}

// ---------------------------------------------------------------------------
// 1. smtplib: two messages in one connection.
// ---------------------------------------------------------------------------

#[test]
fn smtplib_two_messages_in_one_connection_arrive_exactly() {
    let site = Site::tcp("intake_smtplib_two", "");
    let first = crlf(
        "From: 101@acme.test\nTo: alice@example.com, bob@example.com\nSubject: first\n\n\
         Voicemail from 101.\n.leading dot\n..two dots\n\nlast line\n",
    );
    let second = crlf(
        "From: 101@acme.test\nTo: alice@example.com, bob@example.com\nSubject: second\n\n\
         Missed call from +1 555 0100.\n",
    );
    let to = ["alice@example.com", "bob@example.com"];
    let report = smtplib_send(
        &site,
        "two",
        &[
            PyMessage {
                from: SENDER,
                to: &to,
                bytes: first.as_bytes(),
            },
            PyMessage {
                from: SENDER,
                to: &to,
                bytes: second.as_bytes(),
            },
        ],
        CLIENT_TIMEOUT,
    );
    let features: Vec<&str> = report["features"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for wanted in ["pipelining", "size", "8bitmime", "enhancedstatuscodes"] {
        assert!(
            features.contains(&wanted),
            "EHLO lacks {wanted}: {features:?}"
        );
    }
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{report}");
    let ids: Vec<String> = results.iter().map(smtplib_queued).collect();
    assert_ne!(ids[0], ids[1], "two messages, one ID");

    let got = site.delivered(2);
    let mut got = got.clone();
    got.sort_by_key(subject);
    for (m, (original, id)) in got.iter().zip([(&first, &ids[0]), (&second, &ids[1])]) {
        assert_eq!(m.mail_from, SENDER);
        assert_eq!(m.rcpt_to, to);
        assert_eq!(
            String::from_utf8_lossy(&as_submitted(m, Some(id))),
            original.as_str()
        );
    }
    site.assert_queue_drains();
}

// ---------------------------------------------------------------------------
// 2. swaks, pipelined, with and without an attachment.
// ---------------------------------------------------------------------------

#[test]
fn swaks_pipelined_submission_is_delivered() {
    let site = Site::tcp("intake_swaks", "");
    let transcript = run_swaks(
        &site,
        "swaks",
        &[
            "--to",
            "a@example.com",
            "--pipeline",
            "--body",
            "Voicemail for extension 101",
        ],
    );
    assert!(
        transcript.contains("250 2.0.0 Ok: queued as "),
        "{transcript}"
    );
    // swaks prints what it sends (" -> ") and gets ("<-  "): with PIPELINING
    // the three commands leave before the first reply comes back.
    assert!(
        transcript.contains(" -> DATA\n<-  250 2.1.0 Ok\n<-  250 2.1.5 Ok\n<-  354"),
        "swaks did not pipeline:\n{transcript}"
    );
    let got = site.delivered(1);
    assert_eq!(got[0].mail_from, SENDER);
    assert_eq!(got[0].rcpt_to, ["a@example.com"]);
    assert_eq!(body(&got[0]).trim_end(), "Voicemail for extension 101");
    site.assert_queue_drains();
}

/// A small valid WAV file: 8 kHz, 16-bit mono, a quarter second of a
/// deterministic waveform that uses every byte value.
fn wav_file() -> Vec<u8> {
    let samples: Vec<i16> = (0..2000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 16) as u16 as i16)
        .collect();
    let data_len = (samples.len() * 2) as u32;
    let mut wav = Vec::with_capacity(44 + data_len as usize);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&8000u32.to_le_bytes());
    wav.extend_from_slice(&16000u32.to_le_bytes()); // byte rate
    wav.extend_from_slice(&2u16.to_le_bytes()); // block align
    wav.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        wav.extend_from_slice(&s.to_le_bytes());
    }
    wav
}

/// The decoded base64 content of the MIME part whose headers mention `marker`.
fn mime_part(text: &str, marker: &str) -> Vec<u8> {
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("no part with {marker:?} in {text}"));
    let rest = &text[start..];
    let (_, content) = rest
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("part without a body: {rest}"));
    let encoded: String = content
        .lines()
        .take_while(|l| !l.starts_with("--"))
        .map(str::trim)
        .collect();
    BASE64
        .decode(encoded.as_bytes())
        .unwrap_or_else(|e| panic!("attachment is not base64 ({e}): {encoded}"))
}

#[test]
fn swaks_wav_attachment_arrives_intact() {
    let site = Site::tcp("intake_swaks_wav", "");
    let wav = wav_file();
    let path = site.daemon.dir().join("vm-101.wav");
    fs::write(&path, &wav).expect("write WAV");
    let attach = format!("@{}", path.display());
    run_swaks(
        &site,
        "swaks_wav",
        &[
            "--to",
            "a@example.com",
            "--pipeline",
            "--body",
            "Voicemail attached",
            "--attach-type",
            "audio/wav",
            "--attach",
            &attach,
        ],
    );
    let got = site.delivered(1);
    assert_eq!(got[0].rcpt_to, ["a@example.com"]);
    let text = got[0].text();
    assert!(text.contains("multipart/mixed"), "{text}");
    assert!(text.contains("Voicemail attached"), "{text}");
    let received = mime_part(&text, "audio/wav");
    assert_eq!(received.len(), wav.len(), "WAV size changed");
    assert!(received == wav, "WAV content changed");
    site.assert_queue_drains();
}

// ---------------------------------------------------------------------------
// 3. A 25 MB message.
// ---------------------------------------------------------------------------

/// About `size` bytes of CRLF message: headers, then 76-character lines that
/// are all different; every 997th begins with a dot.
fn big_message(size: usize) -> Vec<u8> {
    let mut out = crlf(&format!(
        "From: {SENDER}\nTo: alice@example.com\nSubject: big\n\n"
    ))
    .into_bytes();
    let mut n = 0u64;
    while out.len() < size {
        let lead = if n.is_multiple_of(997) { "." } else { "L" };
        let line = format!(
            "{lead}{n:010} {:064x}\r\n",
            n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        );
        out.extend_from_slice(line.as_bytes());
        n += 1;
    }
    out
}

#[test]
fn smtplib_25_megabyte_message_is_queued_and_delivered() {
    let site = Site::tcp("intake_25mb", "");
    let message = big_message(25 * 1024 * 1024);
    let started = Instant::now();
    let report = smtplib_send(
        &site,
        "big",
        &[PyMessage {
            from: SENDER,
            to: &["alice@example.com"],
            bytes: &message,
        }],
        BIG_ARRIVAL,
    );
    let result = &report["results"][0];
    let id = smtplib_queued(result);
    println!(
        "25 MB submission: {:.2} s inside smtplib.sendmail, {:.2} s with python start-up",
        result["seconds"].as_f64().unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64()
    );
    let got = site.delivered_within(1, BIG_ARRIVAL);
    println!(
        "25 MB submission: at the relay {:.2} s after the client started",
        started.elapsed().as_secs_f64()
    );
    let delivered = as_submitted(&got[0], Some(&id));
    assert_eq!(delivered.len(), message.len(), "size changed in transit");
    assert!(delivered == message, "content changed in transit");
    site.assert_queue_drains();
}

// ---------------------------------------------------------------------------
// 4. A slow client does not hold up another.
// ---------------------------------------------------------------------------

/// The fast client's replies up to the 354 for DATA come from the loop alone,
/// so they are what a dribbling client could hold up; its final 250 also
/// waits for the committer's fsyncs and is bounded only by ARRIVAL.
#[test]
fn dribbling_client_does_not_delay_another_submission() {
    let site = Site::tcp("intake_slow_client", "");
    let port = site.port();
    let mut slow = site.greeted("slow.test");
    let (dribbling_tx, dribbling) = mpsc::channel();
    let (release_tx, release) = mpsc::channel::<()>();
    let done_dribbling = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&done_dribbling);
    let slow_thread = thread::spawn(move || {
        // One byte a second (48 s for the command without its line end)
        // until the fast client has its 354; then the rest at once, so the
        // test need not wait out the dribble.
        let command = b"MAIL FROM:<a-slow-client-extension-101@acme.test>\r\n";
        let without_line_end = &command[..command.len() - 2];
        let mut sent = 0;
        for (i, byte) in without_line_end.iter().enumerate() {
            slow.send([*byte]);
            sent = i + 1;
            if i == 0 {
                let _ = dribbling_tx.send(());
            }
            // The client's pace; released early, or the test is over.
            match release.recv_timeout(Duration::from_secs(1)) {
                Err(RecvTimeoutError::Timeout) => continue,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        slow.send(&command[sent..]);
        done.store(true, Ordering::SeqCst);
        let mail = slow.reply();
        let rcpt = slow.command("RCPT TO:<slow@example.com>");
        let data = slow.command("DATA");
        slow.send(wire_body(&simple_message("slow", "dribbled")));
        let end = slow.reply_within(ARRIVAL);
        let quit = slow.command("QUIT");
        [mail, rcpt, data, end, quit]
    });
    dribbling
        .recv_timeout(IO_TIMEOUT)
        .expect("the slow client started dribbling");

    let started = Instant::now();
    let mut fast = Client::tcp(port);
    assert_eq!(fast.reply().code, 220);
    fast.ehlo("fast.test");
    fast.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    fast.expect("RCPT TO:<fast@example.com>", 250);
    fast.expect("DATA", 354);
    let took = started.elapsed();
    let slow_still_dribbling = !done_dribbling.load(Ordering::SeqCst);
    let _ = release_tx.send(());
    fast.send(wire_body(&simple_message("fast", "quick")));
    fast.reply_within(ARRIVAL).queued_id();
    println!("fast client beside a dribbling one: 354 after {took:?}");
    assert!(
        took < LOOP_REPLY,
        "the fast client got its 354 only after {took:?}"
    );
    assert!(
        slow_still_dribbling,
        "the slow client finished its command first; the test proved nothing"
    );
    fast.expect("QUIT", 221);

    let replies = slow_thread.join().expect("slow client thread");
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 250, 354, 250, 221], "{replies:#?}");
    let got = site.delivered(2);
    let mut subjects: Vec<String> = got.iter().map(subject).collect();
    subjects.sort();
    assert_eq!(subjects, ["fast", "slow"]);
    let slow_copy = got.iter().find(|m| subject(m) == "slow").expect("slow");
    assert_eq!(slow_copy.mail_from, "a-slow-client-extension-101@acme.test");
}

/// Regression guard: a client streaming a big body as fast as loopback allows
/// must not keep the loop from serving others. The bulk sender goes on until
/// told to stop (or up to just under the 50M limit). Every reply up to the
/// 354 for DATA comes from the loop alone, so the small client must get
/// there within LOOP_REPLY and before the bulk sender ran out of room. Its
/// final 250 waits for the committer's fsyncs, which share the disk with the
/// bulk data, so ARRIVAL bounds it and nothing is concluded from its timing.
#[test]
fn bulk_sender_does_not_monopolise_the_loop() {
    const CAP: u64 = 45 * 1024 * 1024;
    let site = Site::tcp("intake_bulk_sender", "");
    let port = site.port();
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (bulk_sent, bulk_stop) = (Arc::clone(&sent), Arc::clone(&stop));
    let bulk = thread::spawn(move || {
        let mut c = Client::tcp(port);
        assert_eq!(c.reply().code, 220);
        c.ehlo("bulk.test");
        c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
        c.expect("RCPT TO:<bulk@example.com>", 250);
        c.expect("DATA", 354);
        c.send(crlf("Subject: bulk\n\n"));
        let chunk = format!("{}\r\n", "y".repeat(998)).repeat(256);
        let mut total = 0u64;
        while !bulk_stop.load(Ordering::SeqCst) && total + (chunk.len() as u64) < CAP {
            c.send(&chunk);
            total += chunk.len() as u64;
            bulk_sent.store(total, Ordering::SeqCst);
        }
        c.send(".\r\n");
        (c.reply_within(BIG_ARRIVAL), total)
    });
    assert!(
        wait_until(ARRIVAL, || sent.load(Ordering::SeqCst) > 4 << 20),
        "the bulk sender did not get going"
    );

    let started = Instant::now();
    let mut small = Client::tcp(port);
    let greeting = small.reply();
    let greeted_after = started.elapsed();
    assert_eq!(greeting.code, 220, "{greeting:?}");
    small.ehlo("small.test");
    small.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    small.expect("RCPT TO:<small@example.com>", 250);
    small.expect("DATA", 354);
    let took = started.elapsed();
    let bulk_sent_by_then = sent.load(Ordering::SeqCst);
    // What follows is the commit, not the loop: no need for more bulk data.
    stop.store(true, Ordering::SeqCst);
    small.send(wire_body(&simple_message("small", "x")));
    let reply = small.reply_within(ARRIVAL);
    let (bulk_reply, bulk_total) = bulk.join().expect("bulk client thread");
    println!(
        "beside a bulk sender: greeting after {greeted_after:?}, 354 after {took:?}; \
         bulk had sent {bulk_sent_by_then} of at most {CAP} bytes then, {bulk_total} in all"
    );
    reply.queued_id();
    bulk_reply.queued_id();
    let chunk_len = 256 * 1000;
    assert!(
        bulk_sent_by_then + chunk_len < CAP - chunk_len,
        "the small client got its 354 only once the bulk sender had nothing more \
         to send ({bulk_sent_by_then} bytes; greeting after {greeted_after:?}, 354 after \
         {took:?}): one client's stream monopolises the loop"
    );
    assert!(
        took < LOOP_REPLY,
        "the small client got its 354 only after {took:?}"
    );
    let got = site.delivered_within(2, BIG_ARRIVAL);
    let bulk_copy = got.iter().find(|m| subject(m) == "bulk").expect("bulk");
    assert_eq!(body(bulk_copy).len() as u64, bulk_total);
}

// ---------------------------------------------------------------------------
// 5. Many clients at once.
// ---------------------------------------------------------------------------

#[test]
fn twenty_concurrent_clients_are_all_accepted_and_delivered() {
    const CLIENTS: usize = 20;
    let site = Site::tcp("intake_many_clients", "");
    let port = site.port();
    // Every client is connected and greeted before any submits.
    let all_connected = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let all_connected = Arc::clone(&all_connected);
            thread::spawn(move || {
                let mut c = Client::tcp(port);
                assert_eq!(c.reply().code, 220);
                c.ehlo(&format!("client{i}.test"));
                all_connected.wait();
                // Twenty commits reach the one committer at once; the last
                // 250 waits for all the fsyncs before it.
                c.set_read_timeout(MANY_COMMITS);
                let subject = format!("parallel {i:02}");
                let reply = c.submit(
                    &format!("{}@acme.test", 200 + i),
                    &[&format!("user{i}@example.com")],
                    &simple_message(&subject, &format!("message number {i}")),
                );
                let id = reply.queued_id();
                c.expect("QUIT", 221);
                id
            })
        })
        .collect();
    let mut ids: Vec<String> = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), CLIENTS, "queue IDs are not distinct: {ids:?}");

    let got = site.delivered_within(CLIENTS, MANY_COMMITS);
    let mut subjects: Vec<String> = got.iter().map(subject).collect();
    subjects.sort();
    let expected: Vec<String> = (0..CLIENTS).map(|i| format!("parallel {i:02}")).collect();
    assert_eq!(subjects, expected);
    for m in &got {
        let i: usize = subject(m)["parallel ".len()..].parse().expect("number");
        assert_eq!(m.mail_from, format!("{}@acme.test", 200 + i));
        assert_eq!(m.rcpt_to, [format!("user{i}@example.com")]);
        assert_eq!(body(m), format!("message number {i}\r\n"));
    }
    site.assert_queue_drains();
}

// ---------------------------------------------------------------------------
// 6. Limits and refusals.
// ---------------------------------------------------------------------------

#[test]
fn declared_size_over_the_limit_is_refused_at_mail() {
    let site = Site::tcp("intake_size_declared", "listen_max_message_size = 100K");
    let mut c = site.greeted("client.test");
    let ehlo = c.ehlo("client.test");
    assert!(
        ehlo.lines.iter().any(|l| l == "250-SIZE 102400"),
        "{ehlo:?}"
    );
    let reply = c.command(&format!("MAIL FROM:<{SENDER}> SIZE=102401"));
    assert_eq!(reply.code, 552, "{reply:?}");
    assert!(reply.text().starts_with("5.3.4"), "{reply:?}");
    // At the limit is fine, and the refused MAIL left no sender behind.
    let reply = c.submit(SENDER, &["a@example.com"], &simple_message("ok", "small"));
    reply.queued_id();
    c.expect("QUIT", 221);
    assert_eq!(site.delivered(1).len(), 1);
}

#[test]
fn oversized_body_is_refused_after_the_data_and_the_connection_stays_usable() {
    let site = Site::tcp("intake_size_body", "listen_max_message_size = 100K");
    let mut c = site.greeted("client.test");
    let line = "x".repeat(98);
    let body: String = (0..1500).map(|_| format!("{line}\n")).collect(); // ~150 KB
    let reply = c.submit(SENDER, &["a@example.com"], &simple_message("big", &body));
    assert_eq!(reply.code, 552, "{reply:?}");
    assert!(reply.text().starts_with("5.3.4"), "{reply:?}");
    let queue = site.daemon.queue();
    assert!(
        queue.is_empty(),
        "an oversized message was queued: {queue:#?}"
    );

    let reply = c.submit(SENDER, &["b@example.com"], &simple_message("small", "ok"));
    let id = reply.queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(subject(&got[0]), "small");
    assert_eq!(got[0].rcpt_to, ["b@example.com"]);
    after_received(&got[0], Some(&id));
    site.assert_queue_drains();
    // Nothing more comes: the refused message never reaches the relay.
    assert_eq!(site.relay.messages().len(), 1);
}

#[test]
fn recipient_past_the_limit_gets_452_and_the_first_ones_are_kept() {
    let site = Site::tcp("intake_max_rcpts", "listen_max_recipients = 2");
    let mut c = site.greeted("client.test");
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    c.expect("RCPT TO:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    let third = c.command("RCPT TO:<c@example.com>");
    assert_eq!(third.code, 452, "{third:?}");
    assert!(third.text().starts_with("4.5.3"), "{third:?}");
    c.expect("DATA", 354);
    c.send(wire_body(&simple_message("two of three", "hi")));
    c.reply().queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(got[0].rcpt_to, ["a@example.com", "b@example.com"]);
}

#[test]
fn unknown_sender_domain_gets_550_and_data_without_rcpt_gets_554() {
    let site = Site::tcp("intake_refusals", "");
    let mut c = site.greeted("client.test");
    let unknown = c.command("MAIL FROM:<101@unknown.test>");
    assert_eq!(unknown.code, 550, "{unknown:?}");
    assert!(unknown.text().starts_with("5.7.1"), "{unknown:?}");
    // No default_tenant: the null sender has no tenant either.
    let null = c.command("MAIL FROM:<>");
    assert_eq!(null.code, 550, "{null:?}");

    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    let data = c.command("DATA");
    assert_eq!(data.code, 554, "{data:?}");
    c.expect("QUIT", 221);
    assert!(c.closed_within(Duration::from_secs(5)));
    let queue = site.daemon.queue();
    assert!(queue.is_empty(), "{queue:#?}");
    assert!(site.relay.messages().is_empty());
}

#[test]
fn null_sender_uses_the_default_tenant() {
    let site = Site::tcp("intake_null_sender", "default_tenant = acme");
    let mut c = site.greeted("client.test");
    let reply = c.submit("", &["a@example.com"], &simple_message("null", "dsn"));
    reply.queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, ["a@example.com"]);
}

#[test]
fn idle_client_gets_421_and_is_disconnected() {
    let site = Site::tcp("intake_idle", "listen_idle_timeout = 1s");
    let mut c = site.connect();
    // The daemon's idle clock restarts when it reads the EHLO, which is
    // after this instant: no 421 can come less than 1 s after it.
    let idle_from = Instant::now();
    c.ehlo("idle.test");
    // The 10 s read timeout bounds this wait.
    let reply = c.reply();
    let waited = idle_from.elapsed();
    assert_eq!(reply.code, 421, "{reply:?}");
    assert!(reply.text().starts_with("4.4.2"), "{reply:?}");
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "421 came {waited:?} after the EHLO was sent, for a 1 s idle timeout"
    );
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "the connection stayed open after 421"
    );
}

#[test]
fn connection_past_the_limit_gets_421_at_once() {
    let site = Site::tcp("intake_max_conns", "listen_max_connections = 2");
    let first = site.connect();
    let _second = site.connect();

    let started = Instant::now();
    let mut third = Client::tcp(site.port());
    third.set_read_timeout(Duration::from_secs(2));
    let reply = third.reply();
    assert_eq!(reply.code, 421, "{reply:?}");
    assert!(reply.text().starts_with("4.3.2"), "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "421 took {:?}",
        started.elapsed()
    );
    assert!(
        third.closed_within(Duration::from_secs(5)),
        "the refused connection stayed open"
    );

    // A freed slot is taken again.
    drop(first);
    let mut greeted = None;
    let admitted = wait_until(Duration::from_secs(5), || {
        let mut c = Client::tcp(site.port());
        let reply = c.reply();
        let ok = reply.code == 220;
        if ok {
            greeted = Some(c);
        }
        ok
    });
    assert!(admitted, "no connection admitted after one of two closed");
    let mut c = greeted.expect("admitted client");
    c.ehlo("again.test");
    c.submit(SENDER, &["a@example.com"], &simple_message("again", "x"))
        .queued_id();
}

#[test]
fn client_stalled_in_data_times_out_and_nothing_is_queued() {
    let site = Site::tcp("intake_idle_in_data", "listen_idle_timeout = 1s");
    let mut c = site.greeted("stall.test");
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    c.expect("RCPT TO:<a@example.com>", 250);
    c.expect("DATA", 354);
    c.send(crlf("Subject: half\n\nthe first half, then nothing\n"));
    let reply = c.reply();
    assert_eq!(reply.code, 421, "{reply:?}");
    assert!(reply.text().starts_with("4.4.2"), "{reply:?}");
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "the connection stayed open after 421"
    );
    // Had the half message been committed, it would have gone to the one
    // committer before the connection closed, so before this submission;
    // once this one arrived and the queue drained, both would show.
    let mut after = site.greeted("after.test");
    after
        .submit(SENDER, &["b@example.com"], &simple_message("after", "x"))
        .queued_id();
    after.expect("QUIT", 221);
    site.delivered(1);
    site.assert_queue_drains();
    let subjects: Vec<String> = site.relay.messages().iter().map(subject).collect();
    assert_eq!(subjects, ["after"], "a half message was queued");
}

// ---------------------------------------------------------------------------
// 7. Pipelining.
// ---------------------------------------------------------------------------

#[test]
fn pipelined_commands_get_their_replies_in_order() {
    let site = Site::tcp("intake_pipelining", "");
    let mut c = site.connect();
    c.send(format!(
        "EHLO pipe.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<alice@example.com>\r\n\
         RCPT TO:<bad address>\r\nDATA\r\n"
    ));
    let replies: Vec<Reply> = (0..5).map(|_| c.reply()).collect();
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 250, 250, 501, 354], "{replies:#?}");
    let ehlo = &replies[0].lines;
    for wanted in [
        "250-PIPELINING".to_string(),
        format!("250-SIZE {DEFAULT_SIZE_LIMIT}"),
        "250-8BITMIME".to_string(),
        "250 ENHANCEDSTATUSCODES".to_string(),
    ] {
        assert!(ehlo.contains(&wanted), "EHLO lacks {wanted:?}: {ehlo:?}");
    }
    c.send(wire_body(&simple_message("pipelined", "one")));
    let first_id = c.reply().queued_id();

    // A second transaction pipelined in one write, body and all, then QUIT:
    // the input that arrives while the first commit is pending must wait.
    c.send(format!(
        "MAIL FROM:<{SENDER}>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
    ));
    let codes: Vec<u16> = (0..3).map(|_| c.reply().code).collect();
    assert_eq!(codes, [250, 250, 354]);
    c.send(format!(
        "{}RSET\r\nQUIT\r\n",
        wire_body(&simple_message("pipelined too", "two"))
    ));
    let second_id = c.reply().queued_id();
    assert_eq!(c.reply().code, 250, "RSET");
    assert_eq!(c.reply().code, 221, "QUIT");
    assert!(c.closed_within(Duration::from_secs(5)), "open after QUIT");
    assert_ne!(first_id, second_id);

    let got = site.delivered(2);
    let one = got
        .iter()
        .find(|m| subject(m) == "pipelined")
        .expect("first");
    assert_eq!(
        one.rcpt_to,
        ["alice@example.com"],
        "the 501 recipient got in"
    );
    after_received(one, Some(&first_id));
    let two = got
        .iter()
        .find(|m| subject(m) == "pipelined too")
        .expect("second");
    assert_eq!(two.rcpt_to, ["bob@example.com"]);
    after_received(two, Some(&second_id));
}

// ---------------------------------------------------------------------------
// 8. Dot transparency.
// ---------------------------------------------------------------------------

#[test]
fn dot_lines_survive_submission_and_relay() {
    let site = Site::tcp("intake_dots", "");
    let body = ".\n..\n.x\nx.\n...\n. \nmiddle\n.";
    let message = simple_message("dots", body);
    let mut c = site.greeted("dots.test");
    // Once in one write, once in 3-byte pieces (lines cross read boundaries).
    c.submit(SENDER, &["a@example.com"], &message).queued_id();
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    c.expect("RCPT TO:<a@example.com>", 250);
    c.expect("DATA", 354);
    for piece in wire_body(&message).as_bytes().chunks(3) {
        c.send(piece);
    }
    c.reply().queued_id();
    c.expect("QUIT", 221);

    let got = site.delivered(2);
    for m in &got {
        assert_eq!(
            String::from_utf8_lossy(&as_submitted(m, None)),
            message,
            "dot lines changed"
        );
        let body = crate::support::mail::body(m);
        let lines: Vec<&str> = body.split_terminator("\r\n").collect();
        assert_eq!(lines, [".", "..", ".x", "x.", "...", ". ", "middle", "."]);
    }
}

#[test]
fn bare_lf_lines_are_stored_with_crlf() {
    let site = Site::tcp("intake_bare_lf", "");
    let mut c = site.greeted("lf.test");
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    c.expect("RCPT TO:<a@example.com>", 250);
    c.expect("DATA", 354);
    // A sloppy client: bare LF line ends, one dot-stuffed line among them.
    c.send("Subject: lf\n\nline one\n..dot\nline three\r\n.\r\n");
    let id = c.reply().queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(
        String::from_utf8_lossy(&as_submitted(&got[0], Some(&id))),
        "Subject: lf\r\n\r\nline one\r\n.dot\r\nline three\r\n"
    );
}

// ---------------------------------------------------------------------------
// 9. Unix socket.
// ---------------------------------------------------------------------------

#[test]
fn unix_socket_submission_is_delivered() {
    let site = Site::unix("intake_unix", "");
    let Listen::Unix(path) = &site.listen else {
        unreachable!("a unix site");
    };
    let mut c = Client::unix(path);
    assert_eq!(c.reply().code, 220);
    c.ehlo("local.test");
    let message = simple_message("over a unix socket", "local");
    let id = c.submit(SENDER, &["a@example.com"], &message).queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(got[0].mail_from, SENDER);
    assert_eq!(got[0].rcpt_to, ["a@example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&as_submitted(&got[0], Some(&id))),
        message
    );
    site.assert_queue_drains();
}

// ---------------------------------------------------------------------------
// 10. A spool that cannot take mail.
// ---------------------------------------------------------------------------

#[test]
fn full_spool_refuses_mail_with_452() {
    let site = Site::tcp("intake_spool_full", "min_free_space = 1000000T");
    let mut c = site.greeted("client.test");
    let reply = c.command(&format!("MAIL FROM:<{SENDER}>"));
    assert_eq!(reply.code, 452, "{reply:?}");
    assert!(reply.text().starts_with("4.3.1"), "{reply:?}");
    // Without a sender there is no transaction to go on with.
    assert_eq!(c.command("RCPT TO:<a@example.com>").code, 503);
    c.expect("QUIT", 221);
    let queue = site.daemon.queue();
    assert!(queue.is_empty(), "{queue:#?}");
}

// ---------------------------------------------------------------------------
// 11. Hostile clients (issue 14).
// ---------------------------------------------------------------------------

/// The smuggled second transaction: a sender of the same tenant and a
/// recipient the client never named in the open.
const SMUGGLED: &str = "MAIL FROM:<ceo@acme.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n\
                        From: ceo@acme.test\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n";

/// Only `<CRLF>.<CRLF>` ends DATA (RFC 5321 §4.1.1.4): after a lone dot
/// framed any other way, what follows is message text, never commands, so
/// each payload queues exactly the one message the client opened.
#[test]
fn smuggled_end_of_data_queues_exactly_one_message() {
    let site = Site::tcp("intake_smuggling", "");
    let variants = [
        "\n.\n",
        "\r\n.\n",
        "\n.\r\n",
        "\r.\r\n",
        "\r\n.\r",
        "\n.\r\n.\n",
    ];
    for dot in variants {
        let mut c = site.greeted("smuggler.test");
        c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
        c.expect("RCPT TO:<a@example.com>", 250);
        c.expect("DATA", 354);
        c.send(format!(
            "Subject: visible\r\n\r\nhello{dot}{SMUGGLED}QUIT\r\n"
        ));
        // One reply for the one message, then QUIT's: none for smuggled commands.
        c.reply().queued_id();
        let quit = c.reply();
        assert_eq!(quit.code, 221, "{dot:?}: {quit:?}");
    }
    site.delivered(variants.len());
    site.assert_queue_drains();
    let all = site.relay.messages();
    assert_eq!(all.len(), variants.len(), "{all:#?}");
    for m in &all {
        assert_eq!(m.mail_from, SENDER);
        assert_eq!(m.rcpt_to, ["a@example.com"]);
        assert_eq!(subject(m), "visible");
        assert!(m.text().contains("\r\npay now\r\n"), "{:?}", m.text());
    }
}

/// A bare CR in the EHLO name would have become a line break of our own
/// Received field on the way out: it is refused with 501, and the field
/// carries only a name that was accepted.
#[test]
fn ehlo_name_with_a_bare_cr_is_refused_and_never_reaches_received() {
    let site = Site::tcp("intake_ehlo_injection", "");
    let mut c = site.connect();
    c.expect("EHLO evil.test\rBcc: spy@example.com", 501);
    c.expect("HELO a b", 501);
    // Not greeted: no transaction yet.
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 503);
    c.ehlo("[127.0.0.1]");
    let message = simple_message("trace", "x");
    let id = c.submit(SENDER, &["a@example.com"], &message).queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(got[0].rcpt_to, ["a@example.com"]);
    let fields = parse_headers(&headers(&got[0]));
    let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["Received", "From", "To", "Subject", "Date", "Message-ID"]
    );
    let received = field(&fields, "Received").unwrap_or_default();
    assert!(
        received.starts_with("from [127.0.0.1] (127.0.0.1) by pbx.test"),
        "{received:?}"
    );
    assert!(received.contains(&id), "{received:?}");
    assert!(!got[0].text().contains("spy@example.com"));
}

/// RFC 1870 §6: a SIZE too big for any counter is over the limit (552),
/// not 0; a SIZE that is no number is a syntax error (501). Nothing is
/// queued for either, and the session goes on.
#[test]
fn size_parameter_that_overflows_is_refused_not_read_as_zero() {
    let site = Site::tcp("intake_size_overflow", "");
    let mut c = site.greeted("size.test");
    for (param, code) in [
        ("SIZE=99999999999999999999999", 552),
        ("SIZE=18446744073709551616", 552),
        ("SIZE=12abc", 501),
        ("SIZE=", 501),
    ] {
        let reply = c.command(&format!("MAIL FROM:<{SENDER}> {param}"));
        assert_eq!(reply.code, code, "{param}: {reply:?}");
        assert_eq!(c.command("RCPT TO:<a@example.com>").code, 503, "{param}");
    }
    let message = simple_message("sized", "x");
    let size = message.len();
    c.expect(&format!("MAIL FROM:<{SENDER}> SIZE={size}"), 250);
    c.expect("RCPT TO:<a@example.com>", 250);
    c.expect("DATA", 354);
    c.send(wire_body(&message));
    c.reply().queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(subject(&got[0]), "sized");
    site.assert_queue_drains();
    assert_eq!(site.relay.messages().len(), 1);
}

/// The listener's header block follows the same rules as sendmail's: a
/// bare CR in a header is a space, so it adds no field, and the bytes of a
/// header that is not UTF-8 arrive as sent.
#[test]
fn bare_cr_and_8bit_bytes_in_headers_over_listen_arrive_as_parsed() {
    let site = Site::tcp("intake_header_bytes", "");
    let mut c = site.greeted("bytes.test");
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250);
    c.expect("RCPT TO:<a@example.com>", 250);
    c.expect("DATA", 354);
    let mut data = Vec::new();
    data.extend_from_slice(b"From: 101@acme.test\r\nX-A: 1\rBcc: spy@example.com\r\n");
    data.extend_from_slice(b"Subject: Anruf von M\xfcller\r\n\r\nK\xe4se\r\n.\r\n");
    c.send(&data);
    let id = c.reply().queued_id();
    c.expect("QUIT", 221);
    let got = site.delivered(1);
    assert_eq!(got[0].rcpt_to, ["a@example.com"]);
    let wanted: &[u8] =
        b"From: 101@acme.test\r\nX-A: 1 Bcc: spy@example.com\r\nSubject: Anruf von M\xfcller\r\n";
    // `as_submitted` reads the header block as text; the bytes matter here.
    let submitted = after_received(&got[0], Some(&id));
    assert!(
        submitted.starts_with(wanted) && submitted.ends_with(b"\r\n\r\nK\xe4se\r\n"),
        "{:?}",
        String::from_utf8_lossy(submitted)
    );
    let fields = parse_headers(&headers(&got[0]));
    assert!(
        fields.iter().all(|(n, _)| !n.eq_ignore_ascii_case("Bcc")),
        "{fields:?}"
    );
}
