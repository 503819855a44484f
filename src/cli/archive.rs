//! `pbxmail archive verify | prune | usage`: the journal archive's admin
//! commands. They read (and, for prune, change) the archive directly; the
//! daemon need not run.

use super::{fail, Exit, Flags, Invocation};
use crate::archive::verify::{self, Usage};
use crate::archive::{self, Operator};
use crate::base::names::TenantName;
use crate::base::text::printable;
use crate::config::Config;

pub fn run(args: &[String]) -> Exit {
    Invocation::run("archive", args, archive)
}

fn archive(cmd: &Invocation) -> Result<Exit, Exit> {
    let Some((action, rest)) = cmd.rest().split_first() else {
        eprintln!("usage: pbxmail archive verify|prune|usage [options]");
        return Err(Exit::Usage);
    };
    // What the action's own messages are prefixed with.
    let name = format!("archive {action}");
    let options = Options::parse(rest).map_err(|e| fail(&name, Exit::Usage, e))?;
    let config = cmd.config()?;
    match action.as_str() {
        "verify" => verify_all(&name, &config, &options),
        "prune" => prune(&name, &config, &options),
        "usage" => usage(&name, &config, &options),
        other => Err(cmd.fail(
            Exit::Usage,
            format!("unknown action '{other}' (verify, prune, usage)"),
        )),
    }
}

#[derive(Default)]
struct Options {
    tenant: Option<String>,
    before: Option<String>,
    month: Option<String>,
    format: Option<String>,
    json: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options::default();
        let mut flags = Flags::new(args);
        while let Some(arg) = flags.next() {
            match arg {
                "--tenant" => o.tenant = Some(flags.value()?),
                "--before" => o.before = Some(flags.value()?),
                "--month" => o.month = Some(month(&flags.value()?)?),
                "--format" => o.format = Some(flags.value()?),
                "--json" => o.json = true,
                other => return Err(format!("unknown argument '{other}'")),
            }
        }
        Ok(o)
    }
}

/// `--month`: `YYYY-MM`, as `usage` prints it; anything else would match
/// no record and print an empty report that looks like "nothing archived".
fn month(text: &str) -> Result<String, String> {
    let valid = match text.as_bytes() {
        [y1, y2, y3, y4, b'-', m1, m2] => {
            [y1, y2, y3, y4, m1, m2].iter().all(|b| b.is_ascii_digit())
                && matches!((m1, m2), (b'0', b'1'..=b'9') | (b'1', b'0'..=b'2'))
        }
        _ => false,
    };
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "--month {text:?} is not a month: use YYYY-MM (UTC), e.g. 2026-11"
        ))
    }
}

/// The tenants to act on: one named, or every tenant with an archive folder
/// or `archive = yes`. An unknown name is `action`'s usage error. A folder
/// whose name is no tenant name was not made by pbxmail and is skipped.
fn tenants(action: &str, config: &Config, only: Option<&str>) -> Result<Vec<TenantName>, Exit> {
    if let Some(name) = only {
        let known = TenantName::parse(name).ok().filter(|name| {
            config.tenants.iter().any(|t| &t.name == name)
                || archive::tenant_dir(&config.daemon.archive_dir, name).is_dir()
        });
        return match known {
            Some(name) => Ok(vec![name]),
            None => Err(fail(
                action,
                Exit::Usage,
                format!("no tenant named {name:?}"),
            )),
        };
    }
    let mut names: Vec<TenantName> = config
        .tenants
        .iter()
        .filter(|t| t.archive)
        .map(|t| t.name.clone())
        .collect();
    if let Ok(entries) = std::fs::read_dir(&config.daemon.archive_dir) {
        names.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .filter_map(|e| TenantName::parse(&e.file_name().to_string_lossy()).ok()),
        );
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn verify_all(name: &str, config: &Config, options: &Options) -> Result<Exit, Exit> {
    let names = tenants(name, config, options.tenant.as_deref())?;
    let root = &config.daemon.archive_dir;
    let mut report = Vec::new();
    let mut problems = 0;
    for tenant in &names {
        match verify::verify(root, tenant) {
            Ok(findings) => {
                problems += findings.len();
                if !options.json {
                    for f in &findings {
                        println!("{tenant}: {:?}: {}", f.problem, printable(&f.what));
                    }
                    if findings.is_empty() {
                        println!("{tenant}: ok");
                    }
                }
                report.push(serde_json::json!({ "tenant": tenant, "findings": findings }));
            }
            Err(e) => return Err(fail(name, Exit::TempFail, format!("{tenant}: {e}"))),
        }
    }
    if options.json {
        println!("{}", serde_json::Value::Array(report));
    }
    Ok(if problems == 0 {
        Exit::Ok
    } else {
        Exit::Problems
    })
}

fn prune(name: &str, config: &Config, options: &Options) -> Result<Exit, Exit> {
    let (Some(tenant), Some(before)) = (&options.tenant, &options.before) else {
        eprintln!("usage: pbxmail archive prune --tenant T --before YYYY-MM-DD");
        return Err(Exit::Usage);
    };
    let tenant = TenantName::parse(tenant).map_err(|e| fail(name, Exit::Usage, e))?;
    let Some(cutoff) = crate::base::time::parse_date(before) else {
        return Err(fail(
            name,
            Exit::Usage,
            format!("--before {before:?} is not a date (YYYY-MM-DD)"),
        ));
    };
    let by = Operator::current();
    match verify::prune(&config.daemon.archive_dir, &tenant, cutoff, before, &by) {
        Ok(done) => {
            // The one line an admin (or cron's mail) sees: nothing is logged.
            let mut line = format!(
                "{tenant}: pruned {} messages archived before {before}",
                done.messages
            );
            if let Some(seq) = done.record {
                line.push_str(&format!(", journal record {seq}, by {by}"));
            }
            if done.leftovers > 0 {
                line.push_str(&format!(
                    "; removed {} files an interrupted prune had left",
                    done.leftovers
                ));
            }
            println!("{line}");
            Ok(Exit::Ok)
        }
        Err(e) => Err(fail(name, Exit::TempFail, format!("{tenant}: {e}"))),
    }
}

fn usage(name: &str, config: &Config, options: &Options) -> Result<Exit, Exit> {
    let names = tenants(name, config, options.tenant.as_deref())?;
    let mut rows: Vec<Usage> = Vec::new();
    for tenant in &names {
        let found = verify::usage(&config.daemon.archive_dir, tenant, options.month.as_deref())
            .map_err(|e| fail(name, Exit::TempFail, format!("{tenant}: {e}")))?;
        rows.extend(found);
    }
    let total_messages: u64 = rows.iter().map(|r| r.messages).sum();
    let total_bytes: u64 = rows.iter().map(|r| r.bytes).sum();
    match options.format.as_deref().unwrap_or("csv") {
        "json" => println!(
            "{}",
            serde_json::json!({ "usage": rows, "total": { "messages": total_messages, "bytes": total_bytes } })
        ),
        "csv" => {
            println!("tenant,month,user,messages,bytes");
            for r in &rows {
                println!(
                    "{},{},{},{},{}",
                    r.tenant, r.month, r.user, r.messages, r.bytes
                );
            }
            println!("TOTAL,,,{total_messages},{total_bytes}");
        }
        other => {
            return Err(fail(
                name,
                Exit::Usage,
                format!("--format {other:?}: use csv or json"),
            ))
        }
    }
    Ok(Exit::Ok)
}
