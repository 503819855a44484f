//! The listener's disk side, off the mio loop: the writer thread measures
//! free space, opens a submission per connection (create + lock), and writes
//! the bodies; at the end of DATA it hands the draft to the committer thread,
//! whose fsyncs and renames would otherwise hold up the next client's 354.
//! Jobs arrive on one bounded channel the loop fills with `try_send`; answers
//! go back on another, each followed by a wake of the loop's Waker. When the
//! loop found the job channel full it raises `room_wanted`, and the writer
//! wakes it once it has taken a job, so paused clients resume.

use super::cleanup::{self, Draft};
use crate::base::names::{MessageId, TenantName};
use crate::config::FreeSpace;
use crate::spool::Spool;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use mio::{Token, Waker};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Jobs in flight to the writer; with one chunk of at most ~128 KiB each,
/// this bounds the memory a burst of big bodies holds (a few MB).
const JOB_CAPACITY: usize = 32;

/// Who gets the message: decided by the conversation (cleanup.rs's rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub tenant: String,
    pub sender: String,
    pub recipients: Vec<String>,
}

/// One connection's request to the disk side.
#[derive(Debug, PartialEq, Eq)]
pub enum Job {
    /// MAIL: is there room for new mail? Answered with `Answer::Space`.
    CheckSpace(FreeSpace),
    /// DATA: start a submission. Answered with `Answer::Opened`.
    Open,
    /// Our own lines (the Received field), already CRLF.
    Trace(Vec<u8>),
    /// The client's message bytes, dot-unstuffed, any line ends.
    Content(Vec<u8>),
    /// End of DATA: make it durable. Answered with `Answer::Committed`.
    Commit(Envelope),
    /// Forget the open submission (too big, unroutable, client gone).
    Discard,
}

impl Job {
    /// The bytes this job carries, for the loop's memory bound.
    pub fn len(&self) -> usize {
        match self {
            Job::Trace(bytes) | Job::Content(bytes) => bytes.len(),
            _ => 0,
        }
    }
}

/// The disk side's reply to the one job a conversation waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The error is the sentence for the log.
    Space(Result<(), String>),
    Opened(Result<MessageId, String>),
    Committed {
        tenant: String,
        result: Result<MessageId, String>,
    },
}

/// The loop's end of the writer: send jobs without blocking, take answers.
pub struct Writer {
    jobs: Sender<(Token, Job)>,
    answers: Receiver<(Token, Answer)>,
    room_wanted: Arc<AtomicBool>,
}

/// What `Writer::try_send` could not send now.
pub enum Refused {
    /// The channel is full; the writer wakes the loop when it has room.
    Full(Job),
    /// The writer thread is gone (it only ends when the loop drops `Writer`).
    Gone,
}

impl Writer {
    /// Starts the writer and committer threads for `spool`. `capacity`
    /// bounds the answers in flight (one per connection at most).
    pub fn start(spool: Spool, capacity: usize, waker: Arc<Waker>) -> io::Result<Writer> {
        let (jobs, jobs_rx) = bounded::<(Token, Job)>(JOB_CAPACITY);
        let (answers_tx, answers) = bounded::<(Token, Answer)>(capacity.max(1));
        let (commits, commits_rx) = bounded::<(Token, Draft, Envelope)>(capacity.max(1));
        let room_wanted = Arc::new(AtomicBool::new(false));

        let reply = Reply {
            answers: answers_tx,
            waker,
        };
        let committer_reply = reply.clone();
        std::thread::Builder::new()
            .name("intake-commit".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                for (token, draft, envelope) in commits_rx {
                    if !committer_reply.send(token, commit(draft, envelope)) {
                        return;
                    }
                }
            })?;
        let room = Arc::clone(&room_wanted);
        std::thread::Builder::new()
            .name("intake-write".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut disk = DiskSide::new(spool);
                for (token, job) in jobs_rx {
                    // A slot is free now: let a paused loop fill it.
                    if room.swap(false, Ordering::SeqCst) {
                        reply.wake();
                    }
                    let going = match disk.handle(token, job) {
                        Step::Answer(answer) => reply.send(token, answer),
                        Step::Commit(draft, envelope) => {
                            commits.send((token, *draft, envelope)).is_ok()
                        }
                        Step::Nothing => true,
                    };
                    if !going {
                        return;
                    }
                }
            })?;
        Ok(Writer {
            jobs,
            answers,
            room_wanted,
        })
    }

    /// Never blocks. On `Full` the job comes back and the loop is woken once
    /// there is room (then `try_send` again).
    pub fn try_send(&self, token: Token, job: Job) -> Result<(), Refused> {
        match self.jobs.try_send((token, job)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Gone),
            Err(TrySendError::Full((token, job))) => {
                self.room_wanted.store(true, Ordering::SeqCst);
                // The writer may have emptied a slot before it saw the flag.
                match self.jobs.try_send((token, job)) {
                    Ok(()) => Ok(()),
                    Err(TrySendError::Full((_, job))) => Err(Refused::Full(job)),
                    Err(TrySendError::Disconnected(_)) => Err(Refused::Gone),
                }
            }
        }
    }

    pub fn try_recv(&self) -> Option<(Token, Answer)> {
        self.answers.try_recv().ok()
    }
}

#[derive(Clone)]
struct Reply {
    answers: Sender<(Token, Answer)>,
    waker: Arc<Waker>,
}

impl Reply {
    /// False when the loop is gone (the daemon is stopping).
    fn send(&self, token: Token, answer: Answer) -> bool {
        // Blocking is fine here: the loop drains answers whenever it wakes.
        if self.answers.send((token, answer)).is_err() {
            return false;
        }
        self.wake();
        true
    }

    fn wake(&self) {
        let _ = self.waker.wake();
    }
}

/// Makes a draft durable (the committer's one job).
pub fn commit(draft: Draft, envelope: Envelope) -> Answer {
    let result = TenantName::parse(&envelope.tenant).and_then(|tenant| {
        draft
            .commit(&tenant, &envelope.sender, &envelope.recipients)
            .map_err(|e| e.to_string())
    });
    Answer::Committed {
        tenant: envelope.tenant,
        result,
    }
}

/// What the writer does after a job.
pub enum Step {
    Answer(Answer),
    /// Hand the finished draft to the committer.
    Commit(Box<Draft>, Envelope),
    Nothing,
}

/// An open submission: its draft, or why writing it failed (said at commit).
type Open = Result<Draft, String>;

/// The writer's state: the open submission of each connection.
pub struct DiskSide {
    spool: Spool,
    open: HashMap<Token, Open>,
}

impl DiskSide {
    pub fn new(spool: Spool) -> DiskSide {
        DiskSide {
            spool,
            open: HashMap::new(),
        }
    }

    pub fn handle(&mut self, token: Token, job: Job) -> Step {
        match job {
            Job::CheckSpace(minimum) => Step::Answer(Answer::Space(cleanup::check_free_space(
                &self.spool,
                minimum,
            ))),
            Job::Open => {
                // A second Open replaces (and so removes) any draft left over.
                self.open.remove(&token);
                let answer = match Draft::begin(&self.spool) {
                    Ok(draft) => {
                        let id = draft.id().clone();
                        self.open.insert(token, Ok(draft));
                        Ok(id)
                    }
                    Err(e) => Err(e.to_string()),
                };
                Step::Answer(Answer::Opened(answer))
            }
            Job::Trace(bytes) => self.write(token, |draft| draft.verbatim(&bytes)),
            Job::Content(bytes) => self.write(token, |draft| draft.content(&bytes)),
            Job::Commit(envelope) => match self.open.remove(&token) {
                Some(Ok(draft)) => Step::Commit(Box::new(draft), envelope),
                failed => Step::Answer(Answer::Committed {
                    tenant: envelope.tenant,
                    result: Err(match failed {
                        Some(Err(why)) => why,
                        _ => "no message was open".into(),
                    }),
                }),
            },
            Job::Discard => {
                // Dropping the draft removes its temp file.
                self.open.remove(&token);
                Step::Nothing
            }
        }
    }

    fn write(&mut self, token: Token, op: impl FnOnce(&mut Draft) -> io::Result<()>) -> Step {
        if let Some(slot) = self.open.get_mut(&token) {
            if let Ok(draft) = slot {
                if let Err(e) = op(draft) {
                    // The draft goes (and its temp file); the commit will say why.
                    *slot = Err(e.to_string());
                }
            }
        }
        Step::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Token = Token(1);

    fn spool(name: &str) -> Spool {
        let dir =
            std::env::temp_dir().join(format!("pbxmail-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::new(&dir);
        spool.create_layout().unwrap();
        spool
    }

    fn tmp_files(spool: &Spool) -> usize {
        std::fs::read_dir(spool.root().join("tmp")).unwrap().count()
    }

    fn envelope() -> Envelope {
        Envelope {
            tenant: "acme".into(),
            sender: "a@acme.example".into(),
            recipients: vec!["b@x.example".into()],
        }
    }

    #[test]
    fn a_discarded_submission_leaves_nothing() {
        let spool = spool("discard");
        let mut disk = DiskSide::new(spool.clone());
        let Step::Answer(Answer::Opened(Ok(_))) = disk.handle(T, Job::Open) else {
            panic!("not opened");
        };
        assert!(matches!(
            disk.handle(T, Job::Content(b"x\n".to_vec())),
            Step::Nothing
        ));
        assert_eq!(tmp_files(&spool), 1);
        assert!(matches!(disk.handle(T, Job::Discard), Step::Nothing));
        assert_eq!(tmp_files(&spool), 0);
        // Nothing open any more: the commit says so instead of storing.
        let Step::Answer(Answer::Committed { result, .. }) =
            disk.handle(T, Job::Commit(envelope()))
        else {
            panic!("no answer");
        };
        assert!(result.is_err());
        assert!(spool.tenants().unwrap().is_empty());
    }

    #[test]
    fn trace_is_verbatim_and_content_gets_crlf() {
        let spool = spool("bytes");
        let mut disk = DiskSide::new(spool.clone());
        let Step::Answer(Answer::Opened(Ok(id))) = disk.handle(T, Job::Open) else {
            panic!("not opened");
        };
        disk.handle(T, Job::Trace(b"Received: x\r\n".to_vec()));
        disk.handle(T, Job::Content(b"Subject: s\n\nbody\rline".to_vec()));
        let Step::Commit(draft, envelope) = disk.handle(T, Job::Commit(envelope())) else {
            panic!("nothing to commit");
        };
        assert_eq!(
            commit(*draft, envelope),
            Answer::Committed {
                tenant: "acme".into(),
                result: Ok(id.clone())
            }
        );
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut spool
                .open_message(&TenantName::parse("acme").unwrap(), &id)
                .unwrap(),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "Received: x\r\nSubject: s\r\n\r\nbody\r\nline\r\n");
    }

    #[test]
    fn space_is_measured_against_the_minimum_given() {
        let spool = spool("space");
        let mut disk = DiskSide::new(spool);
        let ok = disk.handle(T, Job::CheckSpace(FreeSpace::Bytes(0)));
        assert!(matches!(ok, Step::Answer(Answer::Space(Ok(())))));
        let low = disk.handle(T, Job::CheckSpace(FreeSpace::Bytes(u64::MAX)));
        let Step::Answer(Answer::Space(Err(why))) = low else {
            panic!("not refused");
        };
        assert!(why.contains("min_free_space"), "{why}");
    }
}
