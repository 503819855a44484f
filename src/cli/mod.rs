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

use crate::base::text::printable_lines;
use crate::config::{self, Config, TenantConfig};
use serde::Serialize;
use std::fmt::Display;
use std::path::{Path, PathBuf};

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

/// The refusal of a `--tenant` given last, without its name.
const NEEDS_TENANT: &str = "--tenant needs a tenant name";

/// One run of a subcommand that reads the configuration. The prelude every
/// such command shares lives here, once: `-c FILE` / `--config FILE` taken
/// out of the arguments, the rest handed to the command's own parser, the
/// configuration loaded, the tenant looked up, and each of their failures
/// printed as `pbxmail NAME: …` with the exit code the interface gives it.
///
/// A command is `fn body(cmd: &Invocation) -> Result<Exit, Exit>`, where an
/// `Err` is a failure already printed; `Invocation::run` turns either side
/// into the process's exit code.
pub(super) struct Invocation {
    /// The command as its messages name it: `fsck`, `oauth`, `status`, …
    name: String,
    config_path: PathBuf,
    /// The arguments after the config flag was taken out, for the command's parser.
    rest: Vec<String>,
}

impl Invocation {
    /// Runs `body` for `pbxmail NAME ARGS…`; a config flag without its file
    /// is a usage error and `body` does not run.
    pub(super) fn run(
        name: &str,
        args: &[String],
        body: impl FnOnce(&Invocation) -> Result<Exit, Exit>,
    ) -> Exit {
        let outcome = match take_config_flag(args) {
            Ok((config_path, rest)) => body(&Invocation {
                name: name.to_owned(),
                config_path,
                rest,
            }),
            Err(e) => Err(usage_error(name, e)),
        };
        outcome.unwrap_or_else(|code| code)
    }

    pub(super) fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The arguments left after the config flag.
    pub(super) fn rest(&self) -> &[String] {
        &self.rest
    }

    /// Prints `pbxmail NAME: what` and gives `code`, for the caller to return.
    pub(super) fn fail(&self, code: Exit, what: impl Display) -> Exit {
        fail(&self.name, code, what)
    }

    /// The command's own options from the arguments left; a refusal is a
    /// usage error, its text after the command's name.
    pub(super) fn parse<T>(
        &self,
        parse: impl FnOnce(&[String]) -> Result<T, String>,
    ) -> Result<T, Exit> {
        parse(&self.rest).map_err(|e| usage_error(&self.name, e))
    }

    /// For a command that takes nothing but the config flag.
    pub(super) fn no_arguments(&self) -> Result<(), Exit> {
        match self.rest.first() {
            Some(extra) => Err(usage_error(
                &self.name,
                format!("unexpected argument '{extra}'"),
            )),
            None => Ok(()),
        }
    }

    /// The configuration; its problems are printed as FILE:LINE: message.
    pub(super) fn config(&self) -> Result<Config, Exit> {
        load_config(&self.config_path)
    }

    /// The tenant named on the command line.
    pub(super) fn tenant<'c>(
        &self,
        config: &'c Config,
        name: &str,
    ) -> Result<&'c TenantConfig, Exit> {
        find_tenant(config, name, &self.name)
    }

    /// Prints `value` as the pretty JSON of `--json`.
    pub(super) fn print_json(&self, value: &impl Serialize) -> Result<(), Exit> {
        let text = serde_json::to_string_pretty(value).map_err(|e| self.fail(Exit::Software, e))?;
        println!("{text}");
        Ok(())
    }
}

/// A command's own arguments one at a time, and the value a flag takes
/// from the argument after it.
pub(super) struct Flags<'a> {
    args: std::slice::Iter<'a, String>,
    /// The argument `next` gave last, for the message when its value is missing.
    flag: &'a str,
}

impl<'a> Flags<'a> {
    pub(super) fn new(args: &'a [String]) -> Self {
        Flags {
            args: args.iter(),
            flag: "",
        }
    }

    /// The value of the flag just read; `FLAG needs a value` when none follows.
    pub(super) fn value(&mut self) -> Result<String, String> {
        let missing = format!("{} needs a value", self.flag);
        self.value_else(&missing)
    }

    /// The value of the flag just read, else the refusal `missing`.
    pub(super) fn value_else(&mut self, missing: &str) -> Result<String, String> {
        self.args.next().cloned().ok_or_else(|| missing.to_owned())
    }
}

impl<'a> Iterator for Flags<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let arg = self.args.next()?;
        self.flag = arg;
        Some(arg)
    }
}

/// Prints `pbxmail COMMAND: what` and gives `code`: the form of every
/// failure a command reports.
fn fail(command: &str, code: Exit, what: impl Display) -> Exit {
    // `what` may quote the daemon, a relay or a file: escaped for the terminal.
    eprintln!("pbxmail {command}: {}", printable_lines(&what.to_string()));
    code
}

fn usage_error(command: &str, what: impl Display) -> Exit {
    fail(command, Exit::Usage, what)
}

/// Takes `-c FILE` / `--config FILE` out of `args`; the rest is returned.
fn take_config_flag(args: &[String]) -> Result<(PathBuf, Vec<String>), String> {
    let mut path = None;
    let mut rest = Vec::new();
    let mut flags = Flags::new(args);
    while let Some(arg) = flags.next() {
        match arg {
            "-c" | "--config" => {
                let value = flags.value_else(&format!("{arg} needs a file name"))?;
                path = Some(PathBuf::from(value));
            }
            _ => rest.push(arg.to_owned()),
        }
    }
    Ok((path.unwrap_or_else(config::default_path), rest))
}

/// Loads the configuration, printing every problem as FILE:LINE: message.
fn load_config(path: &Path) -> Result<Config, Exit> {
    config::load(path).map_err(|e| {
        for problem in &e.problems {
            eprintln!("{problem}");
        }
        Exit::Config
    })
}

/// The tenant named on the command line, or the message and exit code for its absence.
fn find_tenant<'a>(
    config: &'a Config,
    name: &str,
    command: &str,
) -> Result<&'a TenantConfig, Exit> {
    config
        .tenants
        .iter()
        .find(|t| t.name.as_str() == name)
        .ok_or_else(|| {
            let what = format!("no tenant named {name:?} in {}", config.path.display());
            usage_error(command, what)
        })
}

/// Test arguments as the command line gives them.
#[cfg(test)]
fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_flag_is_taken_out_wherever_it_stands() {
        let (path, rest) = take_config_flag(&args(&["--json", "-c", "/x.ini", "ID"])).unwrap();
        assert_eq!(path, PathBuf::from("/x.ini"));
        assert_eq!(rest, args(&["--json", "ID"]));
        let (_, rest) = take_config_flag(&args(&["--config", "/y.ini"])).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            take_config_flag(&args(&["--config"])),
            Err("--config needs a file name".to_owned())
        );
    }

    #[test]
    fn a_flag_without_its_value_is_named_in_the_refusal() {
        let list = args(&["--tenant", "acme", "--month"]);
        let mut flags = Flags::new(&list);
        assert_eq!(flags.next(), Some("--tenant"));
        assert_eq!(flags.value(), Ok("acme".to_owned()));
        assert_eq!(flags.next(), Some("--month"));
        assert_eq!(flags.value(), Err("--month needs a value".to_owned()));
        assert_eq!(flags.next(), None);
        let list = args(&["--tenant"]);
        let mut flags = Flags::new(&list);
        flags.next();
        assert_eq!(flags.value_else(NEEDS_TENANT), Err(NEEDS_TENANT.to_owned()));
    }

    #[test]
    fn the_prelude_gives_usage_for_bad_arguments_and_the_body_its_own_code() {
        let ran = |list: &[&str]| {
            Invocation::run("fsck", &args(list), |cmd| {
                cmd.no_arguments()?;
                Ok(Exit::Problems)
            })
        };
        assert_eq!(ran(&["-c"]), Exit::Usage);
        assert_eq!(ran(&["-c", "/x.ini", "extra"]), Exit::Usage);
        assert_eq!(ran(&["-c", "/x.ini"]), Exit::Problems);
        let parsed = Invocation::run("queue", &args(&["--bogus"]), |cmd| {
            cmd.parse(|rest| Err::<(), _>(format!("unknown argument '{}'", rest[0])))?;
            Ok(Exit::Ok)
        });
        assert_eq!(parsed, Exit::Usage);
    }

    #[test]
    fn a_missing_config_file_is_a_config_error() {
        let missing = std::env::temp_dir().join(format!(
            "pbxmail-cli-{}-absent/pbxmail.ini",
            std::process::id()
        ));
        let code = Invocation::run(
            "check-config",
            &args(&["-c", missing.to_str().unwrap()]),
            |cmd| cmd.config().map(|_| Exit::Ok),
        );
        assert_eq!(code, Exit::Config);
    }
}
