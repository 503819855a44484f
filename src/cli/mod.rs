//! Command line: picks the personality from argv[0] or the subcommand, and
//! maps every failure to a sysexits code (the interface's exit codes).

mod admin;
mod archive;
mod check_config;
mod daemon;
mod fsck;
mod oauth;
mod queue;
mod sendmail;
mod test;

use crate::config::{self, Config};
use std::path::PathBuf;

/// sysexits.h codes, as every sendmail-compatible program uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// A check found problems (fsck, archive verify).
    Problems = 1,
    Usage = 64,
    DataErr = 65,
    Unavailable = 69,
    Software = 70,
    TempFail = 75,
    Config = 78,
}

const USAGE: &str = "usage: pbxmail <command> [options]
commands:
  daemon [-c FILE]            run the delivery daemon in the foreground
  sendmail [opts] [rcpt...]   submit a message from stdin (also as `sendmail`)
  queue [--tenant T] [--json] list queued, deferred and failed mail (also as `mailq`)
  check-config [-c FILE]      validate the configuration
  fsck [--json]               verify every spool entry; quarantine damaged ones
  status [--json]             per-tenant state from the running daemon
  flush [--tenant T]          retry deferred mail now
  hold|release|delete ID...   queue control; --tenant T instead of IDs acts on a whole tenant
  reload                      re-read the configuration (same as SIGHUP)
  oauth login --tenant T [--flow device|code]
                              OAuth 2.0 sign-in for a tenant using auth = xoauth2
  archive verify [--tenant T] | prune --tenant T --before DATE | usage [--tenant T] [--month YYYY-MM] [--format csv|json]
  test --tenant T --to ADDR [--from ADDR]
                              one live session to the tenant's relay, with transcript
config: -c FILE, else $PBXMAIL_CONFIG, else /etc/pbxmail/pbxmail.ini";

pub fn run(args: Vec<String>) -> Exit {
    let program = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_default();
    let rest = args.get(1..).unwrap_or_default();
    // Installed setgid for submission only: everything else runs as the caller.
    let command = rest.first().map(String::as_str);
    let chosen_config = rest
        .iter()
        .any(|a| a.starts_with("-C") || a == "-c" || a == "--config")
        || std::env::var_os("PBXMAIL_CONFIG").is_some();
    if !crate::privilege::keeps_group(&program, command) || chosen_config {
        if let Err(e) = crate::privilege::drop_group() {
            eprintln!("pbxmail: cannot drop the setgid group: {e}");
            return Exit::Software;
        }
    }
    match program.as_str() {
        "sendmail" => return sendmail::run(rest),
        "mailq" => return queue::run(rest),
        _ => {}
    }
    let Some((command, rest)) = rest.split_first() else {
        eprintln!("{USAGE}");
        return Exit::Usage;
    };
    match command.as_str() {
        "daemon" => daemon::run(rest),
        "sendmail" => sendmail::run(rest),
        "queue" | "mailq" => queue::run(rest),
        "check-config" => check_config::run(rest),
        "fsck" => fsck::run(rest),
        "test" => test::run(rest),
        "oauth" => oauth::run(rest),
        "archive" => archive::run(rest),
        "status" | "flush" | "hold" | "release" | "delete" | "reload" => admin::run(command, rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Exit::Ok
        }
        other => {
            eprintln!("pbxmail: unknown command '{other}'\n{USAGE}");
            Exit::Usage
        }
    }
}

/// Takes `-c FILE` / `--config FILE` out of `args`; the rest is returned.
fn take_config_flag(args: &[String]) -> Result<(PathBuf, Vec<String>), String> {
    let mut path = None;
    let mut rest = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "-c" | "--config" => {
                let value = iter.next().ok_or(format!("{arg} needs a file name"))?;
                path = Some(PathBuf::from(value));
            }
            _ => rest.push(arg.clone()),
        }
    }
    Ok((path.unwrap_or_else(config::default_path), rest))
}

/// Loads the configuration, printing every problem as FILE:LINE: message.
fn load_config(path: &std::path::Path) -> Result<Config, Exit> {
    match config::load(path) {
        Ok(config) => Ok(config),
        Err(e) => {
            for problem in &e.problems {
                eprintln!("{problem}");
            }
            Err(Exit::Config)
        }
    }
}

/// The tenant named on the command line, or the message and exit code for its absence.
fn find_tenant<'a>(
    config: &'a Config,
    name: &str,
    command: &str,
) -> Result<&'a crate::config::TenantConfig, Exit> {
    config
        .tenants
        .iter()
        .find(|t| t.name.as_str() == name)
        .ok_or_else(|| {
            eprintln!(
                "pbxmail {command}: no tenant named {name:?} in {}",
                config.path.display()
            );
            Exit::Usage
        })
}
