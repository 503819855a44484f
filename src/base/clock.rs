//! The clock: wall time in Unix milliseconds, the unit of every time in the
//! spool. State that schedules by time (a tenant's queue, backoff, expiry,
//! pacing) takes a `Clock`, so tests set the time instead of waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The system clock, or in tests one that stands where the test puts it.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    fake: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { fake: None }
    }

    /// A clock that stands at `now_ms` until `set` or `advance` moves it.
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

    #[cfg(test)]
    pub fn advance(&self, by: std::time::Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.set(self.now_ms().saturating_add(by));
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        match &self.fake {
            Some(fake) => fake.load(Ordering::Acquire),
            None => now_ms(),
        }
    }
}

/// Unix milliseconds now, from the system clock.
pub fn now_ms() -> u64 {
    // Before 1970 (a clock not yet set on a PBX that just booted) reads as 0.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Unix seconds now, from the system clock.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn system_clock_is_past_2020_and_seconds_agree() {
        let ms = now_ms();
        assert!(ms > 1_577_836_800_000, "{ms}");
        assert!(now_secs() >= ms / 1000);
        assert!(Clock::system().now_ms() >= ms);
    }

    #[test]
    fn fake_clock_moves_only_when_told() {
        let clock = Clock::fake(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.now_ms(), 3_000);
        clock.set(10);
        assert_eq!(clock.now_ms(), 10);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now_ms(), u64::MAX);
    }
}
