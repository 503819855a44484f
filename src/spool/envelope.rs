//! Envelope files: an append-only list of framed records (`LEN CRC32C JSON\n`)
//! that replays into the message's current state. Appending a result and
//! fsyncing is cheaper and safer on flash than rewriting the whole file.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// Bumped when a record's meaning changes; readers refuse newer versions.
pub const FORMAT_VERSION: u32 = 1;

/// Longest record accepted when reading; real records are a few hundred bytes.
const MAX_RECORD_LEN: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RcptStatus {
    Pending,
    Sent,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptResult {
    /// Index into the recipient list of the `Created` record.
    pub rcpt: usize,
    pub status: RcptStatus,
    pub reply: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Created {
        version: u32,
        tenant: String,
        sender: String,
        recipients: Vec<String>,
        /// Unix milliseconds.
        queued_at_ms: u64,
        size: u64,
        sha256: String,
        /// Set on a delivery status notification pbxmail made itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bounce: Option<BounceOf>,
    },
    /// One delivery attempt: what each touched recipient got, and when to try again.
    Attempt {
        /// Unix milliseconds, as every time in the spool.
        at_ms: u64,
        results: Vec<RcptResult>,
        next_attempt_ms: Option<u64>,
        error: Option<String>,
    },
    /// A bounce for this message was queued as `dsn`; the message itself is done.
    Bounced {
        dsn: String,
    },
    /// An admin put the message on hold (`pbxmail hold`): not sent until released.
    Held,
    Released,
    /// A bounce that its sender's address refused goes to the postmaster instead:
    /// the recipient list is replaced and every recipient is pending again.
    Redirect {
        to: Vec<String>,
    },
}

/// What a bounce message reports on, and whom it is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BounceOf {
    /// The queue ID of the message that failed.
    pub message: String,
    pub stage: BounceStage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceStage {
    /// Addressed to the failed message's envelope sender.
    Sender,
    /// Addressed to the postmaster: the last stop; if it fails, it stays failed.
    Postmaster,
}

#[derive(Debug)]
pub enum EnvelopeError {
    Io(io::Error),
    /// The file's content is damaged; the string says where and how.
    Corrupt(String),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::Io(e) => write!(f, "{e}"),
            EnvelopeError::Corrupt(why) => write!(f, "corrupt envelope: {why}"),
        }
    }
}

impl std::error::Error for EnvelopeError {}

impl From<io::Error> for EnvelopeError {
    fn from(e: io::Error) -> Self {
        EnvelopeError::Io(e)
    }
}

pub fn write_record(out: &mut impl Write, record: &Record) -> io::Result<()> {
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    let crc = crc32c::crc32c(&json);
    let mut line = format!("{} {:08x} ", json.len(), crc).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    // One write call so an append is a single contiguous block.
    out.write_all(&line)
}

#[derive(Debug, Clone)]
pub struct Recipient {
    pub address: String,
    pub status: RcptStatus,
    pub last_reply: Option<String>,
}

/// A message's state after replaying every record.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Unix milliseconds.
    pub queued_at_ms: u64,
    pub size: u64,
    pub sha256: String,
    pub attempts: u32,
    pub next_attempt_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Set when this message is itself a bounce.
    pub bounce: Option<BounceOf>,
    /// The queue ID of the bounce made for this message, once it was made.
    pub bounced_as: Option<String>,
    /// On hold by an admin.
    pub held: bool,
}

impl Envelope {
    pub fn pending(&self) -> impl Iterator<Item = (usize, &Recipient)> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RcptStatus::Pending)
    }

    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }

    pub fn any_failed(&self) -> bool {
        self.recipients
            .iter()
            .any(|r| r.status == RcptStatus::Failed)
    }

    fn apply(&mut self, record: Record) -> Result<(), String> {
        match record {
            Record::Created { .. } => Err("a second 'created' record".into()),
            Record::Bounced { dsn } => {
                self.bounced_as = Some(dsn);
                Ok(())
            }
            Record::Held => {
                self.held = true;
                Ok(())
            }
            Record::Released => {
                self.held = false;
                Ok(())
            }
            Record::Redirect { to } => {
                self.recipients = to
                    .into_iter()
                    .map(|address| Recipient {
                        address,
                        status: RcptStatus::Pending,
                        last_reply: None,
                    })
                    .collect();
                if let Some(bounce) = self.bounce.as_mut() {
                    bounce.stage = BounceStage::Postmaster;
                }
                self.next_attempt_ms = None;
                Ok(())
            }
            Record::Attempt {
                results,
                next_attempt_ms,
                error,
                ..
            } => {
                for result in results {
                    let rcpt = self.recipients.get_mut(result.rcpt).ok_or_else(|| {
                        format!("result for recipient #{} that does not exist", result.rcpt)
                    })?;
                    // A recipient that is done stays done: a later record never revives it.
                    if rcpt.status == RcptStatus::Pending {
                        rcpt.status = result.status;
                    }
                    rcpt.last_reply = Some(result.reply);
                }
                self.attempts += 1;
                self.next_attempt_ms = next_attempt_ms;
                if error.is_some() {
                    self.last_error = error;
                }
                Ok(())
            }
        }
    }
}

/// Reads records until EOF. A torn final record (no newline: the daemon died
/// mid-append, before fsync returned) is ignored, since nothing acted on it;
/// any other damage is corruption.
pub fn read_envelope(input: &mut impl BufRead) -> Result<Envelope, EnvelopeError> {
    let mut envelope: Option<Envelope> = None;
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        let n = (&mut *input)
            .take(MAX_RECORD_LEN as u64 + 32)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        number += 1;
        if line.last() != Some(&b'\n') {
            if n > MAX_RECORD_LEN {
                return Err(EnvelopeError::Corrupt(format!(
                    "record {number} is too long"
                )));
            }
            break; // torn tail
        }
        let record = parse_frame(&line[..line.len() - 1])
            .map_err(|why| EnvelopeError::Corrupt(format!("record {number}: {why}")))?;
        match (envelope.as_mut(), record) {
            (
                None,
                Record::Created {
                    version,
                    sender,
                    recipients,
                    queued_at_ms,
                    size,
                    sha256,
                    bounce,
                    // The folder says which tenant; fsck compares the two.
                    tenant: _,
                },
            ) => {
                if version > FORMAT_VERSION {
                    return Err(EnvelopeError::Corrupt(format!(
                        "format version {version} is newer than this pbxmail ({FORMAT_VERSION})"
                    )));
                }
                envelope = Some(Envelope {
                    sender,
                    recipients: recipients
                        .into_iter()
                        .map(|address| Recipient {
                            address,
                            status: RcptStatus::Pending,
                            last_reply: None,
                        })
                        .collect(),
                    queued_at_ms,
                    size,
                    sha256,
                    attempts: 0,
                    next_attempt_ms: None,
                    last_error: None,
                    bounce,
                    bounced_as: None,
                    held: false,
                });
            }
            (None, _) => {
                return Err(EnvelopeError::Corrupt(
                    "first record is not 'created'".into(),
                ));
            }
            (Some(env), record) => env
                .apply(record)
                .map_err(|why| EnvelopeError::Corrupt(format!("record {number}: {why}")))?,
        }
    }
    envelope.ok_or_else(|| EnvelopeError::Corrupt("no 'created' record".into()))
}

fn parse_frame(frame: &[u8]) -> Result<Record, String> {
    let mut parts = frame.splitn(3, |&b| b == b' ');
    let (Some(len), Some(crc), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("not a framed record".into());
    };
    let len: usize = std::str::from_utf8(len)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad length field")?;
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or("bad CRC field")?;
    if json.len() != len {
        return Err(format!(
            "length {} does not match the {len} recorded",
            json.len()
        ));
    }
    if crc32c::crc32c(json) != crc {
        return Err("CRC32C mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("unreadable record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() -> Record {
        Record::Created {
            version: FORMAT_VERSION,
            tenant: "acme".into(),
            sender: "101@acme.example".into(),
            recipients: vec!["a@x.example".into(), "b@x.example".into()],
            queued_at_ms: 1_700_000_000_000,
            size: 42,
            sha256: "00".into(),
            bounce: None,
        }
    }

    fn attempt(rcpt: usize, status: RcptStatus) -> Record {
        Record::Attempt {
            at_ms: 1_700_000_100_000,
            results: vec![RcptResult {
                rcpt,
                status,
                reply: "250 ok".into(),
            }],
            next_attempt_ms: Some(1_700_000_160_000),
            error: None,
        }
    }

    fn encode(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            write_record(&mut out, r).unwrap();
        }
        out
    }

    #[test]
    fn replay_applies_results_in_order() {
        let bytes = encode(&[
            created(),
            attempt(0, RcptStatus::Sent),
            attempt(1, RcptStatus::Failed),
        ]);
        let env = read_envelope(&mut &bytes[..]).unwrap();
        assert_eq!(env.attempts, 2);
        assert_eq!(env.recipients[0].status, RcptStatus::Sent);
        assert_eq!(env.recipients[1].status, RcptStatus::Failed);
        assert!(env.is_done());
        assert!(env.any_failed());
    }

    #[test]
    fn done_recipient_is_never_revived() {
        let bytes = encode(&[
            created(),
            attempt(0, RcptStatus::Sent),
            attempt(0, RcptStatus::Pending),
        ]);
        let env = read_envelope(&mut &bytes[..]).unwrap();
        assert_eq!(env.recipients[0].status, RcptStatus::Sent);
    }

    #[test]
    fn redirect_makes_every_recipient_pending_again() {
        let bytes = encode(&[
            created(),
            attempt(0, RcptStatus::Failed),
            attempt(1, RcptStatus::Failed),
            Record::Redirect {
                to: vec!["postmaster@pbx.example".into()],
            },
        ]);
        let env = read_envelope(&mut &bytes[..]).unwrap();
        assert_eq!(env.recipients.len(), 1);
        assert_eq!(env.recipients[0].status, RcptStatus::Pending);
        assert!(!env.is_done());
    }

    #[test]
    fn records_without_the_bounce_field_still_read() {
        let line = br#"{"type":"created","version":1,"tenant":"t","sender":"s@x","recipients":["r@y"],"queued_at_ms":1,"size":1,"sha256":"00"}"#;
        let mut bytes = format!("{} {:08x} ", line.len(), crc32c::crc32c(line)).into_bytes();
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        assert!(read_envelope(&mut &bytes[..]).unwrap().bounce.is_none());
    }

    #[test]
    fn torn_tail_is_ignored() {
        let mut bytes = encode(&[created(), attempt(0, RcptStatus::Sent)]);
        bytes.truncate(bytes.len() - 5);
        let env = read_envelope(&mut &bytes[..]).unwrap();
        assert_eq!(env.attempts, 0);
    }

    #[test]
    fn flipped_byte_is_corruption() {
        let mut bytes = encode(&[created()]);
        let i = bytes.len() / 2;
        bytes[i] ^= 0x01;
        assert!(matches!(
            read_envelope(&mut &bytes[..]),
            Err(EnvelopeError::Corrupt(_))
        ));
    }

    #[test]
    fn empty_or_headless_file_is_corruption() {
        assert!(matches!(
            read_envelope(&mut &b""[..]),
            Err(EnvelopeError::Corrupt(_))
        ));
        let bytes = encode(&[attempt(0, RcptStatus::Sent)]);
        assert!(matches!(
            read_envelope(&mut &bytes[..]),
            Err(EnvelopeError::Corrupt(_))
        ));
    }

    #[test]
    fn result_for_unknown_recipient_is_corruption() {
        let bytes = encode(&[created(), attempt(7, RcptStatus::Sent)]);
        assert!(matches!(
            read_envelope(&mut &bytes[..]),
            Err(EnvelopeError::Corrupt(_))
        ));
    }
}
