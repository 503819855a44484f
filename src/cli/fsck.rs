//! `pbxmail fsck [--json]`: checks every spool entry (envelope records with
//! their CRC32C, the message file's SHA-256), moves damaged entries and stray
//! files to quarantine, never deletes. Exit 1 when it found problems.

use super::{load_config, take_config_flag, Exit};
use crate::spool::Spool;
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
struct Report {
    /// Entries examined (one per envelope).
    checked: usize,
    ok: usize,
    /// What this run moved to quarantine.
    quarantined: Vec<Finding>,
    /// Entries quarantined before this run, still waiting for an admin.
    already_quarantined: usize,
}

#[derive(Debug, Serialize)]
struct Finding {
    tenant: String,
    id: String,
    reason: String,
}

pub fn run(args: &[String]) -> Exit {
    let (path, rest) = match take_config_flag(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pbxmail fsck: {e}");
            return Exit::Usage;
        }
    };
    let mut json = false;
    for arg in &rest {
        match arg.as_str() {
            "--json" => json = true,
            other => {
                eprintln!("pbxmail fsck: unknown argument '{other}'");
                return Exit::Usage;
            }
        }
    }
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let spool = Spool::new(&config.daemon.spool_dir);
    let report = match check(&spool) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("pbxmail fsck: cannot read the spool: {e}");
            return Exit::TempFail;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("pbxmail fsck: {e}");
                return Exit::Software;
            }
        }
    } else {
        for f in &report.quarantined {
            println!("quarantined {} {}: {}", f.tenant, f.id, f.reason);
        }
        println!(
            "{} checked, {} ok, {} quarantined now, {} quarantined before",
            report.checked,
            report.ok,
            report.quarantined.len(),
            report.already_quarantined
        );
    }
    if report.quarantined.is_empty() {
        Exit::Ok
    } else {
        Exit::Problems
    }
}

fn check(spool: &Spool) -> Result<Report, crate::spool::SpoolError> {
    let mut report = Report {
        already_quarantined: spool.quarantined()?.len(),
        ..Report::default()
    };
    for tenant in spool.tenants()? {
        for id in spool.message_ids(&tenant)? {
            report.checked += 1;
            match spool.verify(&tenant, &id) {
                Ok(()) => report.ok += 1,
                Err(reason) => {
                    spool.quarantine(&tenant, &id, &reason)?;
                    report.quarantined.push(Finding {
                        tenant: tenant.clone(),
                        id: id.to_string(),
                        reason,
                    });
                }
            }
        }
        for stray in spool.stray_files(&tenant)? {
            let name = stray
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let reason = "not a spool file (unknown name or type)".to_string();
            spool.quarantine_stray(&tenant, &stray, &reason)?;
            report.quarantined.push(Finding {
                tenant: tenant.clone(),
                id: format!("stray.{name}"),
                reason,
            });
        }
    }
    Ok(report)
}
