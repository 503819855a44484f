//! A tenant's archive journal: one framed record (`LEN CRC32C JSON\n`, as in
//! the spool) per archived message or prune, each carrying the SHA-256 of
//! the previous record: a hash chain, so a record removed, changed or moved
//! is detected. Appends are fsynced under an exclusive lock (the daemon and
//! `archive prune` may both write).

use crate::base::framing::{self, cut_torn_tail, FrameError, Frames, Line as Framed};
use crate::base::hex::hex;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The chain's start: what the first record's `prev` is.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    /// A message copied into the archive.
    Archived {
        /// The spool's queue ID: what makes archiving idempotent.
        queue_id: String,
        /// The Message-ID header, if the message has one.
        message_id: Option<String>,
        user: String,
        /// Maildir path relative to the tenant's archive folder.
        file: String,
        size: u64,
        sha256: String,
    },
    /// `archive prune`: these records' files were removed on purpose. It is
    /// written (and fsynced) before any file goes, so a file is never
    /// missing without a record that accounts for it.
    Pruned {
        before: String,
        seqs: Vec<u64>,
        /// Who ran it: the real user ID. Absent in records written before
        /// pbxmail recorded it; skipped when absent so their hashes still hold.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// That user ID's name in /etc/passwd, if it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_name: Option<String>,
        /// `SUDO_USER` as sudo set it: the person behind a `sudo` prune.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sudo_user: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// Unix seconds.
    pub time: u64,
    #[serde(flatten)]
    pub entry: Entry,
    /// Hash of the previous record (GENESIS for the first).
    pub prev: String,
    /// SHA-256 of `prev` and this record without `hash`.
    pub hash: String,
}

impl Record {
    /// The hash this record must carry, given its other fields.
    pub fn compute_hash(&self) -> String {
        let unsigned = Record {
            hash: String::new(),
            ..self.clone()
        };
        let json = serde_json::to_vec(&unsigned).unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.prev.as_bytes());
        ctx.update(b"\n");
        ctx.update(&json);
        hex(ctx.finish().as_ref())
    }
}

/// A record as read back, or what was wrong at that place in the file.
pub enum Line {
    Record(Record),
    Damaged { line: usize, why: String },
}

fn unframe(line: &[u8]) -> Result<Record, FrameError> {
    framing::decode(line)
}

/// Reads every record in order; damage is reported in place, not skipped silently.
pub fn read_all(path: &Path) -> io::Result<Vec<Line>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.lock_shared()?;
    let mut out = Vec::new();
    let mut frames = Frames::unbounded(BufReader::new(file));
    let mut number = 0;
    // Unlike an envelope's, a torn final record is reported: verify names it.
    while let Some(line) = frames.next_line()? {
        number += 1;
        let decoded = match line {
            Framed::Complete(body) | Framed::Torn(body) => unframe(body),
            Framed::TooLong => Err(FrameError::NotFramed),
        };
        out.push(match decoded {
            Ok(record) => Line::Record(record),
            Err(why) => Line::Damaged {
                line: number,
                why: why.to_string(),
            },
        });
    }
    Ok(out)
}

/// The last complete record, read from the file's end (cheap for large journals).
fn last_record(file: &mut File) -> io::Result<Option<Record>> {
    let len = file.metadata()?.len();
    let window = len.min(256 * 1024);
    file.seek(SeekFrom::Start(len.saturating_sub(window)))?;
    let mut tail = Vec::with_capacity(usize::try_from(window).unwrap_or(0));
    file.read_to_end(&mut tail)?;
    Ok(tail
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .rev()
        .find_map(|l| unframe(l).ok()))
}

/// True if any record in the journal archived `queue_id`. Reads the whole
/// journal, however long, so the answer is right; callers ask only when the
/// message's Maildir file already exists (a retry after a crash), never on
/// the common path. A damaged or torn record does not count: nothing acted
/// on it, and the next append cuts a torn one.
pub fn has_archived(path: &Path, queue_id: &str) -> io::Result<bool> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    file.lock_shared()?;
    // Only lines that mention the ID are parsed: a byte search is far
    // cheaper than a CRC and a JSON parse per record.
    let quoted = serde_json::to_string(queue_id).map_err(io::Error::other)?;
    let needle = format!("\"queue_id\":{quoted}").into_bytes();
    let mut frames = Frames::unbounded(BufReader::new(file));
    loop {
        let body = match frames.next_line()? {
            None => return Ok(false),
            Some(Framed::Complete(body)) => body,
            Some(Framed::Torn(_) | Framed::TooLong) => continue,
        };
        if !body.windows(needle.len()).any(|w| w == needle) {
            continue;
        }
        if let Ok(Record {
            entry: Entry::Archived { queue_id: q, .. },
            ..
        }) = unframe(body)
        {
            if q == queue_id {
                return Ok(true);
            }
        }
    }
}

/// Appends an entry, chained to the last record, and fsyncs it.
pub fn append(path: &Path, entry: Entry, time: u64) -> io::Result<Record> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)?;
    file.lock()?;
    // A record torn by a power cut would swallow this one; nothing acted on it.
    cut_torn_tail(&mut file)?;
    let last = last_record(&mut file)?;
    let mut record = Record {
        seq: last.as_ref().map_or(1, |r| r.seq.saturating_add(1)),
        time,
        entry,
        prev: last.map_or_else(|| GENESIS.to_string(), |r| r.hash),
        hash: String::new(),
    };
    record.hash = record.compute_hash();
    file.write_all(&framing::encode(&record)?)?;
    file.sync_data()?;
    Ok(record)
}

/// Test builds only: appends `count` chained records (archiving `FILLERn`)
/// with one fsync, to make a long journal quickly.
#[cfg(test)]
pub(crate) fn pad(path: &Path, count: u64) -> io::Result<()> {
    let mut file = OpenOptions::new().read(true).append(true).open(path)?;
    let mut last = last_record(&mut file)?;
    let mut out = Vec::new();
    for n in 0..count {
        let mut record = Record {
            seq: last.as_ref().map_or(1, |r| r.seq.saturating_add(1)),
            time: last.as_ref().map_or(0, |r| r.time),
            entry: Entry::Archived {
                queue_id: format!("FILLER{n}"),
                message_id: Some(format!("<filler{n}@pbx.test>")),
                user: "199".into(),
                file: format!("199/new/1.PFILLER{n}.pbx"),
                size: 1,
                sha256: "0".repeat(64),
            },
            prev: last.map_or_else(|| GENESIS.to_string(), |r| r.hash),
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        out.extend_from_slice(&framing::encode(&record)?);
        last = Some(record);
    }
    file.write_all(&out)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder for one test, and the journal path inside it.
    fn temp_journal(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("pbxmail-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal");
        (dir, path)
    }

    fn archived(n: u64) -> Entry {
        Entry::Archived {
            queue_id: format!("ID{n}"),
            message_id: None,
            user: "101".into(),
            file: format!("101/new/{n}"),
            size: n,
            sha256: "00".into(),
        }
    }

    /// A record cut off mid-line, as a crash during its write leaves it.
    fn tear(path: &Path) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(b"99 deadbeef {\"seq\":2").unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_before_the_next_record() {
        let (dir, path) = temp_journal("torn");
        append(&path, archived(1), 10).unwrap();
        tear(&path);
        let next = append(&path, archived(3), 12).unwrap();
        assert_eq!(next.seq, 2);
        let records = read_all(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| matches!(r, Line::Record(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_chain_and_are_found_again() {
        let (dir, path) = temp_journal("chain");
        let first = append(&path, archived(1), 10).unwrap();
        let second = append(&path, archived(2), 11).unwrap();
        assert_eq!(first.prev, GENESIS);
        assert_eq!(second.prev, first.hash);
        assert_eq!(second.seq, 2);
        assert_eq!(second.compute_hash(), second.hash);
        assert!(has_archived(&path, "ID2").unwrap());
        assert!(!has_archived(&path, "ID3").unwrap());
        let records = read_all(&path).unwrap();
        assert!(records.iter().all(|r| matches!(r, Line::Record(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_far_from_the_end_is_still_found() {
        let (dir, path) = temp_journal("long");
        append(&path, archived(1), 10).unwrap();
        // Well past the 256 KiB that the old tail scan looked at.
        pad(&path, 2000).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 512 * 1024);
        assert!(has_archived(&path, "ID1").unwrap());
        assert!(!has_archived(&path, "ID2").unwrap());
        assert!(has_archived(&path, "FILLER1999").unwrap());
        // A prefix of an ID is not the ID.
        assert!(!has_archived(&path, "FILLER").unwrap());
        let next = append(&path, archived(2), 12).unwrap();
        assert_eq!(next.seq, 2002);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Records written before prune records said who ran them must keep
    /// their hashes: the new fields are left out when absent.
    #[test]
    fn prune_records_without_an_operator_keep_their_hash() {
        let old = r#"{"seq":4,"time":9,"type":"pruned","before":"2000-01-01","seqs":[1],"prev":"ab","hash":""}"#;
        // compute_hash hashes exactly this re-serialization.
        let record: Record = serde_json::from_str(old).unwrap();
        assert_eq!(serde_json::to_string(&record).unwrap(), old);
    }

    /// The bytes on disk are a format: journals written by earlier versions
    /// must verify, and tests/archive.rs edits them by hand. Pinned.
    #[test]
    fn a_record_keeps_its_exact_bytes() {
        let (dir, path) = temp_journal("pin");
        let entry = Entry::Archived {
            queue_id: "ID1".into(),
            message_id: None,
            user: "101".into(),
            file: "101/new/1".into(),
            size: 1,
            sha256: "00".into(),
        };
        append(&path, entry, 10).unwrap();
        let pinned = concat!(
            "275 7b6937eb {\"seq\":1,\"time\":10,\"type\":\"archived\",\"queue_id\":\"ID1\",",
            "\"message_id\":null,\"user\":\"101\",\"file\":\"101/new/1\",\"size\":1,",
            "\"sha256\":\"00\",\"prev\":\"0000000000000000000000000000000000000000000000000000000000000000\",",
            "\"hash\":\"d1d92e3de24d25cb3c00971a6d19f874bdf910cb67ce0baa6618b72c59af5ebe\"}\n",
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), pinned);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_final_record_is_reported_as_damaged() {
        let (dir, path) = temp_journal("tornread");
        append(&path, archived(1), 10).unwrap();
        tear(&path);
        let records = read_all(&path).unwrap();
        assert!(matches!(records[0], Line::Record(_)));
        assert!(matches!(records[1], Line::Damaged { line: 2, .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
