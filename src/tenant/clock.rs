//! The time a tenant's queue runs on: the system clock in the daemon, a
//! hand-set one in tests, so backoff, expiry and pacing are tested without
//! waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Set in tests: the time is whatever the test last said.
    fake: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { fake: None }
    }

    /// A clock that stands at `now_ms` until `set` moves it.
    #[cfg(test)]
    pub fn fake(now_ms: u64) -> Clock {
        Clock {
            fake: Some(Arc::new(AtomicU64::new(now_ms))),
        }
    }

    #[cfg(test)]
    pub fn set(&self, now_ms: u64) {
        if let Some(fake) = &self.fake {
            fake.store(now_ms, Ordering::Release);
        }
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        match &self.fake {
            Some(fake) => fake.load(Ordering::Acquire),
            None => crate::spool::unix_millis(),
        }
    }
}
