//! `pbxmail daemon`: sets up logging and the open-file limit, and runs the
//! daemon in the foreground.

use super::{Exit, Invocation};
use crate::base::text::printable;
use std::io::Write;

pub fn run(args: &[String]) -> Exit {
    Invocation::run("daemon", args, daemon)
}

fn daemon(cmd: &Invocation) -> Result<Exit, Exit> {
    cmd.no_arguments()?;
    let config = cmd.config()?;
    init_logging(config.daemon.log_level);
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    raise_open_file_limit();
    match crate::daemon::run(config) {
        Ok(()) => Ok(Exit::Ok),
        Err(e) => {
            log::error!("{e}");
            Ok(Exit::Software)
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one: each tenant sending holds
/// a relay socket and spool files, and the soft default (often 1,024) is
/// far below what many tenants at once need, while the hard limit is what
/// the admin granted. Nothing to do when they are equal (the systemd unit's
/// `LimitNOFILE=` sets both); a refusal leaves the soft limit and is logged,
/// never fatal.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    let (soft, hard) = (show(limit.current), show(limit.maximum));
    // An unlimited hard limit cannot be the soft one (Linux caps open files
    // at fs.nr_open and refuses RLIM_INFINITY), so the soft limit stays.
    if limit.current == limit.maximum || limit.maximum.is_none() {
        log::debug!("open file limit: {soft} (hard {hard})");
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => log::debug!("open file limit: raised from {soft} to the hard limit {hard}"),
        Err(e) => log::warn!(
            "open file limit stays {soft}: raising it to the hard limit {hard} failed: {e}; \
             set LimitNOFILE= in the unit or ulimit -n before the start"
        ),
    }
}

/// The journal adds its own timestamps; a terminal or file gets ours.
fn init_logging(level: log::LevelFilter) {
    let under_journal = stderr_is_the_journal();
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(spec) = std::env::var("PBXMAIL_LOG") {
        builder.parse_filters(&spec);
    }
    builder.format(move |out, record| {
        // Log lines quote relays and files: their control characters are
        // escaped, so none can forge a line or drive a terminal.
        let text = record.args().to_string();
        let text = printable(&text);
        if under_journal {
            writeln!(out, "{}: {text}", record.level())
        } else {
            let stamp = crate::base::time::rfc3339(crate::base::clock::now_secs());
            writeln!(out, "{stamp} {}: {text}", record.level())
        }
    });
    builder.init();
}

/// Whether stderr is the journal's stream: systemd sets JOURNAL_STREAM to
/// its `device:inode`, and a child whose stderr was redirected elsewhere
/// inherits the variable, so it is compared, not just looked for.
fn stderr_is_the_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(stat) => stat.st_dev == device && stat.st_ino == inode,
        Err(_) => false,
    }
}
