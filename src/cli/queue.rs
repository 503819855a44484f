//! `pbxmail queue` / `mailq`: lists the spool directly, so it works with the
//! daemon stopped. `--json` gives the interface's shape.

use super::{Exit, Flags, Invocation, NEEDS_TENANT};
use crate::base::text::printable;
use crate::base::time::rfc3339;
use crate::spool::envelope::RcptStatus;
use crate::spool::Spool;
use serde::Serialize;

#[derive(Debug, Serialize)]
struct QueueEntry {
    id: String,
    tenant: String,
    /// False when no `[tenant:NAME]` section names the tenant any more (it
    /// was removed): the mail waits, unsent, until the tenant comes back.
    tenant_configured: bool,
    sender: String,
    /// Recipients not yet delivered.
    recipients: Vec<String>,
    size: u64,
    queued_at: String,
    state: &'static str,
    attempts: u32,
    next_attempt: Option<String>,
    last_error: Option<String>,
}

pub fn run(args: &[String]) -> Exit {
    Invocation::run("queue", args, queue)
}

fn queue(cmd: &Invocation) -> Result<Exit, Exit> {
    let options = cmd.parse(Options::parse)?;
    let config = cmd.config()?;
    let spool = Spool::new(&config.daemon.spool_dir);
    let mut entries = collect(&spool, options.tenant.as_deref())
        .map_err(|e| cmd.fail(Exit::TempFail, format!("cannot read the spool: {e}")))?;
    for entry in &mut entries {
        entry.tenant_configured = config
            .tenants
            .iter()
            .any(|t| t.name.as_str() == entry.tenant);
        if !entry.tenant_configured {
            entry.next_attempt = None;
        }
    }
    if options.json {
        cmd.print_json(&entries)?;
    } else {
        print_table(&entries);
    }
    Ok(Exit::Ok)
}

/// `[--tenant T] [--json]`.
#[derive(Default)]
struct Options {
    tenant: Option<String>,
    json: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options::default();
        let mut flags = Flags::new(args);
        while let Some(arg) = flags.next() {
            match arg {
                "--json" => o.json = true,
                "--tenant" => o.tenant = Some(flags.value_else(NEEDS_TENANT)?),
                other => return Err(format!("unknown argument '{other}'")),
            }
        }
        Ok(o)
    }
}

fn collect(
    spool: &Spool,
    only_tenant: Option<&str>,
) -> Result<Vec<QueueEntry>, crate::spool::SpoolError> {
    let mut entries = Vec::new();
    for tenant in spool.tenants()? {
        if only_tenant.is_some_and(|t| t != tenant.as_str()) {
            continue;
        }
        for id in spool.message_ids(&tenant)? {
            let entry = match spool.load_envelope(&tenant, &id) {
                // Delivered (or bounced) and about to be removed: no longer queued.
                Ok(env) if env.is_done() && (!env.any_failed() || env.bounced_as.is_some()) => {
                    continue
                }
                Ok(env) => {
                    let state = if env.is_done() && env.any_failed() {
                        "failed"
                    } else if env.held {
                        "held"
                    } else if env.attempts == 0 {
                        "queued"
                    } else {
                        "deferred"
                    };
                    QueueEntry {
                        id: id.to_string(),
                        tenant: tenant.to_string(),
                        tenant_configured: true,
                        sender: env.sender.clone(),
                        recipients: env
                            .recipients
                            .iter()
                            .filter(|r| r.status != RcptStatus::Sent)
                            .map(|r| r.address.clone())
                            .collect(),
                        size: env.size,
                        queued_at: rfc3339(env.queued_at_ms / 1000),
                        state,
                        attempts: env.attempts,
                        next_attempt: env
                            .next_attempt_ms
                            .filter(|_| state == "deferred")
                            .map(|ms| rfc3339(ms / 1000)),
                        last_error: env.last_error.clone(),
                    }
                }
                // Removed by the daemon between listing and reading: delivered.
                Err(e) if e.is_not_found() => continue,
                Err(e) => QueueEntry {
                    id: id.to_string(),
                    tenant: tenant.to_string(),
                    tenant_configured: true,
                    sender: String::new(),
                    recipients: Vec::new(),
                    size: 0,
                    queued_at: String::new(),
                    state: "failed",
                    attempts: 0,
                    next_attempt: None,
                    last_error: Some(e.to_string()),
                },
            };
            entries.push(entry);
        }
    }
    // Damaged entries stay visible: an admin must see what was not sent.
    for q in spool.quarantined()? {
        if only_tenant.is_some_and(|t| t != q.tenant) {
            continue;
        }
        let env = q.envelope.as_ref();
        entries.push(QueueEntry {
            id: q.id.clone(),
            tenant: q.tenant.clone(),
            tenant_configured: true,
            sender: env.map(|e| e.sender.clone()).unwrap_or_default(),
            recipients: env
                .map(|e| {
                    e.recipients
                        .iter()
                        .filter(|r| r.status != RcptStatus::Sent)
                        .map(|r| r.address.clone())
                        .collect()
                })
                .unwrap_or_default(),
            size: env.map_or(0, |e| e.size),
            queued_at: env
                .map(|e| rfc3339(e.queued_at_ms / 1000))
                .unwrap_or_default(),
            state: "failed",
            attempts: env.map_or(0, |e| e.attempts),
            next_attempt: None,
            last_error: Some(format!("quarantined: {}", q.reason)),
        });
    }
    Ok(entries)
}

fn print_table(entries: &[QueueEntry]) {
    print!("{}", table(entries));
}

/// The human listing. Sender, recipients and the last error come from the
/// envelope, the error from a relay's reply: control characters in them are
/// escaped, so a hostile relay cannot draw on the admin's terminal.
fn table(entries: &[QueueEntry]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if entries.is_empty() {
        out.push_str("Mail queue is empty\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<9} {:<16} {:>9}  {:<20}  SENDER -> RECIPIENTS",
        "ID", "STATE", "TENANT", "SIZE", "QUEUED"
    );
    for e in entries {
        let sender = if e.sender.is_empty() {
            "<>"
        } else {
            e.sender.as_str()
        };
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:<16} {:>9}  {:<20}  {} -> {}",
            e.id,
            e.state,
            e.tenant,
            e.size,
            e.queued_at,
            printable(sender),
            printable(&e.recipients.join(", "))
        );
        if !e.tenant_configured {
            let _ = writeln!(
                out,
                "{:<24} no tenant: [tenant:{}] is not in the configuration; kept, unsent, until it is",
                "", e.tenant
            );
        }
        if let Some(error) = &e.last_error {
            let _ = writeln!(out, "{:<24} last error: {}", "", printable(error));
        }
    }
    let _ = writeln!(out, "-- {} messages", entries.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::names::TenantName;
    use crate::spool::envelope::{RcptResult, Record};
    use std::io::Write;

    #[test]
    fn relay_text_with_esc_and_cr_in_the_last_error_is_shown_escaped() {
        let dir = std::env::temp_dir().join(format!("pbxmail-queue-escape-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::new(&dir);
        spool.create_layout().unwrap();
        let acme = TenantName::parse("acme").unwrap();
        let mut submission = spool.begin_submission().unwrap();
        submission.write_all(b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let id = submission
            .commit(&acme, "a@acme.test", &["b@x.test".to_string()])
            .unwrap();
        let hostile = "451 4.3.0 try later\r\x1b[1A\x1b[2K\x1b[32m250 2.0.0 status=sent\x1b[0m";
        let deferred = Record::Attempt {
            at_ms: 1,
            results: vec![RcptResult {
                rcpt: 0,
                status: RcptStatus::Pending,
                reply: hostile.into(),
            }],
            next_attempt_ms: Some(2),
            error: Some(hostile.into()),
        };
        spool.append(&acme, &id, &deferred).unwrap();

        let entries = collect(&spool, None).unwrap();
        let shown = table(&entries);
        assert!(
            !shown.contains('\x1b') && !shown.contains('\r'),
            "{shown:?}"
        );
        assert!(
            shown.contains(
                "last error: 451 4.3.0 try later\\r\\x1b[1A\\x1b[2K\\x1b[32m250 2.0.0 status=sent\\x1b[0m"
            ),
            "{shown}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
