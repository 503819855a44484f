//! Checking and pruning a tenant's archive against its journal: every record
//! in order with an unbroken hash chain, every archived file present with its
//! SHA-256, and no file that pbxmail did not put there. `prune` is the one
//! way files leave the archive, and it is journaled.

use super::journal::{self, Entry, Line};
use super::{journal_path, tenant_dir, Operator};
use crate::base::names::TenantName;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

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
    tenant: &TenantName,
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
pub fn verify(root: &Path, tenant: &TenantName) -> io::Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let (files, pruned) = index(root, tenant, &mut findings)?;
    let on_disk = archived_files(&tenant_dir(root, tenant))?;
    for (file, archived) in &files {
        // Pruned: gone, or still there because that prune was interrupted
        // after its record (running prune again removes it). Either is what
        // the journal says.
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
fn archived_files(dir: &Path) -> io::Result<BTreeMap<String, PathBuf>> {
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

/// What one `archive prune` did, for its summary line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Messages this run pruned (and journaled).
    pub messages: usize,
    /// The sequence number of the prune record it wrote, if it wrote one.
    pub record: Option<u64>,
    /// Files an earlier prune journaled but did not get to remove (it was
    /// interrupted), removed now.
    pub leftovers: usize,
}

/// Removes the archived files journaled before `before` (unix seconds).
/// The prune record is written and fsynced first and the files removed
/// after, so a crash in between leaves files the journal says are gone,
/// never a missing file that no record accounts for (which `verify` would
/// call Deleted). Running prune again removes what such a run left.
pub fn prune(
    root: &Path,
    tenant: &TenantName,
    before: u64,
    before_text: &str,
    by: &Operator,
) -> io::Result<Pruned> {
    let (pruned, files) = journal_prune(root, tenant, before, before_text, by)?;
    let mut dirs = BTreeSet::new();
    for path in &files {
        match fs::remove_file(path) {
            Ok(()) => {}
            // Another prune got there first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            dirs.insert(dir.to_path_buf());
        }
    }
    // A removal lost to a power cut would bring a file back; prune again
    // would remove it, but make the common case final now.
    for dir in dirs {
        crate::base::fs::sync_dir(&dir)?;
    }
    Ok(pruned)
}

/// Prune's first half: journals which records are pruned (fsynced, with who
/// ran it) and returns the files to remove, including those an earlier,
/// interrupted prune left behind.
fn journal_prune(
    root: &Path,
    tenant: &TenantName,
    before: u64,
    before_text: &str,
    by: &Operator,
) -> io::Result<(Pruned, Vec<PathBuf>)> {
    let mut ignored = Vec::new();
    let (files, already) = index(root, tenant, &mut ignored)?;
    let on_disk = archived_files(&tenant_dir(root, tenant))?;
    let mut seqs = Vec::new();
    let mut remove = Vec::new();
    let mut leftovers = 0;
    for (file, archived) in &files {
        let earlier = already.contains(&archived.seq);
        if !earlier && archived.time >= before {
            continue;
        }
        let path = on_disk.get(file);
        if earlier {
            leftovers += usize::from(path.is_some());
        } else {
            seqs.push(archived.seq);
        }
        remove.extend(path.cloned());
    }
    let messages = seqs.len();
    let record = if seqs.is_empty() {
        None
    } else {
        let entry = Entry::Pruned {
            before: before_text.to_string(),
            seqs,
            uid: Some(by.uid),
            user_name: by.user_name.clone(),
            sudo_user: by.sudo_user.clone(),
        };
        let time = crate::base::clock::now_secs();
        Some(journal::append(&journal_path(root, tenant), entry, time)?.seq)
    };
    let pruned = Pruned {
        messages,
        record,
        leftovers,
    };
    Ok((pruned, remove))
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
pub fn usage(root: &Path, tenant: &TenantName, month: Option<&str>) -> io::Result<Vec<Usage>> {
    let mut sums: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for line in journal::read_all(&journal_path(root, tenant))? {
        let Line::Record(record) = line else { continue };
        let Entry::Archived { user, size, .. } = record.entry else {
            continue;
        };
        let this_month = crate::base::time::rfc3339(record.time)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::fixture::Scene;

    #[test]
    fn a_prune_interrupted_after_its_record_verifies_clean_and_finishes_when_run_again() {
        let scene = Scene::new("prune");
        let root = scene.policy.root.clone();
        for n in 0..2 {
            scene.archive(format!("Message-ID: <p{n}@x>\r\n\r\nbody\r\n").as_bytes());
        }
        let by = Operator {
            uid: 4242,
            user_name: Some("alice".into()),
            sudo_user: Some("bob".into()),
        };

        // Prune's first half only: the process dies before removing anything.
        let (first, files) = journal_prune(
            &root,
            &TenantName::parse("acme").unwrap(),
            u64::MAX,
            "2100-01-01",
            &by,
        )
        .unwrap();
        assert_eq!(
            first,
            Pruned {
                messages: 2,
                record: Some(3),
                leftovers: 0
            }
        );
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|f| f.exists()), "{files:?}");
        let records =
            journal::read_all(&journal_path(&root, &TenantName::parse("acme").unwrap())).unwrap();
        let Some(Line::Record(last)) = records.last() else {
            panic!("no prune record");
        };
        assert_eq!(
            last.entry,
            Entry::Pruned {
                before: "2100-01-01".into(),
                seqs: vec![1, 2],
                uid: Some(4242),
                user_name: Some("alice".into()),
                sudo_user: Some("bob".into()),
            }
        );
        assert!(verify(&root, &TenantName::parse("acme").unwrap())
            .unwrap()
            .is_empty());

        // Run again: the files go, and no second record says so.
        let again = prune(
            &root,
            &TenantName::parse("acme").unwrap(),
            u64::MAX,
            "2100-01-01",
            &by,
        )
        .unwrap();
        assert_eq!(
            again,
            Pruned {
                messages: 0,
                record: None,
                leftovers: 2
            }
        );
        assert!(files.iter().all(|f| !f.exists()), "{files:?}");
        assert_eq!(
            journal::read_all(&journal_path(&root, &TenantName::parse("acme").unwrap()))
                .unwrap()
                .len(),
            3
        );
        assert!(verify(&root, &TenantName::parse("acme").unwrap())
            .unwrap()
            .is_empty());
    }
}
