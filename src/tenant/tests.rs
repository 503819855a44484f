//! The tenant's policy, tested below the daemon: a real worker, ledger and
//! spool (in a temp dir), a scripted `Delivery` and a hand-set clock, so
//! backoff, expiry, pacing and every failure scope are checked without a
//! network or waiting.

use super::admin::{Action, AdminJob, AdminReport, Applied};
use super::delivery::{Delivery, OpenError, Opened};
use super::ledger::Ledger;
use super::pacing::Backoff;
use super::queue::Carry;
use super::settings::{Pacing, Policy};
use super::worker::{End, Shared, TenantWorker};
use super::{Job, Target, TenantState, TenantStatus};
use crate::base::clock::Clock;
use crate::base::names::MessageId;
use crate::base::names::TenantName;
use crate::config::RateLimit;
use crate::smtp::reply::{Reply, ReplyCode};
use crate::smtp::transaction::Outgoing;
use crate::smtp::{Phase, SessionError};
use crate::spool::envelope::{Envelope, RcptStatus};
use crate::spool::Spool;
use crossbeam_channel::{unbounded, Sender};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TENANT: &str = "acme";
const MIN: u64 = 60_000;
const MAX: u64 = 3_600_000;

/// What the fake relay was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Open,
    Send { from: String, to: Vec<String> },
    Close,
    Abandon,
}

/// The fake relay's script: what each open and each transaction answers.
/// Unscripted opens succeed and unscripted transactions get 250 each.
#[derive(Default)]
struct Script {
    opens: VecDeque<Result<(), OpenError>>,
    sends: VecDeque<Result<Vec<Reply>, SessionError>>,
    events: Vec<Event>,
    /// What `status` said was being sent, seen during each transaction.
    sending_seen: Vec<Option<MessageId>>,
}

/// The fake relay, and the worker's published status it looks at mid-transaction.
struct FakeDelivery(Rc<RefCell<Script>>, Arc<Mutex<TenantStatus>>);

impl Delivery for FakeDelivery {
    fn open(&mut self) -> Result<Opened, OpenError> {
        let mut script = self.0.borrow_mut();
        script.events.push(Event::Open);
        script.opens.pop_front().unwrap_or(Ok(())).map(|()| Opened {
            peer: "relay.test[127.0.0.1]:25".into(),
        })
    }

    fn send(
        &mut self,
        message: &Outgoing<'_>,
        body: &mut dyn crate::smtp::transaction::Body,
    ) -> Result<Vec<Reply>, SessionError> {
        let mut content = Vec::new();
        body.read_to_end(&mut content).unwrap();
        assert!(!content.is_empty(), "the message body reaches the delivery");
        let sending = self.1.lock().unwrap().sending.clone();
        let mut script = self.0.borrow_mut();
        script.sending_seen.push(sending);
        script.events.push(Event::Send {
            from: message.mail_from.to_string(),
            to: message.recipients.to_vec(),
        });
        let count = message.recipients.len();
        script
            .sends
            .pop_front()
            .unwrap_or_else(|| Ok(vec![reply(250, "2.0.0 ok"); count]))
    }

    fn close(&mut self) {
        self.0.borrow_mut().events.push(Event::Close);
    }

    fn abandon(&mut self) {
        self.0.borrow_mut().events.push(Event::Abandon);
    }
}

fn reply(code: u16, text: &str) -> Reply {
    Reply {
        code: ReplyCode(code),
        lines: vec![text.to_string()],
    }
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pbxmail-tenant-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone)]
struct Options {
    rate_limit: Option<RateLimit>,
    max_queue_lifetime: Duration,
    postmaster: Option<String>,
    /// The session budget, when the test shares one with the worker.
    slots: Option<Arc<SessionSlots>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            rate_limit: None,
            max_queue_lifetime: Duration::from_secs(5 * 86_400),
            postmaster: None,
            slots: None,
        }
    }
}

struct Harness {
    _dir: TempDir,
    options: Options,
    spool: Spool,
    clock: Clock,
    script: Rc<RefCell<Script>>,
    worker: TenantWorker<FakeDelivery>,
    jobs: Sender<Job>,
    status: Arc<Mutex<TenantStatus>>,
}

impl Harness {
    fn new(options: Options) -> Harness {
        let dir = TempDir::new();
        let spool = Spool::new(&dir.0.join("spool"));
        spool.create_layout().unwrap();
        let clock = Clock::fake(crate::base::clock::now_ms());
        let script = Rc::new(RefCell::new(Script::default()));
        let status = Arc::new(Mutex::new(TenantStatus::default()));
        let (jobs, worker) = worker(&options, &spool, &clock, &script, &status);
        Harness {
            _dir: dir,
            options,
            spool,
            clock,
            script,
            worker,
            jobs,
            status,
        }
    }

    /// A new worker over the same spool, as after a crash or restart.
    fn restart(&mut self) {
        let (jobs, worker) = worker(
            &self.options,
            &self.spool,
            &self.clock,
            &self.script,
            &self.status,
        );
        self.jobs = jobs;
        self.worker = worker;
    }

    /// A new worker after the last one retired, as `TenantHandle` starts
    /// it: the counters from the published status, the carried queue state.
    fn restart_carrying(&mut self, carry: Carry) {
        let counters = self.status();
        let (jobs, worker) = worker_from(
            &self.options,
            &self.spool,
            &self.clock,
            &self.script,
            &self.status,
            counters,
            carry,
        );
        self.jobs = jobs;
        self.worker = worker;
    }

    /// Spools a message and hints the worker, as the dispatcher would.
    fn submit(&self, sender: &str, recipients: &[&str]) -> MessageId {
        let mut submission = self.spool.begin_submission().unwrap();
        submission
            .write_all(b"Subject: test\r\n\r\nhello\r\n")
            .unwrap();
        let recipients: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
        let id = submission
            .commit(&TenantName::parse(TENANT).unwrap(), sender, &recipients)
            .unwrap();
        self.jobs.send(Job::Queued(id.clone())).unwrap();
        id
    }

    fn step(&mut self) {
        self.worker.step();
    }

    fn worker_rescan_due(&self) -> Option<u64> {
        self.worker.ledger().rescan_due()
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn advance(&self, ms: u64) {
        self.clock.set(self.now() + ms);
    }

    fn envelope(&self, id: &MessageId) -> Option<Envelope> {
        self.spool
            .load_envelope(&TenantName::parse(TENANT).unwrap(), id)
            .ok()
    }

    fn statuses(&self, id: &MessageId) -> Vec<RcptStatus> {
        let envelope = self.envelope(id).expect("still spooled");
        envelope.recipients.iter().map(|r| r.status).collect()
    }

    fn status(&self) -> TenantStatus {
        self.status.lock().unwrap().clone()
    }

    fn script_open(&self, result: Result<(), OpenError>) {
        self.script.borrow_mut().opens.push_back(result);
    }

    fn script_send(&self, result: Result<Vec<Reply>, SessionError>) {
        self.script.borrow_mut().sends.push_back(result);
    }

    /// What was sent, as recipient lists, and forgets the events.
    fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut self.script.borrow_mut().events)
    }

    fn sent_to(&self) -> Vec<Vec<String>> {
        self.take_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Send { to, .. } => Some(to),
                _ => None,
            })
            .collect()
    }

    /// Messages in the tenant's spool folder other than `except`.
    fn others(&self, except: &[&MessageId]) -> Vec<MessageId> {
        self.spool
            .message_ids(&TenantName::parse(TENANT).unwrap())
            .unwrap()
            .into_iter()
            .filter(|id| !except.contains(&id))
            .collect()
    }
}

/// A worker with the test's settings, its rescan flag set as at a start.
fn worker(
    options: &Options,
    spool: &Spool,
    clock: &Clock,
    script: &Rc<RefCell<Script>>,
    status: &Arc<Mutex<TenantStatus>>,
) -> (Sender<Job>, TenantWorker<FakeDelivery>) {
    let fresh = (TenantStatus::default(), Carry::default());
    worker_from(options, spool, clock, script, status, fresh.0, fresh.1)
}

fn worker_from(
    options: &Options,
    spool: &Spool,
    clock: &Clock,
    script: &Rc<RefCell<Script>>,
    status: &Arc<Mutex<TenantStatus>>,
    counters: TenantStatus,
    carry: Carry,
) -> (Sender<Job>, TenantWorker<FakeDelivery>) {
    let backoff = Backoff {
        // Exactly the top of the ±10% jitter, so times are exact.
        random: || u16::MAX,
        ..Backoff::new(Duration::from_millis(MIN), Duration::from_millis(MAX))
    };
    let ledger = Ledger::new(
        TenantName::parse(TENANT).unwrap(),
        Policy {
            envelope_from: None,
            max_queue_lifetime: options.max_queue_lifetime,
            postmaster: options.postmaster.clone(),
            hostname: "pbx.test".into(),
            relay_host: "relay.test".into(),
            archive: None,
        },
        Pacing {
            backoff,
            rate_limit: options.rate_limit,
            messages_per_session: 10,
        },
        spool.clone(),
        clock.clone(),
        counters,
    );
    let mut ledger = ledger;
    ledger.queue_mut().restore(carry);
    let (jobs, receiver) = unbounded();
    let shared = Shared {
        jobs: receiver,
        rescan: Arc::new(AtomicBool::new(true)),
        stop: Arc::new(AtomicBool::new(false)),
        status: Arc::clone(status),
        idle: Duration::ZERO,
        slots: options
            .slots
            .clone()
            .unwrap_or_else(|| SessionSlots::new(SessionLimits::default())),
        relay: "relay.test:25".into(),
    };
    let delivery = FakeDelivery(Rc::clone(script), Arc::clone(status));
    let worker = TenantWorker::new(ledger, delivery, shared);
    (jobs, worker)
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

use super::slots::SessionSlots;
use crate::config::SessionLimits;

#[test]
fn delivered_mail_leaves_the_spool_in_one_session() {
    let mut h = Harness::new(Options::default());
    let a = h.submit("pbx@acme.test", &["a@x.test"]);
    let b = h.submit("pbx@acme.test", &["b@x.test", "c@x.test"]);
    h.step();
    assert!(h.envelope(&a).is_none() && h.envelope(&b).is_none());
    let events = h.take_events();
    assert_eq!(events.first(), Some(&Event::Open));
    assert_eq!(events.last(), Some(&Event::Close));
    assert_eq!(events.iter().filter(|e| **e == Event::Open).count(), 1);
    assert_eq!(h.status().delivered, 3);
}

#[test]
fn a_recipient_4xx_defers_only_that_recipient_and_retries_it_after_the_backoff() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test", "b@x.test"]);
    h.script_send(Ok(vec![reply(250, "ok"), reply(451, "4.2.0 mailbox busy")]));
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Sent, RcptStatus::Pending]);
    let envelope = h.envelope(&id).unwrap();
    assert_eq!(envelope.next_attempt_ms, Some(h.now() + MIN * 11 / 10));
    // Recipient scope: the tenant does not back off.
    assert_eq!(h.status().state, TenantState::Idle);
    assert_eq!(h.status().deferred, 1);
    h.take_events();
    h.step();
    assert!(h.sent_to().is_empty(), "not due yet");
    h.advance(MIN * 11 / 10);
    h.step();
    assert_eq!(h.sent_to(), [strings(&["b@x.test"])]);
    assert!(h.envelope(&id).is_none());
}

#[test]
fn a_recipient_5xx_bounces_it_and_the_dsn_goes_to_the_sender() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["gone@x.test"]);
    h.script_send(Ok(vec![reply(550, "5.1.1 no such user")]));
    h.step();
    assert!(h.envelope(&id).is_none(), "bounced and removed");
    let sends: Vec<Event> = h
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::Send { .. }))
        .collect();
    // The DSN rode the same session, from the null sender to the sender.
    assert_eq!(
        sends.last(),
        Some(&Event::Send {
            from: String::new(),
            to: strings(&["pbx@acme.test"])
        })
    );
    assert_eq!(h.status().bounced, 1);
    assert!(h.others(&[]).is_empty());
}

#[test]
fn a_message_scope_failure_defers_that_message_and_the_next_one_still_goes() {
    let mut h = Harness::new(Options::default());
    let first = h.submit("pbx@acme.test", &["a@x.test"]);
    let second = h.submit("pbx@acme.test", &["b@x.test"]);
    h.script_send(Err(SessionError::Timeout(Phase::DataEnd)));
    h.step();
    assert_eq!(h.statuses(&first), [RcptStatus::Pending]);
    assert!(h.envelope(&second).is_none(), "delivered in a new session");
    let events = h.take_events();
    assert!(
        events.contains(&Event::Abandon),
        "the broken session is dropped"
    );
    assert_eq!(events.iter().filter(|e| **e == Event::Open).count(), 2);
    assert_ne!(h.status().state, TenantState::Backoff);
}

#[test]
fn a_tenant_scope_failure_backs_off_the_tenant_and_the_backoff_grows() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    let refused = || OpenError::Failed {
        peer: "relay.test:25".into(),
        error: SessionError::Connect {
            peer: "relay.test:25".into(),
            reason: "connection refused".into(),
        },
    };
    h.script_open(Err(refused()));
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Pending]);
    assert_eq!(h.status().state, TenantState::Backoff);
    // Within the backoff no session is tried, even when a message is due.
    h.take_events();
    h.jobs
        .send(Job::Queued(h.submit("pbx@acme.test", &["b@x.test"])))
        .unwrap();
    h.advance(MIN * 11 / 10 - 1);
    h.step();
    assert!(h.take_events().is_empty());
    // The second failure in a row waits twice as long.
    h.advance(1);
    h.script_open(Err(refused()));
    h.step();
    assert_eq!(h.take_events(), [Event::Open]);
    h.advance(2 * MIN * 11 / 10 - 1);
    h.step();
    assert!(h.take_events().is_empty());
    h.advance(1);
    h.step();
    assert!(h.take_events().contains(&Event::Open));
    assert!(
        h.others(&[]).is_empty(),
        "all delivered once the relay works"
    );
    assert_eq!(h.status().state, TenantState::Idle);
}

#[test]
fn a_retry_past_the_queue_lifetime_bounces_with_4_4_7() {
    let mut h = Harness::new(Options {
        max_queue_lifetime: Duration::from_secs(3600),
        ..Options::default()
    });
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.script_send(Ok(vec![reply(451, "4.2.0 busy")]));
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Pending]);
    let queued_at = h.envelope(&id).unwrap().queued_at_ms;
    // At the lifetime exactly, a retry is still a retry.
    h.clock.set(queued_at + 3_600_000);
    h.script_send(Ok(vec![reply(451, "4.2.0 busy")]));
    h.jobs.send(Job::Flush).unwrap();
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Pending]);
    h.clock.set(queued_at + 3_600_001);
    h.jobs.send(Job::Flush).unwrap();
    h.script_send(Ok(vec![reply(451, "4.2.0 still busy")]));
    h.step();
    assert!(h.envelope(&id).is_none(), "bounced and removed");
    assert_eq!(h.status().bounced, 1);
    let error = h.status().last_error.unwrap_or_default();
    assert!(error.starts_with("4.4.7 gave up after"), "{error}");
    assert!(error.contains("451 4.2.0 still busy"), "{error}");
}

#[test]
fn a_452_after_an_accepted_recipient_sends_the_rest_in_a_following_transaction() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test", "b@x.test", "c@x.test"]);
    h.script_send(Ok(vec![
        reply(250, "ok"),
        reply(452, "4.5.3 too many recipients"),
        reply(452, "4.5.3 too many recipients"),
    ]));
    h.step();
    assert!(h.envelope(&id).is_none());
    assert_eq!(
        h.sent_to(),
        [
            strings(&["a@x.test", "b@x.test", "c@x.test"]),
            strings(&["b@x.test", "c@x.test"])
        ]
    );
    assert_eq!(h.status().delivered, 3);
}

#[test]
fn a_session_break_after_a_452_split_defers_only_the_unanswered_and_never_resends_the_accepted() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test", "b@x.test"]);
    h.script_send(Ok(vec![
        reply(250, "ok"),
        reply(452, "4.5.3 too many recipients"),
    ]));
    h.script_send(Err(SessionError::Timeout(Phase::DataEnd)));
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Sent, RcptStatus::Pending]);
    h.take_events();
    h.advance(MAX * 2);
    h.step();
    assert_eq!(h.sent_to(), [strings(&["b@x.test"])]);
    assert!(h.envelope(&id).is_none());
}

#[test]
fn an_account_refusal_backs_off_the_tenant_and_bounces_nothing() {
    let mut h = Harness::new(Options::default());
    let first = h.submit("pbx@acme.test", &["a@x.test"]);
    let second = h.submit("pbx@acme.test", &["b@x.test"]);
    h.script_send(Ok(vec![reply(530, "5.7.0 Authentication required")]));
    h.step();
    assert_eq!(h.statuses(&first), [RcptStatus::Pending]);
    // The session stopped at the refusal: the second message waits unsent.
    assert_eq!(h.statuses(&second), [RcptStatus::Pending]);
    assert_eq!(h.sent_to().len(), 1);
    assert_eq!(h.status().state, TenantState::Backoff);
    assert_eq!(h.status().bounced, 0);
    // The same when the relay refuses the login itself.
    h.advance(MIN * 11 / 10);
    h.script_open(Err(OpenError::Failed {
        peer: "relay.test[127.0.0.1]:25".into(),
        error: SessionError::Rejected(Phase::Auth, reply(535, "5.7.8 bad credentials")),
    }));
    h.step();
    assert_eq!(h.statuses(&first), [RcptStatus::Pending]);
    assert_eq!(h.statuses(&second), [RcptStatus::Pending]);
    assert_eq!(h.status().state, TenantState::Backoff);
    assert_eq!(h.status().bounced, 0);
    assert_eq!(h.others(&[&first, &second]), Vec::<MessageId>::new());
}

#[test]
fn an_unavailable_session_defers_the_mail_and_backs_off_the_tenant() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.script_open(Err(OpenError::Unavailable {
        relay: "-".into(),
        reason: "tenant TLS settings unusable: ca_file missing".into(),
        repeat: false,
    }));
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Pending]);
    assert_eq!(h.status().state, TenantState::Backoff);
    assert!(h
        .status()
        .last_error
        .unwrap_or_default()
        .contains("unusable"));
}

#[test]
fn held_mail_is_not_sent_until_released() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.jobs.send(unreported(Action::Hold, Target::All)).unwrap();
    h.step();
    assert!(h.sent_to().is_empty());
    assert!(h.envelope(&id).unwrap().held);
    assert_eq!(h.status().held, 1);
    h.jobs
        .send(unreported(Action::Release, Target::Ids(vec![id.clone()])))
        .unwrap();
    h.step();
    assert_eq!(h.sent_to(), [strings(&["a@x.test"])]);
    assert!(h.envelope(&id).is_none());
}

#[test]
fn a_bounce_nobody_can_take_stays_failed() {
    let mut h = Harness::new(Options::default());
    // Null sender and no postmaster: no one to bounce to.
    let id = h.submit("", &["gone@x.test"]);
    h.script_send(Ok(vec![reply(550, "5.1.1 no such user")]));
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Failed]);
    assert_eq!(h.status().failed, 1);
    assert!(h.others(&[&id]).is_empty(), "no bounce was made");
    // An admin's delete removes it.
    h.jobs
        .send(unreported(Action::Delete, Target::All))
        .unwrap();
    h.step();
    assert!(h.envelope(&id).is_none());
    assert_eq!(h.status().failed, 0);
}

#[test]
fn an_undeliverable_bounce_goes_to_the_postmaster_once() {
    let mut h = Harness::new(Options {
        postmaster: Some("postmaster@acme.test".into()),
        ..Options::default()
    });
    let id = h.submit("pbx@acme.test", &["gone@x.test"]);
    h.script_send(Ok(vec![reply(550, "5.1.1 no such user")]));
    h.script_send(Ok(vec![reply(550, "5.1.1 sender gone too")]));
    h.step();
    assert!(h.envelope(&id).is_none());
    let sends: Vec<Vec<String>> = h.sent_to();
    assert_eq!(
        sends,
        [
            strings(&["gone@x.test"]),
            strings(&["pbx@acme.test"]),
            strings(&["postmaster@acme.test"])
        ]
    );
    assert!(h.others(&[]).is_empty());
}

#[test]
fn the_rate_limit_paces_sessions_until_the_next_token() {
    let mut h = Harness::new(Options {
        rate_limit: Some(RateLimit {
            messages: 1,
            per: Duration::from_secs(60),
        }),
        ..Options::default()
    });
    let first = h.submit("pbx@acme.test", &["a@x.test"]);
    let second = h.submit("pbx@acme.test", &["b@x.test"]);
    h.step();
    let events = h.take_events();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Send { .. }))
            .count(),
        1
    );
    assert_eq!(
        events.last(),
        Some(&Event::Close),
        "paced: QUIT, not a broken session"
    );
    let (sent, waiting) = if h.envelope(&first).is_none() {
        (first, second)
    } else {
        (second, first)
    };
    assert!(h.envelope(&sent).is_none());
    assert_eq!(h.statuses(&waiting), [RcptStatus::Pending]);
    h.advance(59_999);
    h.step();
    assert!(h.take_events().is_empty(), "no token yet");
    h.advance(1);
    h.step();
    assert_eq!(h.sent_to().len(), 1);
    assert!(h.envelope(&waiting).is_none());
}

#[test]
fn flush_retries_deferred_mail_now_despite_backoff() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.script_send(Ok(vec![reply(421, "4.3.2 shutting down")]));
    h.step();
    assert_eq!(h.statuses(&id), [RcptStatus::Pending]);
    h.take_events();
    h.step();
    assert!(h.take_events().is_empty());
    h.jobs.send(Job::Flush).unwrap();
    h.step();
    assert_eq!(h.sent_to(), [strings(&["a@x.test"])]);
    assert!(h.envelope(&id).is_none());
}

#[test]
fn a_5xx_for_the_whole_message_bounces_every_recipient() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test", "b@x.test"]);
    // The reply to the end of data stands for every recipient.
    let too_big = reply(552, "5.3.4 message too big");
    h.script_send(Ok(vec![too_big.clone(), too_big]));
    h.step();
    assert!(h.envelope(&id).is_none(), "bounced and removed");
    assert_eq!(h.status().bounced, 2);
    assert_ne!(h.status().state, TenantState::Backoff);
}

#[test]
fn a_421_mid_session_defers_the_message_and_backs_off_the_tenant() {
    let mut h = Harness::new(Options::default());
    let first = h.submit("pbx@acme.test", &["a@x.test"]);
    let second = h.submit("pbx@acme.test", &["b@x.test"]);
    h.script_send(Err(SessionError::Rejected(
        Phase::Mail,
        reply(421, "4.7.0 too many connections"),
    )));
    h.step();
    assert_eq!(h.statuses(&first), [RcptStatus::Pending]);
    // The relay is closing on us: no new session for the second message.
    assert_eq!(h.statuses(&second), [RcptStatus::Pending]);
    assert_eq!(h.status().state, TenantState::Backoff);
    let events = h.take_events();
    assert_eq!(events.iter().filter(|e| **e == Event::Open).count(), 1);
    assert_eq!(events.last(), Some(&Event::Abandon));
}

#[test]
fn a_restarted_worker_rebuilds_its_queue_from_the_spool() {
    let mut h = Harness::new(Options::default());
    let deferred = h.submit("pbx@acme.test", &["a@x.test"]);
    let held = h.submit("pbx@acme.test", &["b@x.test"]);
    h.jobs
        .send(unreported(Action::Hold, Target::Ids(vec![held.clone()])))
        .unwrap();
    h.script_send(Ok(vec![reply(451, "4.2.0 busy")]));
    h.step();
    assert_eq!(h.statuses(&deferred), [RcptStatus::Pending]);
    h.take_events();
    // Neither the deferred nor the held message is tried after a restart.
    h.restart();
    h.step();
    assert!(h.take_events().is_empty());
    assert_eq!(h.status().deferred, 1);
    assert_eq!(h.status().held, 1);
    // The deferred one keeps its due time from the spool.
    h.advance(MIN * 11 / 10);
    h.step();
    assert_eq!(h.sent_to(), [strings(&["a@x.test"])]);
    assert!(h.envelope(&held).unwrap().held);
}

#[test]
fn a_session_lost_after_the_final_dot_retries_the_message_at_its_backoff() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.script_send(Err(SessionError::Protocol(
        Phase::DataEnd,
        "connection closed by the relay".into(),
    )));
    h.step();
    // Not delivered and not bounced: retried (RFC 5321 §6.1), the log line
    // warning of a possible duplicate (ledger's DeliveryLine).
    assert_eq!(h.statuses(&id), [RcptStatus::Pending]);
    assert_eq!(
        h.envelope(&id).unwrap().next_attempt_ms,
        Some(h.now() + MIN * 11 / 10)
    );
    assert_ne!(h.status().state, TenantState::Backoff);
    h.take_events();
    h.advance(MIN * 11 / 10);
    h.step();
    assert_eq!(h.sent_to(), [strings(&["a@x.test"])]);
    assert!(h.envelope(&id).is_none());
}

#[test]
fn a_login_the_relay_offers_no_mechanism_for_defers_the_tenant_and_names_the_offer() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.script_open(Err(OpenError::Failed {
        peer: "relay.test[127.0.0.1]:25".into(),
        error: SessionError::NoUsableAuth {
            wanted: "PLAIN or LOGIN",
            offered: vec!["CRAM-MD5".into()],
        },
    }));
    h.step();
    // Nothing was sent: the mail waits, the tenant backs off, nothing bounces.
    assert_eq!(h.take_events(), [Event::Open]);
    assert_eq!(h.statuses(&id), [RcptStatus::Pending]);
    assert_eq!(h.status().state, TenantState::Backoff);
    assert_eq!(h.status().bounced, 0);
    let error = h.status().last_error.unwrap_or_default();
    assert!(error.contains("offers AUTH CRAM-MD5"), "{error}");
}

#[test]
fn status_counts_a_bounced_message_as_failed_neither_once_its_bounce_is_queued_nor_sent() {
    // One message a minute, so the bounce waits for its own session.
    let mut h = Harness::new(Options {
        rate_limit: Some(RateLimit {
            messages: 1,
            per: Duration::from_secs(60),
        }),
        ..Options::default()
    });
    let id = h.submit("pbx@acme.test", &["gone@x.test"]);
    h.script_send(Ok(vec![reply(550, "5.1.1 no such user")]));
    h.step();
    assert!(h.envelope(&id).is_none(), "bounced and removed");
    let dsn = h.others(&[]);
    assert_eq!(dsn.len(), 1, "the bounce is queued");
    let status = h.status();
    assert_eq!(
        (status.failed, status.queued, status.bounced),
        (0, 1, 1),
        "{status:?}"
    );
    h.take_events();
    h.advance(60_000);
    h.step();
    assert_eq!(h.sent_to(), [strings(&["pbx@acme.test"])]);
    assert!(h.others(&[]).is_empty(), "the bounce was delivered");
    let status = h.status();
    assert_eq!(
        (status.failed, status.queued, status.deferred),
        (0, 0, 0),
        "{status:?}"
    );
}

/// An admin command whose report nobody reads (the tests look at the queue).
fn unreported(action: Action, target: Target) -> Job {
    let (done, _) = unbounded();
    Job::Admin(AdminJob {
        action,
        target,
        done,
    })
}

/// Sends a reported admin command and runs the worker until it answers.
fn admin(h: &mut Harness, action: Action, target: Target) -> AdminReport {
    let (done, report) = unbounded();
    h.jobs
        .send(Job::Admin(AdminJob {
            action,
            target,
            done,
        }))
        .unwrap();
    h.step();
    report.try_recv().expect("answered by this pass")
}

#[test]
fn a_reported_hold_answers_once_the_hold_is_on_disk_and_says_what_became_of_each() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    let report = admin(&mut h, Action::Hold, Target::Ids(vec![id.clone()]));
    assert_eq!(report.results, [(id.clone(), Applied::Done)]);
    // Answered after the record is durable: a new worker (a restart after
    // kill -9) finds the message held and sends nothing.
    assert!(h.envelope(&id).unwrap().held);
    h.restart();
    h.step();
    assert!(h.sent_to().is_empty());
    assert_eq!(h.status().held, 1);
    let again = admin(&mut h, Action::Hold, Target::Ids(vec![id.clone()]));
    assert_eq!(again.results, [(id.clone(), Applied::Unchanged)]);
    let released = admin(&mut h, Action::Release, Target::All);
    assert_eq!(released.results, [(id.clone(), Applied::Done)]);
    assert_eq!(h.sent_to(), [strings(&["a@x.test"])], "released and sent");
    // Delivered meanwhile: a hold or delete of it finds it gone.
    let late = admin(&mut h, Action::Hold, Target::Ids(vec![id.clone()]));
    assert_eq!(late.results, [(id.clone(), Applied::Gone)]);
    let late = admin(&mut h, Action::Delete, Target::Ids(vec![id.clone()]));
    assert_eq!(late.results, [(id, Applied::Gone)]);
}

#[test]
fn a_reported_delete_answers_once_the_entry_is_removed() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.jobs.send(unreported(Action::Hold, Target::All)).unwrap();
    h.step();
    let report = admin(&mut h, Action::Delete, Target::All);
    assert_eq!(report.action, Action::Delete);
    assert_eq!(report.results, [(id.clone(), Applied::Done)]);
    assert!(h.envelope(&id).is_none());
    assert!(h.others(&[]).is_empty());
    assert_eq!(h.status().held, 0);
}

#[test]
fn status_names_the_message_being_sent_while_its_transaction_runs() {
    let mut h = Harness::new(Options::default());
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.step();
    assert_eq!(h.script.borrow().sending_seen, [Some(id)]);
    assert_eq!(h.status().sending, None, "nothing is being sent now");
}

#[test]
fn a_worker_whose_first_pass_finds_nothing_retires_at_once() {
    let mut h = Harness::new(Options::default());
    assert_eq!(h.worker.run(), End::Retire);
    assert!(h.take_events().is_empty());
}

#[test]
fn a_worker_retires_once_its_queue_is_empty_and_held_mail_needs_no_thread() {
    let mut h = Harness::new(Options::default());
    let kept = h.submit("pbx@acme.test", &["a@x.test"]);
    h.jobs
        .send(unreported(Action::Hold, Target::Ids(vec![kept.clone()])))
        .unwrap();
    h.submit("pbx@acme.test", &["b@x.test"]);
    // The jobs are taken, the mail sent, and then nothing waits.
    assert_eq!(h.worker.run(), End::Retire);
    assert_eq!(h.sent_to(), [strings(&["b@x.test"])]);
    assert_eq!(h.others(&[]), [kept]);
    assert_eq!(h.status().held, 1);
}

#[test]
fn a_worker_restarted_after_retiring_keeps_the_relay_backoff_and_the_counters() {
    let refused = || OpenError::Failed {
        peer: "relay.test:25".into(),
        error: SessionError::Connect {
            peer: "relay.test:25".into(),
            reason: "connection refused".into(),
        },
    };
    let mut h = Harness::new(Options::default());
    h.submit("pbx@acme.test", &["a@x.test"]);
    h.step();
    h.submit("pbx@acme.test", &["b@x.test"]);
    h.script_open(Err(refused()));
    h.step();
    assert_eq!(h.status().state, TenantState::Backoff);
    // An admin deletes the deferred mail: nothing waits, and once the
    // relay's backoff is over (status says idle again) the worker retires.
    h.jobs
        .send(unreported(Action::Delete, Target::All))
        .unwrap();
    h.advance(MIN * 11 / 10);
    assert_eq!(h.worker.run(), End::Retire);
    assert!(h.others(&[]).is_empty());
    assert_eq!(h.status().state, TenantState::Idle);
    let carry = h.worker.carry();
    h.restart_carrying(carry);
    h.take_events();

    // New mail starts a worker with the counters; the relay fails again,
    // and as the second failure in a row it waits twice as long.
    h.submit("pbx@acme.test", &["c@x.test"]);
    h.script_open(Err(refused()));
    h.step();
    assert_eq!(h.take_events(), [Event::Open]);
    let status = h.status();
    assert_eq!(status.state, TenantState::Backoff);
    assert_eq!((status.delivered, status.deferred), (1, 1));
    assert!(status
        .last_error
        .unwrap_or_default()
        .contains("connection refused"));
    h.advance(2 * MIN * 11 / 10 - 1);
    h.step();
    assert!(h.take_events().is_empty(), "no session inside the backoff");
    h.advance(1);
    h.step();
    assert!(h.take_events().contains(&Event::Open));
    assert!(h.others(&[]).is_empty());
    assert_eq!(h.status().delivered, 2);
}

/// A rescan that cannot list the tenant's folder for a reason of the moment
/// is tried again after backoff.min, by the worker's own wake-up: mail that
/// no hint announces is found then, not at the thread's next start.
#[test]
fn a_rescan_that_cannot_list_the_folder_now_is_retried_at_the_backoff() {
    let mut h = Harness::new(Options::default());
    let tenant = TenantName::parse(TENANT).unwrap();
    // On disk, announced by no hint (as after a restart).
    let mut submission = h.spool.begin_submission().unwrap();
    submission.write_all(b"Subject: t\r\n\r\nhi\r\n").unwrap();
    submission
        .commit(&tenant, "pbx@acme.test", &["a@x.test".to_string()])
        .unwrap();
    // The folder cannot be listed now (a file where it belongs: ENOTDIR,
    // no damage to any entry).
    let dir = h.spool.tenant_dir(&tenant);
    let away = dir.with_extension("away");
    std::fs::rename(&dir, &away).unwrap();
    std::fs::write(&dir, b"").unwrap();
    h.step();
    assert!(h.sent_to().is_empty());
    assert_eq!(h.worker_rescan_due(), Some(h.now() + MIN));
    // Listable again, but not yet due: nothing is tried before its time.
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&away, &dir).unwrap();
    h.step();
    assert!(h.sent_to().is_empty());
    h.advance(MIN);
    h.step();
    assert_eq!(h.sent_to(), [strings(&["a@x.test"])]);
    assert_eq!(h.worker_rescan_due(), None);
}

/// The budget with its one slot taken by another tenant of the same relay.
fn one_slot_taken() -> (Arc<SessionSlots>, super::slots::Permit) {
    let slots = SessionSlots::new(SessionLimits {
        total: 1,
        per_relay: 1,
    });
    let taken = slots.take("relay.test:25", &mut None).expect("a free slot");
    (slots, taken)
}

#[test]
fn due_mail_waits_for_a_session_slot_and_goes_once_one_is_free() {
    let (slots, taken) = one_slot_taken();
    let mut h = Harness::new(Options {
        slots: Some(Arc::clone(&slots)),
        ..Options::default()
    });
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.step();
    assert!(h.take_events().is_empty(), "no session without a slot");
    assert_eq!(slots.counts(), (1, 1), "the tenant waits in line");
    assert_eq!(
        h.statuses(&id),
        [RcptStatus::Pending],
        "waiting is no attempt"
    );
    drop(taken);
    h.step();
    assert!(h.envelope(&id).is_none(), "sent once the slot was free");
    assert_eq!(h.take_events().first(), Some(&Event::Open));
    assert_eq!(
        slots.counts(),
        (0, 0),
        "the slot is given back after the session"
    );
}

#[test]
fn a_tenant_with_nothing_due_any_more_leaves_the_line() {
    let (slots, _taken) = one_slot_taken();
    let mut h = Harness::new(Options {
        slots: Some(Arc::clone(&slots)),
        ..Options::default()
    });
    let id = h.submit("pbx@acme.test", &["a@x.test"]);
    h.step();
    assert_eq!(slots.counts(), (1, 1));
    h.jobs
        .send(unreported(Action::Hold, Target::Ids(vec![id])))
        .unwrap();
    h.step();
    assert_eq!(slots.counts(), (1, 0), "held mail needs no slot");
    assert!(h.take_events().is_empty());
}
