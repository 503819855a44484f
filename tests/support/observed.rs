//! A test server's bookkeeping as others watch it: state behind a mutex, a
//! condvar that wakes every waiter on each change, and a stop flag. Both
//! scriptable servers (SMTP, OAuth) use it; waiting is on the condvar, never
//! by polling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub struct Shared<S> {
    state: Mutex<S>,
    /// Notified after every change made through `update`.
    pub changed: Condvar,
    /// The whole server is going away.
    pub stopping: AtomicBool,
}

impl<S> Shared<S> {
    pub fn new(state: S) -> Shared<S> {
        Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        }
    }

    /// A panicking test thread must not take the server's bookkeeping with it.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn update(&self, f: impl FnOnce(&mut S)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Sets `stopping` and wakes every waiter. The flag is set under the lock:
    /// a waiter checks it with the lock held and then waits, so a change made
    /// between its check and its wait would otherwise be a lost wake-up.
    pub fn stop(&self) {
        {
            let _state = self.lock();
            self.stopping.store(true, Ordering::SeqCst);
        }
        self.changed.notify_all();
    }

    /// Waits (on the condvar) until `done` holds or `timeout` passes, then
    /// returns `result` of the state as it is then.
    pub fn wait_until<T>(
        &self,
        timeout: Duration,
        done: impl Fn(&S) -> bool,
        result: impl Fn(&S) -> T,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if done(&state) || now >= deadline {
                return result(&state);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
