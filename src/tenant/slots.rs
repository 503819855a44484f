//! The budget all tenants share, so that descriptors and relays are never
//! exhausted: at most `max_sessions` relay sessions at once, at most
//! `max_connections_per_relay` of them to one relay host:port, both lowered
//! to fit the open file limit; and a few spool rescans at once (a rescan
//! holds a folder and an envelope open, and a thousand tenants start theirs
//! together).
//!
//! Sessions are granted first come, first served among the tenants whose
//! relay has room: a tenant that waits keeps its place (its `Ticket`) and is
//! woken over a channel, so its worker goes on answering admin jobs and
//! stops while it waits. A tenant that ends a session and wants another
//! queues behind those already waiting, so one busy tenant cannot keep a
//! slot from the others.

use crate::config::SessionLimits;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Descriptors one session may hold at once: the relay socket, the message
/// and envelope files, and a token request or an archive copy.
const FILES_PER_SESSION: u64 = 4;
/// Descriptors kept for everything else: the log, listeners, the control
/// socket, spool folders, the dispatcher's own files.
const FILES_RESERVED: u64 = 64;
/// Spool rescans at once; each holds a folder and an envelope open.
pub const SCANS: usize = 16;

/// The key sessions are counted by: the relay as configured, host:port.
pub type RelayKey = String;

pub struct SessionSlots {
    state: Mutex<State>,
    scans: Mutex<usize>,
    scan_done: Condvar,
}

struct State {
    limits: SessionLimits,
    open: u32,
    per_relay: HashMap<RelayKey, u32>,
    waiting: VecDeque<Waiter>,
    next_ticket: u64,
}

struct Waiter {
    ticket: u64,
    relay: RelayKey,
    wake: Sender<()>,
}

/// One session's slot; given back when dropped.
pub struct Permit {
    slots: Arc<SessionSlots>,
    relay: RelayKey,
}

/// A place in line for a session slot; `wake` gets a signal when a slot
/// may be free for it (then ask again with the same ticket). Dropped, it
/// leaves the line.
pub struct Ticket {
    slots: Arc<SessionSlots>,
    id: u64,
    pub wake: Receiver<()>,
}

/// A rescan's turn; the next one may start when it is dropped.
pub struct ScanPermit<'a> {
    slots: &'a SessionSlots,
}

impl SessionSlots {
    pub fn new(limits: SessionLimits) -> Arc<SessionSlots> {
        Arc::new(SessionSlots {
            state: Mutex::new(State {
                limits,
                open: 0,
                per_relay: HashMap::new(),
                waiting: VecDeque::new(),
                next_ticket: 0,
            }),
            scans: Mutex::new(0),
            scan_done: Condvar::new(),
        })
    }

    /// New limits (a reload): sessions open stay open; waiters that now fit are woken.
    pub fn set_limits(&self, limits: SessionLimits) {
        let mut state = self.lock();
        state.limits = limits;
        state.wake_those_that_fit();
    }

    /// A slot for a session to `relay` now, or None and `ticket` holds this
    /// tenant's place in line (kept across calls, so asking again after a
    /// wake-up does not lose it).
    pub fn take(self: &Arc<Self>, relay: &str, ticket: &mut Option<Ticket>) -> Option<Permit> {
        let mut state = self.lock();
        let mine = ticket.as_ref().map(|t| t.id);
        let first_in_line = state
            .first_that_fits()
            .is_none_or(|first| Some(first) == mine);
        if state.fits(relay) && first_in_line {
            if let Some(id) = mine {
                state.waiting.retain(|w| w.ticket != id);
            }
            state.open = state.open.saturating_add(1);
            let count = state.per_relay.entry(relay.to_string()).or_insert(0);
            *count = count.saturating_add(1);
            // More room may be left for the next in line (limits raised).
            state.wake_those_that_fit();
            drop(state);
            // Dropped outside the lock: a ticket's drop takes it.
            *ticket = None;
            return Some(Permit {
                slots: Arc::clone(self),
                relay: relay.to_string(),
            });
        }
        if mine.is_none() {
            let (wake, signal) = bounded(1);
            let id = state.next_ticket;
            state.next_ticket = state.next_ticket.wrapping_add(1);
            state.waiting.push_back(Waiter {
                ticket: id,
                relay: relay.to_string(),
                wake,
            });
            // Those ahead that fit are told, in case nobody told them yet.
            state.wake_those_that_fit();
            drop(state);
            *ticket = Some(Ticket {
                slots: Arc::clone(self),
                id,
                wake: signal,
            });
        }
        None
    }

    /// Waits for a rescan's turn. Rescans are short (a folder listing and
    /// small envelope reads), so blocking here is fine.
    pub fn scan(&self) -> ScanPermit<'_> {
        let mut running = match self.scans.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        while *running >= SCANS {
            running = match self.scan_done.wait(running) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
        *running = running.saturating_add(1);
        ScanPermit { slots: self }
    }

    /// (sessions open, tenants waiting), for tests and `status`.
    #[cfg(test)]
    pub fn counts(&self) -> (u32, usize) {
        let state = self.lock();
        (state.open, state.waiting.len())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl State {
    fn fits(&self, relay: &str) -> bool {
        self.open < self.limits.total
            && self.per_relay.get(relay).copied().unwrap_or(0) < self.limits.per_relay
    }

    /// The ticket of the first waiter whose relay has room.
    fn first_that_fits(&self) -> Option<u64> {
        self.waiting
            .iter()
            .find(|w| self.fits(&w.relay))
            .map(|w| w.ticket)
    }

    /// Signals, in line order, as many waiters as the free slots can take.
    /// A signal is a hint: the waiter asks again and may find it taken.
    fn wake_those_that_fit(&self) {
        let mut free = self.limits.total.saturating_sub(self.open);
        let mut taken: HashMap<&str, u32> = HashMap::new();
        for waiter in &self.waiting {
            if free == 0 {
                break;
            }
            let on_relay = self
                .per_relay
                .get(&waiter.relay)
                .copied()
                .unwrap_or(0)
                .saturating_add(taken.get(waiter.relay.as_str()).copied().unwrap_or(0));
            if on_relay < self.limits.per_relay {
                // Full means a signal is already waiting for it.
                let _ = waiter.wake.try_send(());
                free -= 1;
                *taken.entry(waiter.relay.as_str()).or_insert(0) += 1;
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.open = state.open.saturating_sub(1);
        if let Some(count) = state.per_relay.get_mut(&self.relay) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.per_relay.remove(&self.relay);
            }
        }
        state.wake_those_that_fit();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.waiting.retain(|w| w.ticket != self.id);
        // A signal it got and did not use goes to the next in line.
        state.wake_those_that_fit();
    }
}

impl Drop for ScanPermit<'_> {
    fn drop(&mut self) {
        let mut running = match self.slots.scans.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *running = running.saturating_sub(1);
        self.slots.scan_done.notify_one();
    }
}

/// The limits lowered to fit `open_files` descriptors (the soft
/// RLIMIT_NOFILE), with room kept for local submission connections; the
/// reason is logged when they were lowered.
pub fn fit_to_open_files(
    limits: SessionLimits,
    open_files: Option<u64>,
    listen_connections: u32,
) -> SessionLimits {
    let fit = match open_files {
        None => u32::MAX,
        Some(open_files) => {
            let reserved = FILES_RESERVED
                .saturating_add(u64::from(listen_connections).saturating_mul(2))
                .saturating_add((SCANS as u64).saturating_mul(2));
            let fit = (open_files.saturating_sub(reserved) / FILES_PER_SESSION).max(1);
            let fit = u32::try_from(fit).unwrap_or(u32::MAX);
            if fit < limits.total {
                log::warn!(
                    "max_sessions = {} lowered to {fit}: the open file limit is {open_files} \
                     (raise LimitNOFILE= in the unit, or ulimit -n, to allow more)",
                    limits.total
                );
            }
            fit
        }
    };
    let total = limits.total.min(fit);
    SessionLimits {
        total,
        per_relay: limits.per_relay.min(total),
    }
}

/// The soft open file limit, None when unlimited.
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: u32, per_relay: u32) -> SessionLimits {
        SessionLimits { total, per_relay }
    }

    #[test]
    fn a_full_budget_queues_and_a_released_slot_wakes_the_first_in_line() {
        let slots = SessionSlots::new(limits(1, 1));
        let mut a = None;
        let held = slots.take("r:25", &mut a).expect("a free slot");
        let (mut b, mut c) = (None, None);
        assert!(slots.take("r:25", &mut b).is_none());
        assert!(slots.take("r:25", &mut c).is_none());
        assert_eq!(slots.counts(), (1, 2));
        drop(held);
        let b_ticket = b.as_ref().expect("b waits in line");
        assert!(
            b_ticket.wake.try_recv().is_ok(),
            "the first in line is woken"
        );
        let c_ticket = c.as_ref().expect("c waits in line");
        assert!(
            c_ticket.wake.try_recv().is_err(),
            "only as many as fit are woken"
        );
        // A newcomer does not jump the line, nor does c.
        let mut newcomer = None;
        assert!(slots.take("r:25", &mut newcomer).is_none());
        assert!(slots.take("r:25", &mut c).is_none());
        let granted = slots.take("r:25", &mut b);
        assert!(
            granted.is_some() && b.is_none(),
            "b keeps its place and gets it"
        );
        assert_eq!(slots.counts(), (1, 2));
    }

    #[test]
    fn a_full_relay_does_not_block_tenants_of_other_relays() {
        let slots = SessionSlots::new(limits(10, 1));
        let (mut a, mut b, mut c) = (None, None, None);
        let _on_shared = slots.take("shared:25", &mut a).expect("room");
        assert!(slots.take("shared:25", &mut b).is_none(), "per-relay cap");
        let other = slots.take("other:587", &mut c);
        assert!(
            other.is_some(),
            "a waiter for a full relay blocks nobody else"
        );
    }

    #[test]
    fn a_waiter_that_leaves_passes_its_signal_on() {
        let slots = SessionSlots::new(limits(1, 5));
        let mut a = None;
        let held = slots.take("r:25", &mut a).expect("room");
        let (mut b, mut c) = (None, None);
        assert!(slots.take("r:25", &mut b).is_none());
        assert!(slots.take("r:25", &mut c).is_none());
        drop(held);
        drop(b.take());
        let c_ticket = c.as_ref().expect("c waits");
        assert!(c_ticket.wake.try_recv().is_ok(), "b left: c is next");
        let granted = slots.take("r:25", &mut c);
        assert!(granted.is_some());
        assert_eq!(slots.counts(), (1, 0));
    }

    #[test]
    fn raised_limits_wake_as_many_as_now_fit() {
        let slots = SessionSlots::new(limits(1, 10));
        let mut a = None;
        let _held = slots.take("r:25", &mut a).expect("room");
        let mut waiting: Vec<Option<Ticket>> = (0..3).map(|_| None).collect();
        for t in &mut waiting {
            assert!(slots.take("r:25", t).is_none());
        }
        slots.set_limits(limits(3, 10));
        let woken: Vec<bool> = waiting
            .iter()
            .map(|t| t.as_ref().is_some_and(|t| t.wake.try_recv().is_ok()))
            .collect();
        assert_eq!(woken, [true, true, false]);
        let granted: Vec<_> = waiting
            .iter_mut()
            .take(2)
            .filter_map(|t| slots.take("r:25", t))
            .collect();
        assert_eq!(granted.len(), 2);
        assert!(
            slots.take("r:25", &mut waiting[2]).is_none(),
            "all 3 in use"
        );
    }

    #[test]
    fn sessions_fit_the_open_file_limit() {
        let wanted = limits(500, 20);
        assert_eq!(fit_to_open_files(wanted, None, 32), wanted);
        assert_eq!(fit_to_open_files(wanted, Some(65_536), 32), wanted);
        let fitted = fit_to_open_files(wanted, Some(1024), 32);
        assert!(fitted.total < 250 && fitted.total >= 100, "{fitted:?}");
        assert_eq!(fitted.per_relay, 20);
        // However small the limit, one session remains possible.
        assert_eq!(fit_to_open_files(wanted, Some(3), 10_000), limits(1, 1));
        // A per-relay cap above the total is the total.
        assert_eq!(fit_to_open_files(limits(5, 20), None, 1).per_relay, 5);
        assert_eq!(
            fit_to_open_files(limits(5, 20), Some(65_536), 1).per_relay,
            5
        );
    }

    #[test]
    fn at_most_scans_rescans_run_at_once() {
        let slots = SessionSlots::new(limits(1, 1));
        let held: Vec<_> = (0..SCANS).map(|_| slots.scan()).collect();
        let (done_tx, done_rx) = bounded(1);
        std::thread::scope(|scope| {
            let slots = &slots;
            scope.spawn(move || {
                let _turn = slots.scan();
                let _ = done_tx.send(());
            });
            assert!(
                done_rx
                    .recv_timeout(std::time::Duration::from_millis(100))
                    .is_err(),
                "a rescan past the limit waits"
            );
            drop(held);
            assert!(done_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_ok());
        });
    }
}
