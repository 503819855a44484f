//! `pbxmail daemon`: sets up logging and runs the daemon in the foreground.

use super::{load_config, take_config_flag, Exit};
use std::io::Write;

pub fn run(args: &[String]) -> Exit {
    let (path, rest) = match take_config_flag(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pbxmail daemon: {e}");
            return Exit::Usage;
        }
    };
    if let Some(extra) = rest.first() {
        eprintln!("pbxmail daemon: unexpected argument '{extra}'");
        return Exit::Usage;
    }
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logging(config.daemon.log_level);
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    match crate::daemon::run(config) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            log::error!("{e}");
            Exit::Software
        }
    }
}

/// The journal adds its own timestamps; a terminal or file gets ours.
fn init_logging(level: log::LevelFilter) {
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(spec) = std::env::var("PBXMAIL_LOG") {
        builder.parse_filters(&spec);
    }
    builder.format(move |out, record| {
        if under_journal {
            writeln!(out, "{}: {}", record.level(), record.args())
        } else {
            let now = crate::spool::unix_millis();
            let stamp = crate::time::rfc3339(now / 1000);
            writeln!(out, "{stamp} {}: {}", record.level(), record.args())
        }
    });
    builder.init();
}
