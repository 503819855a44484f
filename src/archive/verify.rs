//! Checking and pruning a tenant's archive against its journal: every record
//! in order with an unbroken hash chain, every archived file present with its
//! SHA-256, and no file that pbxmail did not put there. `prune` is the one
//! way files leave the archive, and it is journaled.

use super::journal::{self, Entry, Line};
use super::{journal_path, tenant_dir};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// A journal line that cannot be read.
    DamagedRecord,
    /// A record whose content no longer matches its hash.
    ChangedRecord,
    /// The chain skips: a record before this one was removed.
    RemovedRecord,
    /// Records out of order.
    Reordered,
    /// An archived file whose content changed.
    Modified,
    /// An archived file that is gone (and was not pruned).
    Deleted,
    /// A file in the archive that no record accounts for.
    Added,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub problem: Problem,
    /// Which message or record: the file, the Message-ID, the sequence number.
    pub what: String,
}

struct Archived {
    seq: u64,
    sha256: String,
    message_id: Option<String>,
    time: u64,
}

/// Reads the journal and indexes what it says the archive holds.
fn index(
    root: &Path,
    tenant: &str,
    findings: &mut Vec<Finding>,
) -> io::Result<(BTreeMap<String, Archived>, BTreeSet<u64>)> {
    let mut files = BTreeMap::new();
    let mut pruned = BTreeSet::new();
    let mut expected_prev = journal::GENESIS.to_string();
    let mut expected_seq = 1;
    for line in journal::read_all(&journal_path(root, tenant))? {
        let record = match line {
            Line::Record(record) => record,
            Line::Damaged { line, why } => {
                findings.push(Finding {
                    problem: Problem::DamagedRecord,
                    what: format!("journal line {line}: {why}"),
                });
                continue;
            }
        };
        if record.compute_hash() != record.hash {
            findings.push(Finding {
                problem: Problem::ChangedRecord,
                what: format!("record {} was altered", record.seq),
            });
        }
        if record.seq < expected_seq {
            findings.push(Finding {
                problem: Problem::Reordered,
                what: format!(
                    "record {} comes after record {}",
                    record.seq,
                    expected_seq - 1
                ),
            });
        } else if record.seq > expected_seq || record.prev != expected_prev {
            let missing = if record.seq > expected_seq + 1 {
                format!("records {} to {}", expected_seq, record.seq - 1)
            } else if record.seq > expected_seq {
                format!("record {expected_seq}")
            } else {
                "a record".to_string()
            };
            findings.push(Finding {
                problem: Problem::RemovedRecord,
                what: format!(
                    "{missing} removed from the journal before record {} (their files show as Added)",
                    record.seq
                ),
            });
        }
        expected_prev = record.hash.clone();
        expected_seq = record.seq.max(expected_seq - 1) + 1;
        match record.entry {
            Entry::Archived {
                file,
                sha256,
                message_id,
                ..
            } => {
                files.insert(
                    file,
                    Archived {
                        seq: record.seq,
                        sha256,
                        message_id,
                        time: record.time,
                    },
                );
            }
            Entry::Pruned { seqs, .. } => pruned.extend(seqs),
        }
    }
    Ok((files, pruned))
}

/// Every problem in one tenant's archive; empty means it is intact.
pub fn verify(root: &Path, tenant: &str) -> io::Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let (files, pruned) = index(root, tenant, &mut findings)?;
    let on_disk = archived_files(&tenant_dir(root, tenant))?;
    for (file, archived) in &files {
        if pruned.contains(&archived.seq) {
            continue;
        }
        let name = describe(file, archived);
        match on_disk.get(file) {
            None => findings.push(Finding {
                problem: Problem::Deleted,
                what: name,
            }),
            Some(path) => {
                let mut f = fs::File::open(path)?;
                if crate::spool::scan_message(&mut f)?.sha256 != archived.sha256 {
                    findings.push(Finding {
                        problem: Problem::Modified,
                        what: name,
                    });
                }
            }
        }
    }
    for file in on_disk.keys().filter(|f| !files.contains_key(*f)) {
        findings.push(Finding {
            problem: Problem::Added,
            what: file.clone(),
        });
    }
    Ok(findings)
}

fn describe(file: &str, archived: &Archived) -> String {
    match &archived.message_id {
        Some(id) => format!("{file} (Message-ID {id}, record {})", archived.seq),
        None => format!("{file} (record {})", archived.seq),
    }
}

/// Archived files on disk, keyed as the journal names them (`USER/new/NAME`);
/// a copy an IMAP server moved to cur/ (NAME:2,FLAGS) counts as the same file.
fn archived_files(dir: &Path) -> io::Result<BTreeMap<String, std::path::PathBuf>> {
    let mut found = BTreeMap::new();
    let users = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for user in users.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
        let user_name = user.file_name().to_string_lossy().into_owned();
        for sub in ["new", "cur"] {
            let Ok(entries) = fs::read_dir(user.path().join(sub)) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let base = name.split(":2,").next().unwrap_or(&name).to_string();
                found.insert(format!("{user_name}/new/{base}"), entry.path());
            }
        }
    }
    Ok(found)
}

/// Removes archived files journaled before `before` (unix seconds) and
/// journals what was removed. Returns how many files went.
pub fn prune(root: &Path, tenant: &str, before: u64, before_text: &str) -> io::Result<usize> {
    let mut ignored = Vec::new();
    let (files, pruned) = index(root, tenant, &mut ignored)?;
    let on_disk = archived_files(&tenant_dir(root, tenant))?;
    let mut seqs = Vec::new();
    for (file, archived) in &files {
        if archived.time >= before || pruned.contains(&archived.seq) {
            continue;
        }
        if let Some(path) = on_disk.get(file) {
            fs::remove_file(path)?;
        }
        seqs.push(archived.seq);
    }
    if seqs.is_empty() {
        return Ok(0);
    }
    let count = seqs.len();
    journal::append(
        &journal_path(root, tenant),
        Entry::Pruned {
            before: before_text.to_string(),
            seqs,
        },
        crate::spool::unix_millis() / 1000,
    )?;
    log::info!("archive {tenant}: pruned {count} messages archived before {before_text}");
    Ok(count)
}

/// One line of `archive usage`: what was archived for a user in a month.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub tenant: String,
    /// YYYY-MM (UTC) of archiving.
    pub month: String,
    pub user: String,
    pub messages: u64,
    /// Sum of the archived files' sizes.
    pub bytes: u64,
}

/// Archived messages and bytes per user and month, from the journal.
pub fn usage(root: &Path, tenant: &str, month: Option<&str>) -> io::Result<Vec<Usage>> {
    let mut sums: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for line in journal::read_all(&journal_path(root, tenant))? {
        let Line::Record(record) = line else { continue };
        let Entry::Archived { user, size, .. } = record.entry else {
            continue;
        };
        let this_month = crate::time::rfc3339(record.time)
            .get(..7)
            .unwrap_or_default()
            .to_string();
        if month.is_some_and(|m| m != this_month) {
            continue;
        }
        let sum = sums.entry((this_month, user)).or_default();
        sum.0 += 1;
        sum.1 += size;
    }
    Ok(sums
        .into_iter()
        .map(|((month, user), (messages, bytes))| Usage {
            tenant: tenant.to_string(),
            month,
            user,
            messages,
            bytes,
        })
        .collect())
}
