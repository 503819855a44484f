//! `pbxmail fsck [--json]`: checks every spool entry (envelope records with
//! their CRC32C, the message file's SHA-256), moves damaged entries, orphaned
//! message files and stray files to quarantine, never deletes, and lists
//! everything in quarantine. Exit 1 when it found problems.

use super::{Exit, Invocation};
use crate::base::text::printable;
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
    /// Everything in quarantine after this run, with or without a reason.
    in_quarantine: Vec<Finding>,
    /// Entries that could not be checked now (EMFILE, EIO...): no verdict,
    /// never quarantined for it; run fsck again.
    unchecked: Vec<Finding>,
}

#[derive(Debug, Serialize)]
struct Finding {
    tenant: String,
    id: String,
    reason: String,
}

pub fn run(args: &[String]) -> Exit {
    Invocation::run("fsck", args, fsck)
}

fn fsck(cmd: &Invocation) -> Result<Exit, Exit> {
    let json = cmd.parse(parse)?;
    let config = cmd.config()?;
    let spool = Spool::new(&config.daemon.spool_dir);
    let report = check(&spool)
        .map_err(|e| cmd.fail(Exit::TempFail, format!("cannot read the spool: {e}")))?;
    if json {
        cmd.print_json(&report)?;
    } else {
        for f in &report.in_quarantine {
            println!(
                "in quarantine {} {}: {}",
                printable(&f.tenant),
                printable(&f.id),
                printable(&f.reason)
            );
        }
        for f in &report.unchecked {
            println!(
                "cannot check {} {} now: {}",
                f.tenant,
                f.id,
                printable(&f.reason)
            );
        }
        for f in &report.quarantined {
            // A stray's name comes from the disk: escaped for the terminal.
            println!(
                "quarantined {} {}: {}",
                f.tenant,
                printable(&f.id),
                printable(&f.reason)
            );
        }
        println!(
            "{} checked, {} ok, {} quarantined now, {} quarantined before",
            report.checked,
            report.ok,
            report.quarantined.len(),
            report.already_quarantined
        );
    }
    Ok(
        if report.quarantined.is_empty() && report.unchecked.is_empty() {
            Exit::Ok
        } else {
            Exit::Problems
        },
    )
}

/// `[--json]`: whether the report is JSON.
fn parse(args: &[String]) -> Result<bool, String> {
    let mut json = false;
    for arg in args {
        match arg.as_str() {
            "--json" => json = true,
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(json)
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
                Ok(None) => report.ok += 1,
                // Removed by the daemon since the listing.
                Err(e) if e.is_not_found() => report.ok += 1,
                Err(e) => report.unchecked.push(Finding {
                    tenant: tenant.to_string(),
                    id: id.to_string(),
                    reason: e.to_string(),
                }),
                Ok(Some(reason)) => {
                    spool.quarantine(&tenant, &id, &reason)?;
                    report.quarantined.push(Finding {
                        tenant: tenant.to_string(),
                        id: id.to_string(),
                        reason,
                    });
                }
            }
        }
        // Committed, then the envelope was lost: kept, with the reason.
        for id in spool.sweep_unpaired(&tenant)?.orphans {
            let reason = crate::spool::recovery::ORPHAN_REASON.to_string();
            spool.quarantine(&tenant, &id, &reason)?;
            report.quarantined.push(Finding {
                tenant: tenant.to_string(),
                id: id.to_string(),
                reason,
            });
        }
        for stray in spool.stray_files(&tenant)? {
            let name = stray
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let reason = "not a spool file (unknown name or type)".to_string();
            spool.quarantine_stray(&tenant, &stray, &reason)?;
            report.quarantined.push(Finding {
                tenant: tenant.to_string(),
                id: format!("stray.{name}"),
                reason,
            });
        }
    }
    report.in_quarantine = spool
        .quarantined()?
        .into_iter()
        .map(|q| Finding {
            tenant: q.tenant,
            id: q.id,
            reason: q.reason,
        })
        .collect();
    Ok(report)
}
