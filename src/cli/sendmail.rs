//! `sendmail` options (the interface's compatible subset) → intake::sendmail.
//! Exit 0 only once the message is on stable storage.

use super::{load_config, Exit};
use crate::intake::sendmail::{submit, SubmitError, SubmitOptions};
use std::path::PathBuf;

enum Mode {
    Deliver,
    ListQueue,
    Flush,
}

pub fn run(args: &[String]) -> Exit {
    let mut opts = SubmitOptions {
        dot_terminates: true,
        ..SubmitOptions::default()
    };
    let mut mode = Mode::Deliver;
    let mut config_path = None;
    let mut verbose = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value_of = |flag: &str, attached: &str| -> Result<String, Exit> {
            if !attached.is_empty() {
                return Ok(attached.to_string());
            }
            iter.next().cloned().ok_or_else(|| {
                eprintln!("sendmail: option {flag} needs a value");
                Exit::Usage
            })
        };
        match arg.as_str() {
            "--" => {
                opts.recipients.extend(iter.by_ref().cloned());
                break;
            }
            "-t" => opts.recipients_from_headers = true,
            "-i" | "-oi" => opts.dot_terminates = false,
            "-bm" => mode = Mode::Deliver,
            "-bp" => mode = Mode::ListQueue,
            "-q" => mode = Mode::Flush,
            "-v" => verbose = true,
            "-odb" | "-odi" | "-odq" | "-oem" | "-oep" => {}
            a if a.starts_with("-f") || a.starts_with("-r") => {
                let flag = if a.starts_with("-r") { "-r" } else { "-f" };
                match value_of(flag, a.get(2..).unwrap_or_default()) {
                    Ok(v) => opts.sender = Some(v),
                    Err(code) => return code,
                }
            }
            a if a.starts_with("-F") => match value_of("-F", a.get(2..).unwrap_or_default()) {
                Ok(v) => opts.full_name = Some(v),
                Err(code) => return code,
            },
            a if a.starts_with("-C") => match value_of("-C", a.get(2..).unwrap_or_default()) {
                Ok(v) => config_path = Some(PathBuf::from(v)),
                Err(code) => return code,
            },
            a if a.starts_with('-') && a.len() > 1 => {
                eprintln!("sendmail: unknown option {a}");
                return Exit::Usage;
            }
            recipient => opts.recipients.push(recipient.to_string()),
        }
    }
    match mode {
        Mode::ListQueue => return super::queue::run(&config_args(config_path.as_ref())),
        Mode::Flush => return super::admin::run("flush", &config_args(config_path.as_ref())),
        Mode::Deliver => {}
    }

    let path = config_path.unwrap_or_else(crate::config::default_path);
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let stdin = std::io::stdin().lock();
    match submit(&config, &opts, stdin) {
        Ok(done) => {
            if verbose {
                eprintln!("sendmail: queued as {} for tenant {}", done.id, done.tenant);
            }
            Exit::Ok
        }
        Err(e @ SubmitError::Data(_)) => {
            eprintln!("sendmail: {e}");
            Exit::DataErr
        }
        Err(e @ SubmitError::TempFail(_)) => {
            eprintln!("sendmail: {e}");
            Exit::TempFail
        }
    }
}

/// `-C FILE` handed on to queue and flush as their `-c FILE`.
fn config_args(path: Option<&PathBuf>) -> Vec<String> {
    match path {
        Some(p) => vec!["-c".into(), p.display().to_string()],
        None => Vec::new(),
    }
}
