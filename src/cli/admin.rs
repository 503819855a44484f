//! `pbxmail status | flush | hold | release | delete | reload`: talk to the
//! running daemon over its control socket. Exit 69 when it is not running.

use super::{Exit, Flags, Invocation, NEEDS_TENANT};
use crate::base::text::printable;
use crate::control::{self, CallError, Request, Response, Selection};

pub fn run(command: &str, args: &[String]) -> Exit {
    Invocation::run(command, args, |cmd| {
        let parsed = cmd.parse(|rest| parse(command, rest))?;
        let config = cmd.config()?;
        match control::call(&config.daemon.control_socket, &parsed.request) {
            Ok(response) => report(cmd, command, parsed.json, &response),
            Err(e @ CallError::NotRunning(_)) => Err(cmd.fail(Exit::Unavailable, e)),
            Err(e) => Err(cmd.fail(Exit::TempFail, e)),
        }
    })
}

pub struct Parsed {
    pub request: Request,
    pub json: bool,
}

/// Arguments → request: `--tenant T`, `--json` (status), IDs (hold, release, delete).
pub fn parse(command: &str, args: &[String]) -> Result<Parsed, String> {
    let mut tenant = None;
    let mut json = false;
    let mut ids = Vec::new();
    let mut flags = Flags::new(args);
    while let Some(arg) = flags.next() {
        match arg {
            "--tenant" => tenant = Some(flags.value_else(NEEDS_TENANT)?),
            "--json" if command == "status" => json = true,
            a if a.starts_with('-') => return Err(format!("unknown option {a}")),
            id if matches!(command, "hold" | "release" | "delete") => ids.push(id.to_string()),
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    let selection = || -> Result<Selection, String> {
        match (&tenant, ids.is_empty()) {
            (Some(_), false) => Err("give message IDs or --tenant T, not both".into()),
            (None, true) => {
                Err("give message IDs, or --tenant T for all of a tenant's mail".into())
            }
            _ => Ok(Selection {
                tenant: tenant.clone(),
                ids: ids.clone(),
            }),
        }
    };
    let request = match command {
        "status" if tenant.is_none() => Request::Status,
        "flush" => Request::Flush {
            tenant: tenant.clone(),
        },
        "hold" => Request::Hold(selection()?),
        "release" => Request::Release(selection()?),
        "delete" => Request::Delete(selection()?),
        "reload" if tenant.is_none() => Request::Reload,
        _ => return Err("--tenant does not apply here".into()),
    };
    Ok(Parsed { request, json })
}

fn report(cmd: &Invocation, command: &str, json: bool, response: &Response) -> Result<Exit, Exit> {
    if !response.ok {
        // The daemon refuses a reload only for an invalid configuration.
        let code = if response.busy {
            Exit::TempFail
        } else if command == "reload" {
            Exit::Config
        } else {
            Exit::DataErr
        };
        return Err(cmd.fail(code, response.error.as_deref().unwrap_or("refused")));
    }
    let result = response.result.clone().unwrap_or_default();
    match command {
        "status" if json => cmd.print_json(&result)?,
        "status" => print_status(&result),
        "reload" => println!("configuration reloaded: {} tenants", result["tenants"]),
        "flush" => println!("retrying deferred mail now"),
        _ => return report_applied(cmd, command, &result),
    }
    Ok(Exit::Ok)
}

/// Hold, release or delete: a line per message saying what became of it,
/// then the count. Exit 0 once every effect is on disk; 75 when a tenant
/// has yet to apply it (queued, lost if the daemon dies first) or could
/// not write it: running the same command again is safe.
fn report_applied(
    cmd: &Invocation,
    command: &str,
    result: &serde_json::Value,
) -> Result<Exit, Exit> {
    let empty = Vec::new();
    let results = result["results"].as_array().unwrap_or(&empty);
    let mut incomplete = false;
    for r in results {
        let text = |key: &str| printable(r[key].as_str().unwrap_or("")).into_owned();
        let what = match r["id"].as_str() {
            Some(_) => text("id"),
            None => format!("tenant {}", text("tenant")),
        };
        let outcome = r["result"].as_str().unwrap_or("");
        incomplete |= matches!(outcome, "pending" | "failed");
        let line = applied_line(
            command,
            outcome,
            r["sending"].as_bool() == Some(true),
            &text("error"),
        );
        println!("{what}: {line}");
    }
    println!(
        "{command}: {} messages",
        result["messages"]
            .as_u64()
            .map_or("all".into(), |n| n.to_string())
    );
    if result["pending"].as_bool() == Some(true) {
        return Err(cmd.fail(
            Exit::TempFail,
            format!(
                "not yet recorded: the tenant is busy in a session; the {command} is queued and \
                 takes effect when its current message ends (a daemon restart before then \
                 loses it; run the command again to be sure)"
            ),
        ));
    }
    if incomplete {
        return Err(cmd.fail(
            Exit::TempFail,
            format!("the {command} could not be recorded for every message"),
        ));
    }
    Ok(Exit::Ok)
}

/// What one result means, for the admin.
fn applied_line(command: &str, outcome: &str, sending: bool, error: &str) -> String {
    let done = match command {
        "hold" => "held",
        "release" => "released",
        _ => "deleted",
    };
    match (outcome, sending) {
        ("pending", true) => format!(
            "being sent right now: {done} after this attempt if it fails (queued, not yet recorded)"
        ),
        ("pending", false) => "queued, not yet recorded".into(),
        ("failed", _) => format!("not {done}: {error}"),
        ("gone", true) => "was being sent and left the queue (sent or bounced) first".into(),
        ("gone", false) => "no longer queued (sent, bounced or deleted first)".into(),
        ("unchanged", _) => "unchanged (already in that state, or failed and kept)".into(),
        (_, true) => format!("was being sent; that attempt did not deliver it: {done}"),
        _ => done.into(),
    }
}

fn print_status(result: &serde_json::Value) {
    let empty = Vec::new();
    let tenants = result["tenants"].as_array().unwrap_or(&empty);
    println!(
        "{:<16} {:<8} {:<28} {:>6} {:>8} {:>5} {:>6} {:>9} {:>7}  LAST ERROR",
        "TENANT", "STATE", "RELAY", "QUEUED", "DEFERRED", "HELD", "FAILED", "DELIVERED", "BOUNCED"
    );
    for t in tenants {
        // Relay replies reach last_error: escaped, so none drives the terminal.
        let text = |key: &str| printable(t[key].as_str().unwrap_or("")).into_owned();
        let number = |key: &str| t[key].as_u64().unwrap_or(0);
        println!(
            "{:<16} {:<8} {:<28} {:>6} {:>8} {:>5} {:>6} {:>9} {:>7}  {}",
            text("name"),
            text("state"),
            text("relay"),
            number("queued"),
            number("deferred"),
            number("held"),
            number("failed"),
            number("delivered"),
            number("bounced"),
            text("last_error")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args;

    #[test]
    fn ids_or_a_tenant_never_both() {
        assert!(parse("hold", &args(&["ABC", "DEF"])).is_ok());
        assert!(parse("hold", &args(&["--tenant", "acme"])).is_ok());
        assert!(parse("hold", &args(&["--tenant", "acme", "ABC"])).is_err());
        assert!(parse("delete", &args(&[])).is_err());
        assert!(parse("status", &args(&["ABC"])).is_err());
        assert!(parse("flush", &args(&["--bogus"])).is_err());
        assert!(matches!(
            parse("status", &args(&["--json"])).unwrap().request,
            Request::Status
        ));
    }
}
