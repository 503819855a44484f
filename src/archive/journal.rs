//! A tenant's archive journal: one framed record (`LEN CRC32C JSON\n`, as in
//! the spool) per archived message or prune, each carrying the SHA-256 of
//! the previous record: a hash chain, so a record removed, changed or moved
//! is detected. Appends are fsynced under an exclusive lock (the daemon and
//! `archive prune` may both write).

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
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
    /// `archive prune`: these records' files were removed on purpose.
    Pruned { before: String, seqs: Vec<u64> },
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
        crate::spool::hex(ctx.finish().as_ref())
    }
}

/// A record as read back, or what was wrong at that place in the file.
pub enum Line {
    Record(Record),
    Damaged { line: usize, why: String },
}

fn frame(record: &Record) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    let mut line = format!("{} {:08x} ", json.len(), crc32c::crc32c(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

fn unframe(line: &[u8]) -> Result<Record, String> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(len), Some(crc), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("not a framed record".into());
    };
    let len: usize = std::str::from_utf8(len)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad length")?;
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or("bad CRC field")?;
    if json.len() != len || crc32c::crc32c(json) != crc {
        return Err("length or CRC32C mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("unreadable record: {e}"))
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
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let complete = line.last() == Some(&b'\n');
        let body = if complete {
            &line[..line.len() - 1]
        } else {
            &line[..]
        };
        out.push(match unframe(body) {
            Ok(record) => Line::Record(record),
            Err(why) => Line::Damaged { line: number, why },
        });
    }
    Ok(out)
}

/// The last complete record, read from the file's end (cheap for large journals).
fn last_record(file: &mut File) -> io::Result<Option<Record>> {
    let len = file.metadata()?.len();
    let window = len.min(256 * 1024);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(window as usize);
    file.read_to_end(&mut tail)?;
    Ok(tail
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .rev()
        .find_map(|l| unframe(l).ok()))
}

/// True if one of the last records archived `queue_id`: a retry after a crash
/// between journaling and spool removal must not archive twice.
pub fn recently_archived(path: &Path, queue_id: &str) -> io::Result<bool> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let window = len.min(256 * 1024);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(window as usize);
    file.read_to_end(&mut tail)?;
    Ok(tail
        .split(|&b| b == b'\n')
        .filter_map(|l| unframe(l).ok())
        .any(|r| matches!(r.entry, Entry::Archived { queue_id: ref q, .. } if q == queue_id)))
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
    crate::spool::cut_torn_tail(&mut file)?;
    let last = last_record(&mut file)?;
    let mut record = Record {
        seq: last.as_ref().map_or(1, |r| r.seq + 1),
        time,
        entry,
        prev: last.map_or_else(|| GENESIS.to_string(), |r| r.hash),
        hash: String::new(),
    };
    record.hash = record.compute_hash();
    file.write_all(&frame(&record)?)?;
    file.sync_data()?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_torn_tail_is_cut_before_the_next_record() {
        let dir = std::env::temp_dir().join(format!("pbxmail-journal-torn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal");
        append(&path, archived(1), 10).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"99 deadbeef {\"seq\":2").unwrap();
        drop(f);
        let next = append(&path, archived(3), 12).unwrap();
        assert_eq!(next.seq, 2);
        let records = read_all(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| matches!(r, Line::Record(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_chain_and_are_found_again() {
        let dir = std::env::temp_dir().join(format!("pbxmail-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal");
        let first = append(&path, archived(1), 10).unwrap();
        let second = append(&path, archived(2), 11).unwrap();
        assert_eq!(first.prev, GENESIS);
        assert_eq!(second.prev, first.hash);
        assert_eq!(second.seq, 2);
        assert_eq!(second.compute_hash(), second.hash);
        assert!(recently_archived(&path, "ID2").unwrap());
        assert!(!recently_archived(&path, "ID3").unwrap());
        let records = read_all(&path).unwrap();
        assert!(records.iter().all(|r| matches!(r, Line::Record(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
