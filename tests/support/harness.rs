//! Drives the real `pbxmail` binary for integration tests: a private temp
//! directory with its own INI file and spool, the daemon as a child process
//! (stderr captured to a file), and one-shot `sendmail`, `queue` and
//! `check-config` runs against the same configuration. Assertions are left
//! to the tests; this only starts, stops, waits and reads.

use super::smtp_server::{ServerOptions, TestCa, TestServer};
use std::fs::{self, File};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test.
pub const PBXMAIL: &str = env!("CARGO_BIN_EXE_pbxmail");

/// How often `wait_until` looks at files or queue state.
const POLL: Duration = Duration::from_millis(20);
/// How long the daemon gets to create its pickup socket after spawning.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long SIGTERM may take: the daemon waits up to 10 s for sessions itself.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
/// whether it held. For file and queue state; the test SMTP server has its
/// own Condvar-based waits.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// A loopback port that refuses connections for as long as the test process
/// runs. Its listener is gone, so a connect gets a reset; one accepted
/// connection, held to the end, keeps the port bound, so neither a parallel
/// test's server nor a connection's own source port can take it meanwhile.
pub fn closed_port() -> u16 {
    static HELD: Mutex<Vec<(TcpStream, TcpStream)>> = Mutex::new(Vec::new());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("listener address").port();
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect to the held port");
    let (server, _) = listener.accept().expect("accept on the held port");
    drop(listener);
    HELD.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((client, server));
    port
}

/// A loopback port that was free a moment ago, for a listener the daemon
/// itself binds (another process may take it first; rare, and loud).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("listener address").port()
}

/// An existing group of this machine that lists no members and is neither
/// root's nor nogroup: for tests that need files owned by a group other than
/// the runner's. Found in /etc/group, never added to it, since no test writes
/// outside its temp dir. Its name and gid; None if the machine has none.
pub fn spare_group() -> Option<(String, u32)> {
    const PREFERRED: [&str; 7] = ["news", "uucp", "proxy", "backup", "list", "irc", "src"];
    let groups = fs::read_to_string("/etc/group").ok()?;
    let spare: Vec<(String, u32)> = groups
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let [name, _, gid, members] = fields[..] else {
                return None;
            };
            let gid: u32 = gid.parse().ok()?;
            let usable = gid != 0 && members.is_empty() && !["root", "nogroup"].contains(&name);
            usable.then(|| (name.to_string(), gid))
        })
        .collect();
    PREFERRED
        .iter()
        .find_map(|want| spare.iter().find(|(name, _)| name == want))
        .or_else(|| spare.first())
        .cloned()
}

/// Every file below `dir`, sorted (none if it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// What a one-shot command returned.
#[derive(Debug)]
pub struct Run {
    /// Exit code; -1 if killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A private pbxmail installation: temp dir, config, spool, and (once
/// started) the daemon process. The directory is removed when the test
/// passed and kept (with the daemon's log printed) when it failed, or always
/// when `PBXMAIL_KEEP_TEST_DIRS` is set.
pub struct Daemon {
    dir: PathBuf,
    config: PathBuf,
    spool: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Creates `$TMP/pbxmail-TEST-PID/` afresh and writes the standard config
    /// (see `configure`). The daemon is not started.
    pub fn new(test: &str, tenants: &str) -> Daemon {
        let daemon = Daemon::bare(test);
        daemon.configure(tenants);
        daemon
    }

    /// Writes the config: `daemon_section("")` followed by `tenants`, the
    /// test's `[tenant:…]` sections.
    pub fn configure(&self, tenants: &str) {
        self.configure_with("", tenants);
    }

    /// Writes the config: `daemon_section(keys)` followed by `tenants`.
    pub fn configure_with(&self, keys: &str, tenants: &str) {
        self.write_config(&format!("{}\n{tenants}", self.daemon_section(keys)));
    }

    /// A test's `[daemon]` section: this test's spool and control socket
    /// (daemons of parallel tests must not meet), hostname pbx.test,
    /// retry_min = 1s, retry_max = 4s, debug logging. `keys` holds
    /// `key = value` lines that replace those or add to them.
    pub fn daemon_section(&self, keys: &str) -> String {
        let mut lines: Vec<(String, String)> = [
            ("spool_dir", self.spool.display().to_string()),
            (
                "control_socket",
                self.dir.join("control.sock").display().to_string(),
            ),
            ("hostname", "pbx.test".to_string()),
            ("retry_min", "1s".to_string()),
            ("retry_max", "4s".to_string()),
            ("log_level", "debug".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for line in keys.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim().to_string(), value.trim().to_string());
            match lines.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => lines.push((key, value)),
            }
        }
        let body: Vec<String> = lines.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        format!("[daemon]\n{}\n", body.join("\n"))
    }

    /// The scenario most delivery tests share, in one call: a scripted relay
    /// on 127.0.0.1 with `options`, and a daemon (not started) whose one
    /// tenant `acme` (domain acme.test) relays to it without TLS, with
    /// `extra` as further tenant keys.
    pub fn with_relay(test: &str, options: ServerOptions, extra: &str) -> (Daemon, TestServer) {
        let relay = TestServer::start(options, None);
        let daemon = Daemon::new(test, &plain_tenant("acme", "acme.test", &relay, extra));
        (daemon, relay)
    }

    /// Like `new`, without writing any config: for tests about the config itself.
    pub fn bare(test: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("pbxmail-{test}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("remove a leftover test dir");
        }
        fs::create_dir_all(&dir).expect("create test dir");
        Daemon {
            config: dir.join("pbxmail.ini"),
            spool: dir.join("spool"),
            log: dir.join("daemon.log"),
            dir,
            child: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spool_dir(&self) -> &Path {
        &self.spool
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Writes `ca`'s certificate as `ca.pem` in the test dir; returns the
    /// tenant line `ca_file = ...` that trusts it.
    pub fn trust(&self, ca: &TestCa) -> String {
        let path = self.dir.join("ca.pem");
        ca.write_ca_pem(&path);
        format!("ca_file = {}\n", path.display())
    }

    /// Replaces the config file with `text` verbatim, atomically (a temp
    /// file renamed over it), so a sendmail or a reload reading it meanwhile
    /// sees the old file or the new one, never half of one, as after an
    /// admin's editor.
    pub fn write_config(&self, text: &str) {
        let temp = self.config.with_extension("ini.new");
        fs::write(&temp, text).expect("write config");
        fs::rename(&temp, &self.config).expect("replace config");
    }

    /// Writes a file into the test dir and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, contents).expect("write test file");
        path
    }

    /// Starts `pbxmail daemon -c FILE` and waits until it is ready (its
    /// pickup socket exists, which happens after the tenant threads started).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let child = Command::new(PBXMAIL)
            .arg("daemon")
            .arg("-c")
            .arg(&self.config)
            .env_remove("PBXMAIL_CONFIG")
            .env_remove("PBXMAIL_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn pbxmail daemon");
        self.child = Some(child);
        let socket = self.spool.join("pickup.sock");
        let mut exited = None;
        let ready = wait_until(READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    return true;
                }
            }
            socket.exists()
        });
        if let Some(status) = exited {
            self.child = None;
            panic!("daemon exited during start-up ({status})");
        }
        assert!(ready, "daemon did not create {} in time", socket.display());
    }

    /// SIGTERM, then waits (bounded) for the exit; returns its status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let mut status = None;
        let stopped = wait_until(STOP_TIMEOUT, || {
            status = child.try_wait().expect("wait for daemon");
            status.is_some()
        });
        if !stopped {
            let _ = child.kill();
            let _ = child.wait();
            panic!("daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM");
        }
        status.expect("exit status")
    }

    /// Runs `pbxmail ARGS...` with `PBXMAIL_CONFIG` pointing at this config
    /// and `stdin` as standard input.
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut child = Command::new(PBXMAIL)
            .args(args)
            .env("PBXMAIL_CONFIG", &self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pbxmail");
        let mut input = child.stdin.take().expect("stdin pipe");
        let bytes = stdin.to_vec();
        // A command that exits before reading everything (a usage error)
        // closes the pipe; that is not the test's failure.
        let writer = thread::spawn(move || {
            let _ = input.write_all(&bytes);
        });
        let output = child.wait_with_output().expect("wait for pbxmail");
        let _ = writer.join();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `pbxmail sendmail ARGS...` with the message on stdin.
    pub fn sendmail(&self, args: &[&str], message: &[u8]) -> Run {
        let mut full = vec!["sendmail"];
        full.extend_from_slice(args);
        self.run(&full, message)
    }

    /// `sendmail -i ARGS...` with `message`; asserts exit 0 (durably
    /// spooled) and returns the run.
    pub fn submit(&self, args: &[&str], message: &[u8]) -> Run {
        let mut full = vec!["-i"];
        full.extend_from_slice(args);
        let run = self.sendmail(&full, message);
        assert_eq!(run.code, 0, "sendmail {args:?} failed: {}", run.stderr);
        run
    }

    /// `sendmail -v -i ARGS...` with `message`; asserts exit 0 and returns
    /// the queue ID it reported.
    pub fn submit_for_id(&self, args: &[&str], message: &[u8]) -> String {
        let mut full = vec!["-v"];
        full.extend_from_slice(args);
        super::mail::queued_id(&self.submit(&full, message).stderr)
    }

    /// Submits `mail::note(from, to, subject)` to `to` (`sendmail -v -i TO`);
    /// asserts exit 0 and returns the queue ID.
    pub fn submit_note(&self, from: &str, to: &str, subject: &str) -> String {
        self.submit_for_id(&[to], &super::mail::note(from, to, subject))
    }

    /// `pbxmail queue -c FILE --json`, parsed; panics unless it exits 0.
    pub fn queue_json(&self) -> serde_json::Value {
        let config = self.config.to_string_lossy().into_owned();
        let run = self.run(&["queue", "-c", &config, "--json"], b"");
        assert_eq!(run.code, 0, "queue --json failed: {}", run.stderr);
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("queue --json is not JSON ({e}): {}", run.stdout))
    }

    /// The queue entries as a Vec (empty when the queue is).
    pub fn queue(&self) -> Vec<serde_json::Value> {
        match self.queue_json() {
            serde_json::Value::Array(entries) => entries,
            other => panic!("queue --json is not an array: {other}"),
        }
    }

    /// Polls the queue until `cond` holds for its entries; returns the last
    /// entries seen either way.
    pub fn wait_for_queue(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut last = Vec::new();
        wait_until(timeout, || {
            last = self.queue();
            cond(&last)
        });
        last
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("PBXMAIL_KEEP_TEST_DIRS").is_some() {
            eprintln!("test dir kept: {}", self.dir.display());
        } else if thread::panicking() {
            eprintln!(
                "test dir kept: {}\n--- daemon log ---\n{}--- end of daemon log ---",
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// One record framed as the spool's envelopes and the archive's journal
/// frame theirs (docs/spool.md): `LEN SP CRC32C SP JSON LF`.
pub fn framed(record: &serde_json::Value) -> String {
    let json = record.to_string();
    format!(
        "{} {:08x} {json}\n",
        json.len(),
        crc32c::crc32c(json.as_bytes())
    )
}

// Reading `pbxmail queue --json` entries.

pub fn str_of<'a>(entry: &'a serde_json::Value, key: &str) -> &'a str {
    entry[key].as_str().unwrap_or("")
}

pub fn attempts(entry: &serde_json::Value) -> u64 {
    entry["attempts"].as_u64().unwrap_or(0)
}

pub fn recipients(entry: &serde_json::Value) -> Vec<String> {
    entry["recipients"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A daemon the test starts itself, for an environment of its own and for
/// signals (SIGHUP, SIGTERM). Its stderr goes to the harness's `daemon.log`.
pub struct Running {
    child: Option<Child>,
    /// The daemon's stderr, where `reload` looks for the outcome.
    log: PathBuf,
}

impl Running {
    /// Spawns the daemon and waits until its pickup socket exists (bound last).
    pub fn start(daemon: &Daemon) -> Running {
        Running::start_with_env(daemon, &[])
    }

    pub fn start_with_env(daemon: &Daemon, env: &[(&str, &str)]) -> Running {
        let log_path = daemon.dir().join("daemon.log");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open daemon log");
        let mut command = Command::new(PBXMAIL);
        command
            .arg("daemon")
            .arg("-c")
            .arg(daemon.config_path())
            .env_remove("PBXMAIL_CONFIG")
            .env_remove("PBXMAIL_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("PBXMAIL_DEBUG_PANIC_ONCE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn pbxmail daemon");
        let mut running = Running {
            child: Some(child),
            log: log_path,
        };
        let socket = daemon.spool_dir().join("pickup.sock");
        let ready = wait_until(READY_TIMEOUT, || !running.is_running() || socket.exists());
        assert!(running.is_running(), "daemon exited during start-up");
        assert!(ready, "daemon did not create {} in time", socket.display());
        running
    }

    /// Starts the daemon over a spool a SIGKILL may have left: the killed
    /// daemon's pickup socket is removed first, so the new daemon's socket
    /// appears only after its start-up recovery ran.
    pub fn after_kill(daemon: &Daemon) -> Running {
        let _ = fs::remove_file(daemon.spool_dir().join("pickup.sock"));
        Running::start(daemon)
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap; returns the status.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        child.wait().expect("wait for the killed daemon")
    }

    /// SIGSTOP: the daemon runs no further until it is killed.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn pid(&self) -> String {
        self.child
            .as_ref()
            .expect("daemon running")
            .id()
            .to_string()
    }

    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} failed");
    }

    /// SIGHUP, then waits until the daemon has logged the outcome (applied
    /// or refused): the signal is handled asynchronously, and mail submitted
    /// before that would still go to the old tenants.
    pub fn reload(&self) {
        let outcomes = || {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            log.matches("INFO: reloaded ").count()
                + log
                    .matches("reload refused: the running configuration")
                    .count()
        };
        let before = outcomes();
        self.signal("-HUP");
        let done = wait_until(READY_TIMEOUT, || outcomes() > before);
        assert!(done, "the daemon logged no reload outcome after SIGHUP");
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then waits at most `timeout` for the exit.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("-TERM");
        let mut status = None;
        wait_until(timeout, || {
            status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGTERM; the daemon must be gone within 12 s (its grace is 10 s).
    pub fn stop(&mut self) {
        assert!(
            self.stop_within(Duration::from_secs(12)).is_some(),
            "daemon did not stop after SIGTERM"
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// Writing tenant sections and reading what a test server heard.

/// One `[tenant:NAME]` section; `extra` holds further `key = value` lines.
pub fn tenant(name: &str, domain: &str, relay: &str, extra: &str) -> String {
    format!("[tenant:{name}]\ndomains = {domain}\nrelay = {relay}\n{extra}\n")
}

/// A plain tenant section for a `TestServer` without TLS.
pub fn plain_tenant(name: &str, domain: &str, server: &TestServer, extra: &str) -> String {
    let relay = format!("127.0.0.1:{}", server.port());
    tenant(name, domain, &relay, &format!("tls = none\n{extra}"))
}

pub fn commands(server: &TestServer) -> Vec<String> {
    server.commands().into_iter().map(|(_, c)| c).collect()
}

/// How many commands the server heard that start with `prefix` (any case).
pub fn count_commands(server: &TestServer, prefix: &str) -> usize {
    let prefix = prefix.to_ascii_uppercase();
    server
        .commands()
        .iter()
        .filter(|(_, c)| c.to_ascii_uppercase().starts_with(&prefix))
        .count()
}
