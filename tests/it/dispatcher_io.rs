//! Proof that the dispatcher thread does no disk I/O while it runs (issue
//! 13): the real daemon runs under `strace -ff -y`, one trace file per
//! thread; the test drives a `listen` submission with a 200 KB body, a
//! `sendmail` submission, `hold`/`release` by ID, `status`, a `reload` that
//! adds a tenant with a CA file and an OAuth client secret, and SIGHUP,
//! then reads the dispatcher's (main) thread's trace from the moment it
//! said READY=1 and finds no file syscall (open, stat, statfs, lock,
//! sync, rename, unlink, chmod, ...) and no read or write on a spool or
//! config file. So that it cannot pass by tracing nothing, it also asserts
//! that the other threads did that work: the intake writer created and
//! locked the message file, the committer fsynced and renamed it, and the
//! offload thread read the config file and looked up the IDs, and the new
//! tenant's own thread read its CA and secret files.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::harness::{closed_port, free_port, tenant, wait_until, Daemon, PBXMAIL};

/// Start-up under strace is slow on a loaded 2-core machine.
const READY: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Syscalls that touch the file system by name or by file descriptor; none
/// of them may come from the dispatcher once it runs. Socket and eventfd
/// reads and writes are its job, and are told apart by the path `-y` prints.
const FILE_SYSCALLS: &[&str] = &[
    "open",
    "openat",
    "openat2",
    "creat",
    "stat",
    "lstat",
    "newfstatat",
    "statx",
    "statfs",
    "fstatfs",
    "access",
    "faccessat",
    "faccessat2",
    "flock",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "syncfs",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "fchownat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "truncate",
    "ftruncate",
    "getdents64",
    "readlink",
    "readlinkat",
    "utimensat",
    "fallocate",
];

/// The daemon as strace's child, with one trace file per thread.
struct Traced {
    strace: Child,
    traces: PathBuf,
}

impl Traced {
    fn start(daemon: &Daemon, notify: &Path) -> Traced {
        let traces = daemon.dir().join("trace");
        let log = fs::File::create(daemon.dir().join("daemon.log")).expect("daemon log");
        let strace = Command::new("strace")
            .args([
                "-ff",
                "-tt",
                "-y",
                "-s",
                "80",
                "-e",
                "trace=%file,%desc,%network",
            ])
            .arg("-o")
            .arg(&traces)
            .arg("--")
            .arg(PBXMAIL)
            .arg("daemon")
            .arg("-c")
            .arg(daemon.config_path())
            .env("NOTIFY_SOCKET", notify)
            .env_remove("PBXMAIL_CONFIG")
            .env_remove("PBXMAIL_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("run strace (make test installs it)");
        Traced { strace, traces }
    }

    /// The traced pbxmail process: strace's child that has exec'd pbxmail.
    fn daemon_pid(&self) -> u32 {
        let parent = self.strace.id();
        let mut pid = None;
        let found = wait_until(READY, || {
            pid = fs::read_dir("/proc").ok().and_then(|entries| {
                entries.flatten().find_map(|entry| {
                    let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
                    // pid (comm) state ppid ...: comm may hold spaces, so after the ')'.
                    let (head, rest) = stat.rsplit_once(')')?;
                    let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
                    // strace forks short-lived children of its own to probe
                    // ptrace: only the one that has exec'd pbxmail counts.
                    let exec_done = head.ends_with("(pbxmail");
                    (ppid == parent && exec_done)
                        .then(|| entry.file_name().to_str()?.parse().ok())?
                })
            });
            pid.is_some()
        });
        assert!(found, "strace started no pbxmail process");
        pid.unwrap_or_default()
    }

    /// Ends the daemon at once (no shut-down work to trace) and waits for
    /// strace to write out its files.
    fn kill(&mut self, pid: u32) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let exited = wait_until(IO_TIMEOUT, || matches!(self.strace.try_wait(), Ok(Some(_))));
        assert!(exited, "strace did not exit after the daemon was killed");
    }

    /// Every thread that left a trace file (`PREFIX.TID`).
    fn thread_ids(&self) -> Vec<u32> {
        let prefix = format!(
            "{}.",
            self.traces
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
        );
        let dir = self.traces.parent().unwrap_or(Path::new("."));
        fs::read_dir(dir)
            .expect("the trace folder")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
            .collect()
    }

    fn trace_of(&self, tid: u32) -> Vec<String> {
        let path = PathBuf::from(format!("{}.{tid}", self.traces.display()));
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no trace {}: {e}", path.display()));
        text.lines().map(str::to_string).collect()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

/// Thread names (as /proc shows them) → thread IDs of process `pid`.
fn threads(pid: u32) -> HashMap<String, u32> {
    let mut names = HashMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the daemon's threads")
        .flatten()
    {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Ok(comm) = fs::read_to_string(entry.path().join("comm")) {
            names.insert(comm.trim().to_string(), tid);
        }
    }
    names
}

/// The syscall name of a strace line: `12:00:00.000000 openat(...) = 3`.
fn syscall(line: &str) -> Option<&str> {
    let (_, call) = line.split_once(' ')?;
    let name = call.split('(').next()?;
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then_some(name)
}

/// A raw SMTP client, one reply at a time.
struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to listen");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut client = Client { reader, stream };
        assert!(client.reply().starts_with("220"));
        client
    }

    /// The whole reply, its lines joined; panics on a timeout.
    fn reply(&mut self) -> String {
        let mut whole = String::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("a reply line");
            assert!(!line.is_empty(), "connection closed; so far {whole:?}");
            whole.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return whole;
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    fn expect(&mut self, command: &str, code: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        let reply = self.reply();
        assert!(reply.starts_with(code), "{command}: {reply}");
        reply
    }
}

#[test]
fn the_dispatcher_thread_does_no_disk_io_while_it_runs() {
    let daemon = Daemon::bare("dispatcher_io");
    let port = free_port();
    // A relay that refuses: the mail stays queued for hold and release by ID.
    let relay = format!("127.0.0.1:{}", closed_port());
    daemon.configure_with(
        &format!("listen = 127.0.0.1:{port}"),
        &tenant("acme", "acme.test", &relay, "tls = none"),
    );
    let notify_path = daemon.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify.set_read_timeout(Some(READY)).expect("timeout");

    let mut traced = Traced::start(&daemon, &notify_path);
    let pid = traced.daemon_pid();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");
    // A new thread carries the process's name until it has run far enough to
    // set its own: wait for every name rather than read them once.
    // (No tenant thread: with nothing in the spool it retired after its
    // first pass; the submissions below start it again.)
    let wanted = ["intake-write", "intake-commit", "offload"];
    let mut names = threads(pid);
    let named = wait_until(READY, || {
        names = threads(pid);
        wanted.iter().all(|name| names.contains_key(*name))
    });
    assert!(named, "threads not all named: {names:?}");

    // A listen submission with a 200 KB body.
    let mut c = Client::connect(port);
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<101@acme.test>", "250");
    c.expect("RCPT TO:<a@example.com>", "250");
    c.expect("DATA", "354");
    let line = format!("{}\r\n", "z".repeat(78));
    let mut message = b"From: 101@acme.test\r\nSubject: big\r\n\r\n".to_vec();
    while message.len() < 200 * 1024 {
        message.extend_from_slice(line.as_bytes());
    }
    message.extend_from_slice(b".\r\n");
    c.send(&message);
    let queued = c.reply();
    let listen_id = queued
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    c.expect("QUIT", "221");

    // A sendmail submission: its hint reaches the dispatcher's pickup socket.
    let run = daemon.sendmail(
        &["-v", "-f", "102@acme.test", "b@example.com"],
        b"Subject: small\n\nhello\n",
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sendmail_id = run
        .stderr
        .split_whitespace()
        .skip_while(|w| *w != "as")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(!sendmail_id.is_empty(), "{}", run.stderr);

    // Control requests: by ID (the offload thread finds their tenant), status, reload.
    for command in ["hold", "release"] {
        let run = daemon.run(&[command, &listen_id, &sendmail_id], b"");
        assert_eq!(run.code, 0, "{command}: {} {}", run.stdout, run.stderr);
    }
    let run = daemon.run(&["hold", "0123456789ABCDEF"], b"");
    assert_ne!(run.code, 0, "an unknown ID is refused: {}", run.stdout);
    // The reload adds a tenant whose settings name files: its CA file and
    // OAuth client secret must be read by its own thread, not the dispatcher.
    let ca_file = daemon.write_file("beta-ca.pem", "not read by the dispatcher\n");
    let secret_file = daemon.write_file("beta.secret", "s3cret\n");
    let beta = format!(
        "auth = xoauth2\nusername = pbx@beta.test\n\
         oauth_token_url = https://127.0.0.1:{}/token\n\
         oauth_client_id = pbxmail-test\n\
         oauth_client_secret_file = {}\n\
         oauth_scope = https://mail.example/\n\
         oauth_token_file = {}\n\
         ca_file = {}\n",
        closed_port(),
        secret_file.display(),
        daemon.dir().join("beta.json").display(),
        ca_file.display(),
    );
    daemon.configure_with(
        &format!("listen = 127.0.0.1:{port}"),
        &format!(
            "{}\n{}",
            tenant("acme", "acme.test", &relay, "tls = none"),
            tenant("beta", "beta.test", &relay, &beta)
        ),
    );
    for command in ["status", "reload"] {
        let run = daemon.run(&[command], b"");
        assert_eq!(run.code, 0, "{command}: {} {}", run.stdout, run.stderr);
    }
    // SIGHUP: the reload is logged once the new configuration is applied.
    let reloads = || {
        fs::read_to_string(daemon.dir().join("daemon.log"))
            .unwrap_or_default()
            .matches("INFO: reloaded ")
            .count()
    };
    let before = reloads();
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    assert!(
        wait_until(READY, || reloads() > before),
        "no reload after SIGHUP"
    );

    traced.kill(pid);

    let spool = daemon.spool_dir().display().to_string();
    let config = daemon.config_path().display().to_string();
    let dispatcher = traced.trace_of(pid);
    let ready = dispatcher
        .iter()
        .position(|l| l.contains("sendto(") && l.contains("READY=1"))
        .expect("the dispatcher (main) thread sent READY=1");
    let running = &dispatcher[ready + 1..];
    let violations: Vec<&String> = running
        .iter()
        .filter(|line| {
            syscall(line).is_some_and(|name| FILE_SYSCALLS.contains(&name))
                // `-y` prints a descriptor's file as `3</path>`: a read or
                // write of a spool or config file (log lines on stderr
                // may name those paths in their text, which is fine).
                || line.contains(&format!("<{spool}"))
                || line.contains(&format!("<{config}>"))
        })
        .collect();
    assert!(
        violations.is_empty(),
        "the dispatcher thread touched files while it ran:\n{violations:#?}"
    );
    // It did run: accepted the clients, received the body (in 16 KiB reads,
    // which sockets trace as recvfrom) and the sendmail hint, answered.
    let served = |call: &str| running.iter().filter(|l| syscall(l) == Some(call)).count();
    assert!(
        served("accept4") >= 6,
        "not every connection was accepted here"
    );
    assert!(
        served("recvfrom") >= 13,
        "the 200 KB body was not received here"
    );
    assert!(served("sendto") >= 6, "no replies traced");

    // And the others did the disk work.
    let thread_trace = |name: &str| traced.trace_of(names[name]).join("\n");
    let writer = thread_trace("intake-write");
    for wanted in [
        format!("{spool}/tmp/{listen_id}.msg"),
        "statfs(".to_string(),
        "flock(".to_string(),
    ] {
        assert!(writer.contains(&wanted), "intake-write did not {wanted}");
    }
    let committer = thread_trace("intake-commit");
    for wanted in ["fsync(", "rename("] {
        assert!(committer.contains(wanted), "intake-commit did not {wanted}");
    }
    assert!(committer.contains(&format!("{spool}/queue/acme/{listen_id}")));
    // The new tenant's thread read its CA and secret files (the names map
    // predates it, so look through every thread's trace).
    for file in [&ca_file, &secret_file] {
        let file = file.display().to_string();
        let readers: Vec<u32> = traced
            .thread_ids()
            .into_iter()
            .filter(|tid| {
                traced
                    .trace_of(*tid)
                    .iter()
                    .any(|l| syscall(l) == Some("openat") && l.contains(&file))
            })
            .collect();
        assert!(!readers.is_empty(), "nobody read {file}");
        assert!(!readers.contains(&pid), "the dispatcher read {file}");
    }
    let offload = thread_trace("offload");
    assert!(
        offload.contains(&config),
        "the offload thread did not read the config"
    );
    for id in [&listen_id, &sendmail_id] {
        assert!(
            offload.contains(&format!("{spool}/queue/acme/{id}.env")),
            "the offload thread did not look for {id}"
        );
    }
}

/// The daemon's peak resident memory in KiB (VmHWM).
fn peak_kib(pid: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// With the disk work on the writer thread, a body streams through bounded
/// channels: a 200 MB message costs the daemon a few MB, not its size.
#[test]
fn a_200_megabyte_message_streams_through_in_a_few_megabytes() {
    const SIZE: usize = 200 * 1024 * 1024;
    let daemon = Daemon::bare("dispatcher_io_big");
    let port = free_port();
    let relay = format!("127.0.0.1:{}", closed_port());
    daemon.configure_with(
        &format!("listen = 127.0.0.1:{port}\nlisten_max_message_size = 300M"),
        &tenant("acme", "acme.test", &relay, "tls = none"),
    );
    let running = crate::support::harness::Running::start(&daemon);
    let pid = running.pid();
    let mut c = Client::connect(port);
    c.expect("EHLO client.test", "250");
    let before = peak_kib(&pid);
    c.expect("MAIL FROM:<101@acme.test>", "250");
    c.expect("RCPT TO:<a@example.com>", "250");
    c.expect("DATA", "354");
    c.send(b"From: 101@acme.test\r\nSubject: big\r\n\r\n");
    let chunk = format!("{}\r\n", "w".repeat(998)).repeat(256);
    let mut sent = 0;
    while sent < SIZE {
        c.send(chunk.as_bytes());
        sent += chunk.len();
    }
    c.send(b".\r\n");
    c.stream
        .set_read_timeout(Some(Duration::from_secs(180)))
        .expect("timeout");
    let queued = c.reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let grew = peak_kib(&pid).saturating_sub(before);
    println!("200 MB through listen: peak memory grew by {grew} KiB");
    assert!(
        grew < 16 * 1024,
        "a 200 MB message cost {grew} KiB of peak memory"
    );
    c.expect("QUIT", "221");
}
