//! "No secret (password, password file contents) appears in any output of any
//! subcommand or log line at any level — a test greps for it."
//!
//! One daemon at trace level (`log_level = trace` and `PBXMAIL_LOG=trace`)
//! with three STARTTLS tenants that log in: `pw` (inline `password`, AUTH
//! PLAIN), `pf` (`password_file`, AUTH LOGIN) and `bad` (a password its relay
//! refuses, so the error paths run). Mail goes out for each, then every
//! subcommand runs against the same config (also at trace level), and
//! `check-config` / `reload` / SIGHUP meet configs broken on the password line.
//! Every stdout, stderr, the daemon's log and the files under the spool and
//! archive are searched for each secret in every form a leak could take.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::harness::{str_of, wait_until, Daemon, Running, PBXMAIL};
use crate::support::mail::{note, queued_id};
use crate::support::smtp_server::{ServerOptions, TestCa, TestServer, Tls};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;

/// Upper bound for anything that should happen now.
const ARRIVAL: Duration = Duration::from_secs(8);
/// No single command may take longer (the whole test stays well under 20 s).
const COMMAND_LIMIT: Duration = Duration::from_secs(8);

const PW_USER: &str = "pbx@pw.test";
const PW_PASSWORD: &str = "Pw-inline-7f3a9c";
const PF_USER: &str = "pbx@pf.test";
const PF_PASSWORD: &str = "Pf-file-91bd24";
const BAD_USER: &str = "pbx@bad.test";
/// What tenant `bad` is configured with; its relay expects `BAD_RELAY_PASSWORD`.
const BAD_PASSWORD: &str = "Wrong-pw-55e1";
const BAD_RELAY_PASSWORD: &str = "Right-pw-0c4e8b";
/// A second value on a duplicated `password` line in the broken configs.
const DUP_PASSWORD: &str = "Dup-pw-e4a17d";
/// A password with a `:` in it, pasted on a line of its own (the key
/// forgotten). Any part of it in an output is a leak.
const BARE_PASSWORD: &str = "Bare-pw-3d9f02:Kq8";

/// What one command printed (or what a log or file holds), labelled.
struct Output {
    label: String,
    text: String,
}

/// Runs `pbxmail ARGS...` (or `program`) with the config and trace logging in
/// the environment; killed after `COMMAND_LIMIT`. Returns (exit code, output).
fn run(config: &Path, args: &[&str], stdin: &[u8]) -> (i32, String) {
    run_program(Path::new(PBXMAIL), config, args, stdin)
}

fn run_program(program: &Path, config: &Path, args: &[&str], stdin: &[u8]) -> (i32, String) {
    let mut child = Command::new(program)
        .args(args)
        .env("PBXMAIL_CONFIG", config)
        .env("PBXMAIL_LOG", "trace")
        .env("RUST_LOG", "trace")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", program.display()));
    let mut input = child.stdin.take().expect("stdin pipe");
    let bytes = stdin.to_vec();
    let writer = thread::spawn(move || {
        // A command that does not read stdin closes the pipe early.
        let _ = input.write_all(&bytes);
    });
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + COMMAND_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for pbxmail") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let text = format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        status.is_some(),
        "pbxmail {args:?} did not finish within {COMMAND_LIMIT:?}:\n{text}"
    );
    (status.and_then(|s| s.code()).unwrap_or(-1), text)
}

/// Every form in which a login could leak: the password itself, its base64
/// (AUTH LOGIN's password step), AUTH PLAIN's base64 of "\0user\0password" and
/// of "user\0user\0password". Base64 is checked without padding, so the
/// padded form (which contains it) is caught too.
fn secret_forms(user: &str, password: &str) -> Vec<(String, String)> {
    let b64 = |s: &str| STANDARD_NO_PAD.encode(s);
    vec![
        (format!("raw {password}"), password.to_string()),
        (format!("base64({password})"), b64(password)),
        (
            format!("base64(\\0{user}\\0{password})"),
            b64(&format!("\0{user}\0{password}")),
        ),
        (
            format!("base64({user}\\0{user}\\0{password})"),
            b64(&format!("{user}\0{user}\0{password}")),
        ),
        // The padded forms, spelled out (implied by the above, kept for clarity).
        (
            format!("padded base64(\\0{user}\\0{password})"),
            STANDARD.encode(format!("\0{user}\0{password}")),
        ),
    ]
}

fn all_secret_forms() -> Vec<(String, String)> {
    let mut forms = Vec::new();
    forms.extend(secret_forms(PW_USER, PW_PASSWORD));
    forms.extend(secret_forms(PF_USER, PF_PASSWORD));
    forms.extend(secret_forms(BAD_USER, BAD_PASSWORD));
    forms.push((format!("raw {DUP_PASSWORD}"), DUP_PASSWORD.to_string()));
    forms.push((
        format!("base64({DUP_PASSWORD})"),
        STANDARD_NO_PAD.encode(DUP_PASSWORD),
    ));
    forms.push((format!("raw {BARE_PASSWORD}"), BARE_PASSWORD.to_string()));
    for part in BARE_PASSWORD.split(':').filter(|p| p.len() >= 8) {
        forms.push((
            format!("part {part:?} of {BARE_PASSWORD}"),
            part.to_string(),
        ));
    }
    forms
}

/// Every (source, line, form) where a secret shows.
fn leaks(outputs: &[Output]) -> Vec<String> {
    let forms = all_secret_forms();
    let mut found = Vec::new();
    for output in outputs {
        for (n, line) in output.text.lines().enumerate() {
            for (what, form) in &forms {
                if line.contains(form.as_str()) {
                    found.push(format!(
                        "{} (line {}): {what} in {line:?}",
                        output.label,
                        n + 1
                    ));
                }
            }
        }
    }
    found
}

fn assert_no_leaks(outputs: &[Output]) {
    let found = leaks(outputs);
    assert!(
        found.is_empty(),
        "secrets leaked ({} hits):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// A STARTTLS relay that wants this login.
fn auth_server(ca: &TestCa, user: &str, password: &str) -> TestServer {
    TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            require_auth: Some((user.to_string(), password.to_string())),
            ..ServerOptions::default()
        },
        Some(ca),
    )
}

fn daemon_section(daemon: &Daemon) -> String {
    let keys = format!(
        "archive_dir = {}\nretry_min = 1h\nretry_max = 2h\nlog_level = trace",
        daemon.dir().join("archive").display()
    );
    format!("{}\n", daemon.daemon_section(&keys))
}

fn tenant(name: &str, server: &TestServer, ca_file: &Path, login: &str) -> String {
    format!(
        "[tenant:{name}]\n\
         domains = {name}.test\n\
         relay = localhost:{}\n\
         tls = starttls\n\
         ca_file = {}\n\
         {login}\n",
        server.port(),
        ca_file.display()
    )
}

fn auth_commands(server: &TestServer) -> usize {
    server
        .commands()
        .iter()
        .filter(|(_, c)| c.to_ascii_uppercase().starts_with("AUTH"))
        .count()
}

fn quits(server: &TestServer) -> usize {
    server
        .commands()
        .iter()
        .filter(|(_, c)| c.eq_ignore_ascii_case("QUIT"))
        .count()
}

/// Text of every regular file under `dir` (lossy), one Output each.
fn files_under(dir: &Path, into: &mut Vec<Output>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            files_under(&path, into);
        } else if meta.is_file() {
            if let Ok(bytes) = fs::read(&path) {
                into.push(Output {
                    label: format!("file {}", path.display()),
                    text: String::from_utf8_lossy(&bytes).into_owned(),
                });
            }
        }
    }
}

#[test]
fn no_secret_in_any_output_or_log_line() {
    let ca = TestCa::new();
    let pw_server = auth_server(&ca, PW_USER, PW_PASSWORD);
    let pf_server = auth_server(&ca, PF_USER, PF_PASSWORD);
    let bad_server = auth_server(&ca, BAD_USER, BAD_RELAY_PASSWORD);

    let daemon = Daemon::bare("secrets");
    let ca_file = daemon.dir().join("ca.pem");
    ca.write_ca_pem(&ca_file);
    let secret_file = daemon.write_file("pf.secret", &format!("{PF_PASSWORD}\n"));
    let tenants = format!(
        "{}\n{}\n{}",
        tenant(
            "pw",
            &pw_server,
            &ca_file,
            &format!("username = {PW_USER}\npassword = {PW_PASSWORD}\narchive = yes")
        ),
        tenant(
            "pf",
            &pf_server,
            &ca_file,
            &format!(
                "username = {PF_USER}\npassword_file = {}\nauth = login",
                secret_file.display()
            )
        ),
        tenant(
            "bad",
            &bad_server,
            &ca_file,
            &format!("username = {BAD_USER}\npassword = {BAD_PASSWORD}")
        ),
    );
    let good_config = format!("{}{tenants}", daemon_section(&daemon));
    daemon.write_config(&good_config);
    let config = daemon.config_path().to_path_buf();
    let config_arg = config.display().to_string();

    let mut outputs: Vec<Output> = Vec::new();
    let mut record = |label: &str, (code, text): (i32, String)| -> (i32, String) {
        outputs.push(Output {
            label: format!("`pbxmail {label}` (exit {code})"),
            text: text.clone(),
        });
        (code, text)
    };

    let (code, text) = record("check-config", run(&config, &["check-config"], b""));
    assert_eq!(code, 0, "the config is valid:\n{text}");

    let mut running = Running::start_with_env(&daemon, &[("PBXMAIL_LOG", "trace")]);

    // One message per tenant.
    let mut ids = Vec::new();
    for (name, user) in [("pw", PW_USER), ("pf", PF_USER), ("bad", BAD_USER)] {
        let (code, text) = record(
            &format!("sendmail -v (tenant {name})"),
            run(
                &config,
                &["sendmail", "-v", "-i", "rcpt@example.com"],
                &note(user, "rcpt@example.com", &format!("for {name}")),
            ),
        );
        assert_eq!(code, 0, "sendmail for {name}:\n{text}");
        ids.push(queued_id(&text));
    }
    let bad_id = ids[2].clone();

    // pw and pf deliver (PLAIN and LOGIN), bad is refused and deferred.
    let got = pw_server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "tenant pw did not deliver");
    assert_eq!(got[0].auth_user.as_deref(), Some(PW_USER));
    let got = pf_server.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "tenant pf did not deliver");
    assert_eq!(got[0].auth_user.as_deref(), Some(PF_USER));
    assert!(
        pf_server.commands().iter().any(|(_, c)| c == "AUTH LOGIN"),
        "tenant pf should use AUTH LOGIN: {:?}",
        pf_server.commands()
    );
    let queue = daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 1 && str_of(&q[0], "state") == "deferred"
    });
    assert!(
        queue.len() == 1 && str_of(&queue[0], "id") == bad_id,
        "only bad's message should stay, deferred: {queue:#?}"
    );
    assert!(bad_server.messages().is_empty());
    assert!(auth_commands(&bad_server) >= 1);

    // Every subcommand.
    record("queue", run(&config, &["queue"], b""));
    record("queue --json", run(&config, &["queue", "--json"], b""));
    record(
        "queue --tenant bad",
        run(&config, &["queue", "--tenant", "bad"], b""),
    );
    record("status", run(&config, &["status"], b""));
    let (code, text) = record("status --json", run(&config, &["status", "--json"], b""));
    assert_eq!(code, 0, "{text}");

    // flush retries bad now: one more refused login in the daemon's log.
    let sessions = quits(&bad_server);
    let (code, text) = record("flush", run(&config, &["flush"], b""));
    assert_eq!(code, 0, "{text}");
    assert!(
        wait_until(ARRIVAL, || quits(&bad_server) > sessions),
        "flush did not retry tenant bad: {:?}",
        bad_server.commands()
    );
    record(
        "flush --tenant bad",
        run(&config, &["flush", "--tenant", "bad"], b""),
    );
    record("sendmail -q", run(&config, &["sendmail", "-q"], b""));

    let (code, text) = record(
        &format!("hold {bad_id}"),
        run(&config, &["hold", &bad_id], b""),
    );
    assert_eq!(code, 0, "{text}");
    let (code, text) = record(
        &format!("release {bad_id}"),
        run(&config, &["release", &bad_id], b""),
    );
    assert_eq!(code, 0, "{text}");
    record("hold UNKNOWN", run(&config, &["hold", "0000nosuchid"], b""));
    let (code, text) = record("reload", run(&config, &["reload"], b""));
    assert_eq!(code, 0, "{text}");
    record("fsck", run(&config, &["fsck"], b""));
    record("fsck --json", run(&config, &["fsck", "--json"], b""));

    for (name, expect_ok) in [("pw", true), ("pf", true), ("bad", false)] {
        let (code, text) = record(
            &format!("test --tenant {name} --to x@example.com"),
            run(
                &config,
                &["test", "--tenant", name, "--to", "x@example.com"],
                b"",
            ),
        );
        if expect_ok {
            assert_eq!(code, 0, "test --tenant {name}:\n{text}");
        } else {
            assert_eq!(code, 69, "test --tenant bad must fail:\n{text}");
        }
    }
    record(
        "test (no --to)",
        run(&config, &["test", "--tenant", "pw"], b""),
    );
    record("archive usage", run(&config, &["archive", "usage"], b""));
    record(
        "archive usage --format json",
        run(&config, &["archive", "usage", "--format", "json"], b""),
    );
    record("archive verify", run(&config, &["archive", "verify"], b""));
    record(
        "archive verify --json",
        run(&config, &["archive", "verify", "--json"], b""),
    );
    record(
        "archive prune",
        run(
            &config,
            &[
                "archive",
                "prune",
                "--tenant",
                "pw",
                "--before",
                "2000-01-01",
            ],
            b"",
        ),
    );
    record(
        "oauth login --tenant pw",
        run(&config, &["oauth", "login", "--tenant", "pw"], b""),
    );
    record("sendmail -bp", run(&config, &["sendmail", "-bp"], b""));
    let mailq = daemon.dir().join("mailq");
    std::os::unix::fs::symlink(PBXMAIL, &mailq).expect("mailq symlink");
    record("(as mailq)", run_program(&mailq, &config, &[], b""));
    record("--help", run(&config, &["--help"], b""));
    record("(no arguments)", run(&config, &[], b""));
    record("no-such-command", run(&config, &["no-such-command"], b""));
    record(
        "check-config -c",
        run(&config, &["check-config", "-c", &config_arg], b""),
    );

    // Broken configs: the problem on (or next to) a password line is named,
    // its value never echoed.
    let base = daemon_section(&daemon);
    let pw_head = format!(
        "[tenant:pw]\ndomains = pw.test\nrelay = localhost:{}\ntls = starttls\nca_file = {}\nusername = {PW_USER}\n",
        pw_server.port(),
        ca_file.display()
    );
    let non_utf8 = daemon.dir().join("non-utf8.secret");
    let mut bytes = PF_PASSWORD.as_bytes().to_vec();
    bytes.extend_from_slice(b"\xff\xfe\n");
    fs::write(&non_utf8, bytes).expect("write non-UTF-8 secret");
    let two_lines = daemon.write_file("two-lines.secret", &format!("{PF_PASSWORD}\nsecond line\n"));
    let broken: Vec<(&str, String)> = vec![
        (
            "trailing backslash",
            format!("{base}{pw_head}password = {PW_PASSWORD}\\\n"),
        ),
        (
            "duplicate password key",
            format!("{base}{pw_head}password = {PW_PASSWORD}\npassword = {DUP_PASSWORD}\n"),
        ),
        (
            "password line without key",
            format!("{base}{pw_head}{PW_PASSWORD}\n"),
        ),
        (
            "password with a colon on a line without key",
            format!("{base}{pw_head}{BARE_PASSWORD}\n"),
        ),
        (
            "password and password_file",
            format!(
                "{base}{pw_head}password = {PW_PASSWORD}\npassword_file = {}\n",
                secret_file.display()
            ),
        ),
        (
            "misspelled key",
            format!("{base}{pw_head}pasword = {PW_PASSWORD}\n"),
        ),
        (
            "password in [daemon]",
            format!(
                "{}\npassword = {PW_PASSWORD}\n\n{pw_head}password = {PW_PASSWORD}\n",
                base.trim_end()
            ),
        ),
        (
            "password without username",
            format!(
                "{base}[tenant:pw]\ndomains = pw.test\nrelay = localhost:{}\npassword = {PW_PASSWORD}\n",
                pw_server.port()
            ),
        ),
        (
            "password with auth = none",
            format!("{base}{pw_head}auth = none\npassword = {PW_PASSWORD}\n"),
        ),
        (
            "password with tls = none",
            format!(
                "{base}[tenant:pw]\ndomains = pw.test\nrelay = localhost:{}\ntls = none\nusername = {PW_USER}\npassword = {PW_PASSWORD}\n",
                pw_server.port()
            ),
        ),
        (
            "password with = and : in it, then a bad value",
            format!("{base}{pw_head}password = {PW_PASSWORD}=x:y\nauth = bogus\n"),
        ),
        (
            "unclosed section before password",
            format!(
                "{base}[tenant:pw\ndomains = pw.test\npassword = {PW_PASSWORD}\n"
            ),
        ),
        (
            "password_file not UTF-8",
            format!("{base}{pw_head}password_file = {}\n", non_utf8.display()),
        ),
        (
            "password_file of two lines",
            format!("{base}{pw_head}password_file = {}\n", two_lines.display()),
        ),
    ];
    for (i, (what, text)) in broken.iter().enumerate() {
        let path = daemon.write_file(&format!("broken-{i}.ini"), text);
        let path_arg = path.display().to_string();
        // Some of these are accepted (auth = none, tls = none warn only);
        // the point is what is echoed, checked with everything else below.
        record(
            &format!("check-config -c broken-{i}.ini [{what}]"),
            run(&path, &["check-config", "-c", &path_arg], b""),
        );
    }
    // The duplicate one must really be refused, and name the key.
    let dup = daemon.dir().join("broken-1.ini");
    let (code, text) = run(
        &dup,
        &["check-config", "-c", &dup.display().to_string()],
        b"",
    );
    assert_eq!(code, 78, "duplicate password key:\n{text}");
    assert!(text.contains("password"), "{text}");
    let backslash = daemon.dir().join("broken-0.ini");
    let (code, text) = run(
        &backslash,
        &["check-config", "-c", &backslash.display().to_string()],
        b"",
    );
    assert_eq!(code, 78, "trailing backslash:\n{text}");

    // The daemon's own file broken on the password line: `reload` (the CLI
    // reads it first) and SIGHUP (the daemon reads it and logs the problems).
    let log_before = fs::read_to_string(daemon.dir().join("daemon.log")).unwrap_or_default();
    daemon.write_config(&format!(
        "{}{pw_head}password = {PW_PASSWORD}\npassword = {DUP_PASSWORD}\n",
        base
    ));
    let (code, text) = record(
        "reload [duplicate password]",
        run(&config, &["reload"], b""),
    );
    assert_ne!(code, 0, "reload of a broken file:\n{text}");
    daemon.write_config(&format!("{}{pw_head}password = {PW_PASSWORD}\\\n", base));
    let (code, text) = record(
        "reload [trailing backslash]",
        run(&config, &["reload"], b""),
    );
    assert_ne!(code, 0, "reload of a broken file:\n{text}");
    running.reload();
    let logged = wait_until(Duration::from_secs(4), || {
        let log = fs::read_to_string(daemon.dir().join("daemon.log")).unwrap_or_default();
        log.len() > log_before.len() && log[log_before.len()..].contains("password")
    });
    // Back to the good file for the commands that follow and the shutdown.
    daemon.write_config(&good_config);
    let (code, text) = record(
        &format!("delete {bad_id}"),
        run(&config, &["delete", &bad_id], b""),
    );
    assert_eq!(code, 0, "{text}");

    running.stop();
    let log = fs::read_to_string(daemon.dir().join("daemon.log")).unwrap_or_default();
    assert!(
        logged,
        "the daemon did not log the refused reload (naming the password key):\n{log}"
    );
    assert!(!log.is_empty(), "the daemon logged nothing");
    // Trace level really was on: something below info made it to the log.
    assert!(
        log.lines()
            .any(|l| l.contains("TRACE") || l.contains("DEBUG") || l.contains("<7>")),
        "no debug/trace lines in the daemon log:\n{log}"
    );
    record("queue (daemon stopped)", run(&config, &["queue"], b""));
    record("status (daemon stopped)", run(&config, &["status"], b""));

    let mut everything = outputs;
    everything.push(Output {
        label: "daemon log (trace)".to_string(),
        text: log,
    });
    files_under(daemon.spool_dir(), &mut everything);
    files_under(&daemon.dir().join("archive"), &mut everything);

    assert!(
        everything.len() > 40,
        "expected every command's output to be collected"
    );
    assert_no_leaks(&everything);
    // The relays' transcripts show the secrets did go where they belong, so
    // the search above was looking for strings that exist.
    let sent = pw_server
        .commands()
        .iter()
        .any(|(_, c)| c.contains(&STANDARD.encode(format!("\0{PW_USER}\0{PW_PASSWORD}"))));
    assert!(sent, "pw's AUTH PLAIN: {:?}", pw_server.commands());
    let sent = pf_server
        .commands()
        .iter()
        .any(|(_, c)| c.contains(&STANDARD.encode(PF_PASSWORD)));
    assert!(sent, "pf's AUTH LOGIN: {:?}", pf_server.commands());
}
