//! Record framing, shared by spool envelopes and archive journals: one record
//! per line, `LEN SP CRC32C SP PAYLOAD LF`, where `LEN` is the payload's
//! decimal byte length and `CRC32C` its checksum in 8 lowercase hex digits.
//! A line without its `LF` is a record torn by a crash mid-append. What a
//! payload means, and whether a torn line is ignored or reported, is left to
//! the file's owner.

use serde::{de::DeserializeOwned, Serialize};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, Read, Seek, SeekFrom};

/// Room for `LEN SP CRC32C SP` in front of the longest payload a reader takes.
const HEADER_ROOM: u64 = 32;

/// What is wrong with one line that should hold a framed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not three space-separated fields.
    NotFramed,
    BadLength,
    BadCrc,
    LengthMismatch {
        found: usize,
        recorded: usize,
    },
    CrcMismatch,
    /// The payload passed its checks but is not the record its reader expects.
    Unreadable(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::NotFramed => f.write_str("not a framed record"),
            FrameError::BadLength => f.write_str("bad length field"),
            FrameError::BadCrc => f.write_str("bad CRC field"),
            FrameError::LengthMismatch { found, recorded } => {
                write!(f, "length {found} does not match the {recorded} recorded")
            }
            FrameError::CrcMismatch => f.write_str("CRC32C mismatch"),
            FrameError::Unreadable(why) => write!(f, "unreadable record: {why}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The whole line for `payload`, `LF` included: written with one call, an
/// append is a single contiguous block.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut line = format!("{} {:08x} ", payload.len(), crc32c::crc32c(payload)).into_bytes();
    line.extend_from_slice(payload);
    line.push(b'\n');
    line
}

/// `record` as JSON, framed.
pub fn encode(record: &impl Serialize) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    Ok(frame(&json))
}

/// The payload of one line (without its `LF`), once length and CRC hold.
pub fn unframe(line: &[u8]) -> Result<&[u8], FrameError> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(len), Some(crc), Some(payload)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(FrameError::NotFramed);
    };
    let recorded: usize = std::str::from_utf8(len)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(FrameError::BadLength)?;
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or(FrameError::BadCrc)?;
    if payload.len() != recorded {
        return Err(FrameError::LengthMismatch {
            found: payload.len(),
            recorded,
        });
    }
    if crc32c::crc32c(payload) != crc {
        return Err(FrameError::CrcMismatch);
    }
    Ok(payload)
}

/// The JSON record on one line (without its `LF`).
pub fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(unframe(line)?).map_err(|e| FrameError::Unreadable(e.to_string()))
}

/// One line as a [`Frames`] reader found it.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// Ended by `LF`, which is not included.
    Complete(&'a [u8]),
    /// The file ends without `LF`: a torn final record.
    Torn(&'a [u8]),
    /// Longer than the reader's limit; reading stops here.
    TooLong,
}

/// Reads a framed file line by line, never holding more than one line (and
/// never more than `max_payload` plus a header of it).
pub struct Frames<R> {
    input: R,
    max_payload: Option<u64>,
    line: Vec<u8>,
}

impl<R: BufRead> Frames<R> {
    /// Lines up to `max_payload` bytes of payload; a longer one is `TooLong`.
    pub fn bounded(input: R, max_payload: u64) -> Frames<R> {
        Frames {
            input,
            max_payload: Some(max_payload),
            line: Vec::new(),
        }
    }

    /// Lines of any length (the journal, whose records are all written by us).
    pub fn unbounded(input: R) -> Frames<R> {
        Frames {
            input,
            max_payload: None,
            line: Vec::new(),
        }
    }

    /// The next line, or `None` at the end of the file.
    pub fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        self.line.clear();
        let n = match self.max_payload {
            Some(max) => (&mut self.input)
                .take(max.saturating_add(HEADER_ROOM))
                .read_until(b'\n', &mut self.line)?,
            None => self.input.read_until(b'\n', &mut self.line)?,
        };
        if n == 0 {
            return Ok(None);
        }
        if let Some(body) = self.line.strip_suffix(b"\n") {
            return Ok(Some(Line::Complete(body)));
        }
        let too_long = self
            .max_payload
            .is_some_and(|max| u64::try_from(n).unwrap_or(u64::MAX) > max);
        Ok(Some(if too_long {
            Line::TooLong
        } else {
            Line::Torn(&self.line)
        }))
    }
}

/// Truncates `file` after its last `LF` if it does not end with one: a
/// record torn by a crash mid-append, never acted on, which an append after
/// it would fuse with the new record into one bad line.
pub fn cut_torn_tail(file: &mut File) -> io::Result<()> {
    let len = file.metadata()?.len();
    let Some(last_at) = len.checked_sub(1) else {
        return Ok(());
    };
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(last_at))?;
    file.read_exact(&mut last)?;
    if last == [b'\n'] {
        return Ok(());
    }
    // Envelopes are a few records long, and a torn journal is rare: reading
    // the file whole is cheap enough.
    let mut content = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut content)?;
    let keep = content
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i.saturating_add(1));
    file.set_len(u64::try_from(keep).unwrap_or(len))?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Note {
        n: u32,
    }

    fn open_to_append(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .unwrap()
    }

    fn lines(bytes: &[u8], max: Option<u64>) -> Vec<String> {
        let mut frames = match max {
            Some(max) => Frames::bounded(bytes, max),
            None => Frames::unbounded(bytes),
        };
        let mut out = Vec::new();
        while let Some(line) = frames.next_line().unwrap() {
            out.push(match line {
                Line::Complete(b) => format!("complete {}", String::from_utf8_lossy(b)),
                Line::Torn(b) => format!("torn {}", String::from_utf8_lossy(b)),
                Line::TooLong => {
                    out.push("too long".into());
                    break;
                }
            });
        }
        out
    }

    #[test]
    fn a_record_round_trips() {
        let line = encode(&Note { n: 7 }).unwrap();
        assert_eq!(line, b"7 cb29818d {\"n\":7}\n");
        let body = line.strip_suffix(b"\n").unwrap();
        assert_eq!(unframe(body).unwrap(), b"{\"n\":7}");
        assert_eq!(decode::<Note>(body).unwrap(), Note { n: 7 });
    }

    #[test]
    fn the_frame_is_length_crc_payload() {
        // Pinned: CRC32C of "123456789" is e3069283 (RFC 3720, B.4).
        assert_eq!(frame(b"123456789"), b"9 e3069283 123456789\n");
        assert_eq!(frame(b""), b"0 00000000 \n");
    }

    #[test]
    fn a_flipped_bit_anywhere_is_caught() {
        let line = encode(&Note { n: 7 }).unwrap();
        let body = line.strip_suffix(b"\n").unwrap();
        for i in 0..body.len() {
            let mut bad = body.to_vec();
            bad[i] ^= 0x01;
            assert!(decode::<Note>(&bad).is_err(), "flip at {i} went unseen");
        }
        let mut bad = body.to_vec();
        let last = bad.len() - 1;
        bad[last - 1] ^= 0x01;
        assert_eq!(unframe(&bad), Err(FrameError::CrcMismatch));
    }

    #[test]
    fn each_damage_is_named() {
        assert_eq!(unframe(b"nonsense"), Err(FrameError::NotFramed));
        assert_eq!(unframe(b"x 00000000 {}"), Err(FrameError::BadLength));
        assert_eq!(unframe(b"2 zz {}"), Err(FrameError::BadCrc));
        assert_eq!(
            unframe(b"3 00000000 {}"),
            Err(FrameError::LengthMismatch {
                found: 2,
                recorded: 3
            })
        );
        let wrong_type = frame(b"\"x\"");
        assert!(matches!(
            decode::<Note>(wrong_type.strip_suffix(b"\n").unwrap()),
            Err(FrameError::Unreadable(_))
        ));
        assert_eq!(
            FrameError::LengthMismatch {
                found: 2,
                recorded: 3
            }
            .to_string(),
            "length 2 does not match the 3 recorded"
        );
    }

    #[test]
    fn a_torn_tail_is_told_apart_from_complete_lines() {
        let whole = encode(&Note { n: 1 }).unwrap();
        let mut bytes = whole.clone();
        bytes.extend_from_slice(b"7 00000000 {\"n\"");
        let mut frames = Frames::unbounded(&bytes[..]);
        assert_eq!(
            frames.next_line().unwrap(),
            Some(Line::Complete(whole.strip_suffix(b"\n").unwrap()))
        );
        assert_eq!(
            frames.next_line().unwrap(),
            Some(Line::Torn(&b"7 00000000 {\"n\""[..]))
        );
        assert_eq!(frames.next_line().unwrap(), None);
    }

    #[test]
    fn a_bounded_reader_stops_at_an_overlong_line() {
        let long = frame(&[b'x'; 100]);
        assert_eq!(lines(&long, Some(200)).len(), 1);
        assert_eq!(lines(&long, Some(10)), vec!["too long".to_string()]);
        // Torn but short: still a torn tail, not an overlong line.
        assert_eq!(lines(b"5 0000", Some(10)), vec!["torn 5 0000".to_string()]);
    }

    #[test]
    fn cut_torn_tail_keeps_every_complete_line() {
        let dir = std::env::temp_dir().join(format!("pbxmail-framing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("records");
        let whole = encode(&Note { n: 1 }).unwrap();
        let mut f = File::create(&path).unwrap();
        f.write_all(&whole).unwrap();
        f.write_all(b"7 cb29818d {\"n").unwrap();
        drop(f);
        let mut f = open_to_append(&path);
        cut_torn_tail(&mut f).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        // Nothing to cut: unchanged, and an empty file stays empty.
        cut_torn_tail(&mut f).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        let mut empty = File::create(dir.join("empty")).unwrap();
        cut_torn_tail(&mut empty).unwrap();
        // Only a torn line: all of it goes.
        std::fs::write(&path, b"12 00").unwrap();
        let mut f = open_to_append(&path);
        cut_torn_tail(&mut f).unwrap();
        assert!(std::fs::read(&path).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
