//! Demo relay targets for `make demo`: runs the integration tests' SMTP server
//! as `plain`, `starttls` (AUTH demo/demo-secret) and `implicit` on 127.0.0.1,
//! writes DIR/ca.pem and DIR/ports, and saves each message as DIR/<name>/<n>.eml
//! with a one-line summary on stdout. Runs until killed.
//!
//! Usage: cargo run --example smtp_sink -- --dir DIR

#[path = "../tests/support/observed.rs"]
mod observed;
#[allow(dead_code)]
#[path = "../tests/support/smtp_server.rs"]
mod smtp_server;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use smtp_server::{Received, ServerOptions, TestCa, TestServer, Tls};

fn main() -> ExitCode {
    let dir = match parse_args() {
        Ok(dir) => dir,
        Err(msg) => {
            eprintln!("smtp_sink: {msg}\nusage: smtp_sink --dir DIR");
            return ExitCode::from(64);
        }
    };
    let ca = TestCa::new();
    let servers = [
        ("plain", ServerOptions::default()),
        (
            "starttls",
            ServerOptions {
                tls: Tls::StartTls,
                require_auth: Some(("demo".to_string(), "demo-secret".to_string())),
                ..ServerOptions::default()
            },
        ),
        (
            "implicit",
            ServerOptions {
                tls: Tls::Implicit,
                ..ServerOptions::default()
            },
        ),
    ];
    let servers: Vec<(&str, TestServer)> = servers
        .into_iter()
        .map(|(name, opts)| (name, TestServer::start(opts, Some(&ca))))
        .collect();

    for (name, _) in &servers {
        fs::create_dir_all(dir.join(name)).expect("create message directory");
    }
    ca.write_ca_pem(&dir.join("ca.pem"));
    let ports: String = servers
        .iter()
        .map(|(name, server)| format!("{name}={}\n", server.port()))
        .collect();
    // Written under a temporary name and renamed, so a script polling for the
    // file never reads half of it.
    let tmp = dir.join("ports.tmp");
    fs::write(&tmp, &ports).expect("write ports");
    fs::rename(&tmp, dir.join("ports")).expect("rename ports");
    println!("sink ready: {}", ports.trim_end().replace('\n', " "));

    let threads: Vec<_> = servers
        .into_iter()
        .map(|(name, server)| {
            let out = dir.join(name);
            thread::Builder::new()
                .name(format!("sink:{name}"))
                .spawn(move || watch(name, &server, &out))
                .expect("spawn watcher")
        })
        .collect();
    for handle in threads {
        let _ = handle.join();
    }
    ExitCode::SUCCESS
}

fn parse_args() -> Result<PathBuf, String> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = Some(args.next().ok_or("--dir needs a value")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    dir.map(PathBuf::from)
        .ok_or_else(|| "--dir is required".to_string())
}

/// Saves and reports each new message as it arrives; never returns.
fn watch(name: &str, server: &TestServer, out: &Path) {
    let mut seen = 0;
    loop {
        let messages = server.wait_for_messages(seen + 1, Duration::from_secs(3600));
        for (n, message) in messages.iter().enumerate().skip(seen) {
            let path = out.join(format!("{}.eml", n + 1));
            if let Err(e) = fs::write(&path, &message.data) {
                eprintln!("sink {name}: cannot write {}: {e}", path.display());
            }
            println!("sink {name}: {}", summary(message));
        }
        seen = messages.len();
    }
}

fn summary(m: &Received) -> String {
    format!(
        "from=<{}> to=<{}> tls={} auth={} size={} subject={}",
        m.mail_from,
        m.rcpt_to.join(">,<"),
        if m.tls { "yes" } else { "no" },
        m.auth_user.as_deref().unwrap_or("-"),
        m.data.len(),
        subject(&m.data).unwrap_or_default(),
    )
}

/// The Subject header (unfolded) from the message's header block.
fn subject(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let mut found: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(s) = found.as_mut() {
                s.push(' ');
                s.push_str(line.trim());
            }
            continue;
        }
        if found.is_some() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("subject") {
                found = Some(value.trim().to_string());
            }
        }
    }
    found
}
