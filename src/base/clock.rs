//! The clock: wall time in Unix milliseconds, the unit of every time in the
//! spool. `Clock` lets state that schedules by time take a fake one in tests.

use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time.
pub trait Clock {
    /// Unix milliseconds now.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // Before 1970 (a clock not yet set on a PBX that just booted) reads as 0.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// Unix milliseconds now, from the system clock.
pub fn now_ms() -> u64 {
    SystemClock.now_ms()
}

/// Unix seconds now, from the system clock.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// A clock that moves only when a test moves it.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeClock(std::sync::atomic::AtomicU64);

#[cfg(test)]
impl FakeClock {
    pub fn at(ms: u64) -> FakeClock {
        FakeClock(std::sync::atomic::AtomicU64::new(ms))
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn advance(&self, by: std::time::Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        self.set(now.saturating_add(by));
    }
}

#[cfg(test)]
impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
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
    }

    #[test]
    fn fake_clock_moves_only_when_told() {
        let clock = FakeClock::at(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.now_ms(), 3_000);
        clock.set(10);
        assert_eq!(clock.now_ms(), 10);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now_ms(), u64::MAX);
    }
}
