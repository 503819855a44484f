//! A tenant's queue in memory, pure: which messages wait and until when,
//! which are held or failed, whether the tenant itself is backing off, and
//! what the rate limit allows. Every method takes the time as an argument
//! and does no I/O, so policy is tested with a fake clock; the disk (the
//! spool) stays the truth and the worker rebuilds this from it.

use super::pacing::{Backoff, RateBucket};
use crate::base::names::MessageId;
use crate::config::RateLimit;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// What the queue keeps per waiting message; the rest is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Queued {
    /// Unix ms when it may be tried.
    due: u64,
    /// Tried before (deferred), as opposed to new (queued).
    attempted: bool,
}

/// The relay itself failed: how often in a row, and no session before `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantBackoff {
    pub failures: u32,
    pub until: u64,
}

/// What a tenant's queue knows beyond the spool, kept by its handle while
/// no thread runs, so a restarted worker neither forgets a failing relay's
/// backoff nor gets a fresh burst of rate-limit tokens.
#[derive(Debug, Clone, Default)]
pub struct Carry {
    tenant_backoff: Option<TenantBackoff>,
    rate: Option<RateBucket>,
    rate_wait_until: u64,
}

/// The numbers `pbxmail status` shows for the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub queued: usize,
    pub deferred: usize,
    pub held: usize,
    pub failed: usize,
}

#[derive(Debug)]
pub struct Queue {
    waiting: BTreeMap<MessageId, Queued>,
    /// The same messages ordered by due time, so the next due and a due
    /// batch cost O(log n) per message, not a scan of the queue.
    by_due: BTreeSet<(u64, MessageId)>,
    /// How many waiting messages were tried before (for `status`).
    attempted: usize,
    /// On hold by an admin: not sent until released.
    held: BTreeSet<MessageId>,
    /// Finished with failures that nobody could take; kept on disk for the admin.
    failed: BTreeSet<MessageId>,
    backoff: Backoff,
    tenant_backoff: Option<TenantBackoff>,
    rate: Option<RateBucket>,
    /// Set when the rate limit said no: no new session before this time.
    rate_wait_until: u64,
    messages_per_session: usize,
}

impl Queue {
    pub fn new(
        backoff: Backoff,
        rate_limit: Option<RateLimit>,
        messages_per_session: usize,
        now_ms: u64,
    ) -> Queue {
        Queue {
            waiting: BTreeMap::new(),
            by_due: BTreeSet::new(),
            attempted: 0,
            held: BTreeSet::new(),
            failed: BTreeSet::new(),
            backoff,
            tenant_backoff: None,
            rate: rate_limit.map(|limit| RateBucket::new(limit, now_ms)),
            rate_wait_until: 0,
            messages_per_session: messages_per_session.max(1),
        }
    }

    /// What must outlive this queue (see `Carry`).
    pub fn carry(&self) -> Carry {
        Carry {
            tenant_backoff: self.tenant_backoff,
            rate: self.rate.clone(),
            rate_wait_until: self.rate_wait_until,
        }
    }

    /// Takes over what an earlier queue of the same tenant carried; a rate
    /// bucket only if this queue has a rate limit too.
    pub fn restore(&mut self, carry: Carry) {
        self.tenant_backoff = carry.tenant_backoff;
        if self.rate.is_some() {
            if let Some(bucket) = carry.rate {
                self.rate = Some(bucket);
                self.rate_wait_until = carry.rate_wait_until;
            }
        }
    }

    /// Puts a message in the queue (or moves it) with its next due time.
    pub fn schedule(&mut self, id: &MessageId, due: u64, attempted: bool) {
        self.remove(id);
        self.by_due.insert((due, id.clone()));
        self.attempted += usize::from(attempted);
        self.waiting.insert(id.clone(), Queued { due, attempted });
    }

    /// Takes a message out of the waiting queue; true if it was there.
    pub fn remove(&mut self, id: &MessageId) -> bool {
        let Some(old) = self.waiting.remove(id) else {
            return false;
        };
        self.by_due.remove(&(old.due, id.clone()));
        self.attempted -= usize::from(old.attempted);
        true
    }

    /// Forgets a message entirely (waiting, held or failed).
    pub fn forget(&mut self, id: &MessageId) {
        self.remove(id);
        self.held.remove(id);
        self.failed.remove(id);
    }

    pub fn is_waiting(&self, id: &MessageId) -> bool {
        self.waiting.contains_key(id)
    }

    pub fn is_held(&self, id: &MessageId) -> bool {
        self.held.contains(id)
    }

    /// Known in any state: waiting, held or failed.
    pub fn knows(&self, id: &MessageId) -> bool {
        self.is_waiting(id) || self.is_held(id) || self.failed.contains(id)
    }

    /// A hint that a message was spooled: new mail is due now, unless the
    /// queue already has it or an admin holds it.
    pub fn note_queued(&mut self, id: &MessageId) {
        if !self.is_waiting(id) && !self.is_held(id) {
            self.schedule(id, 0, false);
        }
    }

    pub fn waiting_ids(&self) -> Vec<MessageId> {
        self.waiting.keys().cloned().collect()
    }

    pub fn held_ids(&self) -> Vec<MessageId> {
        self.held.iter().cloned().collect()
    }

    /// Every message the queue knows, in any state.
    pub fn all_ids(&self) -> Vec<MessageId> {
        let mut ids = self.waiting_ids();
        ids.extend(self.held.iter().cloned());
        ids.extend(self.failed.iter().cloned());
        ids
    }

    /// Moves a waiting message to held (its Held record is already on disk).
    pub fn hold(&mut self, id: &MessageId) {
        if self.remove(id) {
            self.held.insert(id.clone());
        }
    }

    /// A message held on disk, found by a rescan.
    pub fn insert_held(&mut self, id: &MessageId) {
        self.remove(id);
        self.held.insert(id.clone());
    }

    /// A held message goes back to the queue, due now (its Released record
    /// is already on disk).
    pub fn release(&mut self, id: &MessageId, attempted: bool) {
        if self.held.remove(id) {
            self.schedule(id, 0, attempted);
        }
    }

    /// Finished with failures nobody could take: kept for the admin.
    pub fn mark_failed(&mut self, id: &MessageId) {
        self.remove(id);
        self.failed.insert(id.clone());
    }

    /// No longer failed (it was removed, or its bounce found a taker).
    pub fn unfail(&mut self, id: &MessageId) {
        self.failed.remove(id);
    }

    /// `pbxmail flush`: everything waiting is due now, backoff or not.
    pub fn flush(&mut self) {
        self.tenant_backoff = None;
        let ids = self.waiting_ids();
        for id in ids {
            if let Some(q) = self.waiting.get(&id).copied() {
                self.schedule(&id, 0, q.attempted);
            }
        }
    }

    /// The relay itself is failing: no session before the backoff has passed.
    pub fn back_off_tenant(&mut self, now_ms: u64) {
        let failures = self
            .tenant_backoff
            .map_or(0, |b| b.failures)
            .saturating_add(1);
        let until = now_ms.saturating_add(millis(self.backoff.after(failures)));
        self.tenant_backoff = Some(TenantBackoff { failures, until });
    }

    /// A session opened: the relay works again.
    pub fn tenant_ok(&mut self) {
        self.tenant_backoff = None;
    }

    pub fn tenant_backoff(&self) -> Option<TenantBackoff> {
        self.tenant_backoff
    }

    /// The tenant is backing off since a failure (since the last session opened).
    pub fn tenant_failing(&self) -> bool {
        self.tenant_backoff.is_some()
    }

    /// Still inside a tenant backoff.
    pub fn backing_off(&self, now_ms: u64) -> bool {
        self.tenant_backoff.is_some_and(|b| now_ms < b.until)
    }

    /// No new session now: the tenant backs off, or the rate limit said wait.
    pub fn paused(&self, now_ms: u64) -> bool {
        self.backing_off(now_ms) || now_ms < self.rate_wait_until
    }

    /// Takes a rate-limit token for one more message; without one, notes
    /// when the next comes and says no.
    pub fn may_send_now(&mut self, now_ms: u64) -> bool {
        let Some(bucket) = self.rate.as_mut() else {
            return true;
        };
        if bucket.try_take(now_ms) {
            return true;
        }
        self.rate_wait_until = bucket.next_token_at(now_ms);
        false
    }

    /// When a message tried `attempts` times may be tried again.
    pub fn retry_at(&self, now_ms: u64, attempts: u32) -> u64 {
        now_ms.saturating_add(millis(self.backoff.after(attempts)))
    }

    /// When to try again after a local problem (disk full, archive failing).
    pub fn retry_soon(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(millis(self.backoff.min))
    }

    /// The earliest time anything may happen: a message due, but not before
    /// a tenant backoff or a rate-limit pause ends. None: nothing waits.
    pub fn next_wakeup(&self) -> Option<u64> {
        let (earliest, _) = self.by_due.first()?;
        let backoff = self.tenant_backoff.map_or(0, |b| b.until);
        Some((*earliest).max(backoff).max(self.rate_wait_until))
    }

    /// Up to messages_per_session due messages, earliest first.
    pub fn due_batch(&self, now_ms: u64) -> Vec<MessageId> {
        self.by_due
            .iter()
            .take_while(|(due, _)| *due <= now_ms)
            .take(self.messages_per_session)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// The earliest-due message not yet tried in this session (`tried` is
    /// at most messages_per_session long, so skipping it stays cheap).
    pub fn next_due(&self, now_ms: u64, tried: &HashSet<MessageId>) -> Option<MessageId> {
        self.by_due
            .iter()
            .take_while(|(due, _)| *due <= now_ms)
            .find(|(_, id)| !tried.contains(id))
            .map(|(_, id)| id.clone())
    }

    pub fn messages_per_session(&self) -> usize {
        self.messages_per_session
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn counts(&self) -> Counts {
        Counts {
            queued: self.waiting.len() - self.attempted,
            deferred: self.attempted,
            held: self.held.len(),
            failed: self.failed.len(),
        }
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIN: u64 = 60_000;
    const MAX: u64 = 3_600_000;

    /// Backoff without jitter (the midpoint of its range), so times are exact.
    fn backoff() -> Backoff {
        Backoff {
            random: || u16::MAX / 2 + 1,
            ..Backoff::new(Duration::from_millis(MIN), Duration::from_millis(MAX))
        }
    }

    fn queue(per_session: usize) -> Queue {
        Queue::new(backoff(), None, per_session, 0)
    }

    fn id(n: u32) -> MessageId {
        MessageId::parse(&format!("{n:08X}")).unwrap()
    }

    #[test]
    fn tenant_backoff_doubles_per_failure_and_stops_at_retry_max() {
        let mut q = queue(10);
        let mut waits = Vec::new();
        for _ in 0..10 {
            q.back_off_tenant(1_000);
            let until = q.tenant_backoff().unwrap().until;
            // Within a millisecond: the midpoint jitter is not exactly zero.
            waits.push((until - 1_000 + 500) / 1_000 * 1_000);
        }
        assert_eq!(&waits[..4], &[MIN, 2 * MIN, 4 * MIN, 8 * MIN]);
        assert!(waits.iter().all(|&w| w <= MAX));
        assert_eq!(waits[9], MAX);
        assert_eq!(q.tenant_backoff().unwrap().failures, 10);
        assert!(q.backing_off(1_000 + MAX - 1));
        assert!(!q.backing_off(1_000 + MAX + 10));
        q.tenant_ok();
        assert!(!q.tenant_failing());
    }

    #[test]
    fn backoff_jitter_is_injected_and_spreads_ten_percent() {
        let low = Backoff {
            random: || 0,
            ..backoff()
        };
        let high = Backoff {
            random: || u16::MAX,
            ..backoff()
        };
        let mut q = Queue::new(low, None, 1, 0);
        q.back_off_tenant(0);
        assert_eq!(q.tenant_backoff().unwrap().until, MIN * 9 / 10);
        let mut q = Queue::new(high, None, 1, 0);
        q.back_off_tenant(0);
        assert_eq!(q.tenant_backoff().unwrap().until, MIN * 11 / 10);
    }

    #[test]
    fn a_tenant_backoff_holds_back_the_next_wakeup_of_due_mail() {
        let mut q = queue(10);
        q.schedule(&id(1), 5, false);
        assert_eq!(q.next_wakeup(), Some(5));
        q.back_off_tenant(10);
        let until = q.tenant_backoff().unwrap().until;
        assert_eq!(q.next_wakeup(), Some(until));
        assert!(q.paused(until - 1));
        assert!(!q.paused(until));
    }

    #[test]
    fn due_batch_is_earliest_first_and_capped_at_messages_per_session() {
        let mut q = queue(2);
        q.schedule(&id(1), 30, true);
        q.schedule(&id(2), 10, false);
        q.schedule(&id(3), 20, true);
        q.schedule(&id(4), 99, false);
        assert_eq!(q.due_batch(50), vec![id(2), id(3)]);
        assert_eq!(q.due_batch(15), vec![id(2)]);
        assert!(q.due_batch(5).is_empty());
        let tried: HashSet<MessageId> = [id(2)].into_iter().collect();
        assert_eq!(q.next_due(50, &tried), Some(id(3)));
        // Rescheduling moves a message, it does not duplicate it.
        q.schedule(&id(2), 100, true);
        assert_eq!(q.due_batch(50), vec![id(3), id(1)]);
        assert_eq!(q.next_wakeup(), Some(20));
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn held_mail_is_not_due_until_released_and_failed_mail_is_counted() {
        let mut q = queue(10);
        q.schedule(&id(1), 0, true);
        q.schedule(&id(2), 0, false);
        q.hold(&id(1));
        assert_eq!(q.due_batch(0), vec![id(2)]);
        // A hint for held mail does not queue it again.
        q.note_queued(&id(1));
        assert!(q.is_held(&id(1)) && !q.is_waiting(&id(1)));
        q.mark_failed(&id(2));
        assert_eq!(
            q.counts(),
            Counts {
                queued: 0,
                deferred: 0,
                held: 1,
                failed: 1
            }
        );
        assert!(q.next_wakeup().is_none());
        q.release(&id(1), true);
        assert_eq!(q.due_batch(0), vec![id(1)]);
        assert_eq!(q.counts().deferred, 1);
        assert_eq!(q.all_ids().len(), 2);
        q.forget(&id(2));
        assert!(!q.knows(&id(2)));
    }

    #[test]
    fn flush_makes_everything_due_and_ends_the_tenant_backoff() {
        let mut q = queue(10);
        q.schedule(&id(1), 5_000, true);
        q.schedule(&id(2), 9_000, false);
        q.back_off_tenant(0);
        q.flush();
        assert!(!q.tenant_failing());
        assert_eq!(q.due_batch(0).len(), 2);
        assert_eq!(q.counts().deferred, 1);
        assert_eq!(q.next_wakeup(), Some(0));
    }

    #[test]
    fn the_rate_limit_paces_sessions_until_the_next_token() {
        let limit = RateLimit {
            messages: 2,
            per: Duration::from_secs(60),
        };
        let mut q = Queue::new(backoff(), Some(limit), 10, 0);
        q.schedule(&id(1), 0, false);
        assert!(q.may_send_now(0));
        assert!(q.may_send_now(0));
        assert!(!q.may_send_now(0));
        // One token every 30 s: nothing starts before it.
        assert!(q.paused(29_999));
        assert_eq!(q.next_wakeup(), Some(30_000));
        assert!(!q.paused(30_000));
        assert!(q.may_send_now(30_000));
    }

    #[test]
    fn message_retries_follow_the_backoff_and_local_problems_retry_at_retry_min() {
        let q = queue(1);
        assert!(q.retry_at(1_000, 3).abs_diff(1_000 + 4 * MIN) <= 1);
        assert_eq!(q.retry_soon(1_000), 1_000 + MIN);
        assert_eq!(q.retry_at(u64::MAX, 1), u64::MAX);
    }
}
