//! `pbxmail archive verify | prune | usage`: the journal archive's admin
//! commands. They read (and, for prune, change) the archive directly; the
//! daemon need not run.

use super::{load_config, take_config_flag, Exit};
use crate::archive::verify::{self, Usage};
use crate::archive::Operator;
use crate::config::Config;

pub fn run(args: &[String]) -> Exit {
    let (path, rest) = match take_config_flag(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pbxmail archive: {e}");
            return Exit::Usage;
        }
    };
    let Some((action, rest)) = rest.split_first() else {
        eprintln!("usage: pbxmail archive verify|prune|usage [options]");
        return Exit::Usage;
    };
    let options = match Options::parse(rest) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("pbxmail archive {action}: {e}");
            return Exit::Usage;
        }
    };
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match action.as_str() {
        "verify" => verify_all(&config, &options),
        "prune" => prune(&config, &options),
        "usage" => usage(&config, &options),
        other => {
            eprintln!("pbxmail archive: unknown action '{other}' (verify, prune, usage)");
            Exit::Usage
        }
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
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let mut value = || iter.next().cloned().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--tenant" => o.tenant = Some(value()?),
                "--before" => o.before = Some(value()?),
                "--month" => o.month = Some(month(&value()?)?),
                "--format" => o.format = Some(value()?),
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

/// The tenants to act on: one named, or every tenant with an archive folder or `archive = yes`.
fn tenants(config: &Config, only: Option<&str>) -> Result<Vec<String>, String> {
    if let Some(name) = only {
        let known = config.tenants.iter().any(|t| t.name.as_str() == name)
            || config.daemon.archive_dir.join(name).is_dir();
        return if known {
            Ok(vec![name.to_string()])
        } else {
            Err(format!("no tenant named {name:?}"))
        };
    }
    let mut names: Vec<String> = config
        .tenants
        .iter()
        .filter(|t| t.archive)
        .map(|t| t.name.as_str().to_string())
        .collect();
    if let Ok(entries) = std::fs::read_dir(&config.daemon.archive_dir) {
        names.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn verify_all(config: &Config, options: &Options) -> Exit {
    let names = match tenants(config, options.tenant.as_deref()) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("pbxmail archive verify: {e}");
            return Exit::Usage;
        }
    };
    let root = &config.daemon.archive_dir;
    let mut report = Vec::new();
    let mut problems = 0;
    for tenant in &names {
        match verify::verify(root, tenant) {
            Ok(findings) => {
                problems += findings.len();
                if !options.json {
                    for f in &findings {
                        println!("{tenant}: {:?}: {}", f.problem, f.what);
                    }
                    if findings.is_empty() {
                        println!("{tenant}: ok");
                    }
                }
                report.push(serde_json::json!({ "tenant": tenant, "findings": findings }));
            }
            Err(e) => {
                eprintln!("pbxmail archive verify: {tenant}: {e}");
                return Exit::TempFail;
            }
        }
    }
    if options.json {
        println!("{}", serde_json::Value::Array(report));
    }
    if problems == 0 {
        Exit::Ok
    } else {
        Exit::Problems
    }
}

fn prune(config: &Config, options: &Options) -> Exit {
    let (Some(tenant), Some(before)) = (&options.tenant, &options.before) else {
        eprintln!("usage: pbxmail archive prune --tenant T --before YYYY-MM-DD");
        return Exit::Usage;
    };
    let Some(cutoff) = crate::time::parse_date(before) else {
        eprintln!("pbxmail archive prune: --before {before:?} is not a date (YYYY-MM-DD)");
        return Exit::Usage;
    };
    let by = Operator::current();
    match verify::prune(&config.daemon.archive_dir, tenant, cutoff, before, &by) {
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
            Exit::Ok
        }
        Err(e) => {
            eprintln!("pbxmail archive prune: {tenant}: {e}");
            Exit::TempFail
        }
    }
}

fn usage(config: &Config, options: &Options) -> Exit {
    let names = match tenants(config, options.tenant.as_deref()) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("pbxmail archive usage: {e}");
            return Exit::Usage;
        }
    };
    let mut rows: Vec<Usage> = Vec::new();
    for tenant in &names {
        match verify::usage(&config.daemon.archive_dir, tenant, options.month.as_deref()) {
            Ok(found) => rows.extend(found),
            Err(e) => {
                eprintln!("pbxmail archive usage: {tenant}: {e}");
                return Exit::TempFail;
            }
        }
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
            eprintln!("pbxmail archive usage: --format {other:?}: use csv or json");
            return Exit::Usage;
        }
    }
    Exit::Ok
}
