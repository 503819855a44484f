//! Envelope files: an append-only list of framed records (`LEN CRC32C JSON\n`,
//! see `base::framing`) that replays into the message's current state.
//! Appending a result and fsyncing is cheaper and safer on flash than
//! rewriting the whole file.

use crate::base::framing::{self, Frames, Line};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, BufRead, Write};

/// Bumped when a record's meaning changes; readers refuse newer versions.
pub const FORMAT_VERSION: u32 = 1;

/// Longest record accepted when reading; real records are a few hundred bytes.
const MAX_RECORD_LEN: u64 = 1 << 20;

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
    // One write call so an append is a single contiguous block.
    out.write_all(&framing::encode(record)?)
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
    let mut frames = Frames::bounded(input, MAX_RECORD_LEN);
    let mut number = 0;
    while let Some(line) = frames.next_line()? {
        number += 1;
        let line = match line {
            Line::Complete(line) => line,
            Line::Torn(_) => break,
            Line::TooLong => {
                return Err(EnvelopeError::Corrupt(format!(
                    "record {number} is too long"
                )));
            }
        };
        let record: Record = framing::decode(line)
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

/// The tenant an envelope's `created` record names (recovery uses it to
/// find the message of an envelope in `tmp/`). None if it cannot be read.
pub fn read_tenant(input: &mut impl BufRead) -> Option<String> {
    let mut frames = Frames::bounded(input, MAX_RECORD_LEN);
    match frames.next_line().ok()?? {
        Line::Complete(line) => match framing::decode(line).ok()? {
            Record::Created { tenant, .. } => Some(tenant),
            _ => None,
        },
        _ => None,
    }
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

    /// The bytes on disk are a format: spools written by earlier versions
    /// must read, and tests/crash.rs frames records by hand. Pinned.
    #[test]
    fn records_keep_their_exact_bytes() {
        let bytes = encode(&[
            Record::Held,
            Record::Attempt {
                at_ms: 1_700_000_100_000,
                results: vec![RcptResult {
                    rcpt: 0,
                    status: RcptStatus::Sent,
                    reply: "250 ok".into(),
                }],
                next_attempt_ms: None,
                error: None,
            },
        ]);
        let pinned = concat!(
            "15 e86342e4 {\"type\":\"held\"}\n",
            "132 5a0d6c9e {\"type\":\"attempt\",\"at_ms\":1700000100000,",
            "\"results\":[{\"rcpt\":0,\"status\":\"sent\",\"reply\":\"250 ok\"}],",
            "\"next_attempt_ms\":null,\"error\":null}\n",
        );
        assert_eq!(String::from_utf8(bytes).unwrap(), pinned);
    }

    #[test]
    fn an_overlong_record_is_corruption_not_a_torn_tail() {
        let mut bytes = encode(&[created()]);
        bytes.extend(std::iter::repeat_n(b'x', MAX_RECORD_LEN as usize + 64));
        match read_envelope(&mut &bytes[..]) {
            Err(EnvelopeError::Corrupt(why)) => assert_eq!(why, "record 2 is too long"),
            other => panic!("{other:?}"),
        }
    }
}
