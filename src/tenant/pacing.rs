//! How often a tenant may try: exponential backoff with jitter between
//! retry_min and retry_max, and a token bucket for `rate_limit` (providers
//! such as Exchange Online accept 30 messages a minute per mailbox).
//! Pure arithmetic on millisecond clocks, so it is tested without waiting.

use crate::config::RateLimit;
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    /// Where the jitter comes from: the system's randomness, or a fixed
    /// value in tests (0 = -10%, u16::MAX = +10%).
    pub random: fn() -> u16,
}

impl Backoff {
    /// Between `min` and `max`, with jitter from the system's randomness.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            random: random_u16,
        }
    }

    /// The wait before attempt `attempts + 1`: min·2^(attempts-1), capped at
    /// max, then ±10% so retries of many messages (or tenants sharing a
    /// relay) do not arrive in lockstep.
    pub fn after(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(20);
        let base = self.min.saturating_mul(1u32 << exponent).min(self.max);
        let jitter = f64::from((self.random)()) / f64::from(u16::MAX) * 0.2 - 0.1;
        scaled(base, 1.0 + jitter)
    }
}

/// `base` times `factor` (0.9 to 1.1), saturating where `mul_f64` would
/// panic: retry values near the top of what a Duration holds.
fn scaled(base: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

fn random_u16() -> u16 {
    let mut bytes = [0u8; 2];
    // Without entropy there is no jitter, which is still correct.
    let _ = SystemRandom::new().fill(&mut bytes);
    u16::from_le_bytes(bytes)
}

/// Token bucket: holds up to `messages` tokens, refilled evenly over `per`.
#[derive(Debug, Clone)]
pub struct RateBucket {
    capacity: f64,
    per_token_ms: f64,
    tokens: f64,
    updated_ms: u64,
}

impl RateBucket {
    pub fn new(limit: RateLimit, now_ms: u64) -> RateBucket {
        let capacity = f64::from(limit.messages.max(1));
        RateBucket {
            capacity,
            per_token_ms: limit.per.as_millis() as f64 / capacity,
            tokens: capacity,
            updated_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64;
        if self.per_token_ms > 0.0 {
            self.tokens = (self.tokens + elapsed / self.per_token_ms).min(self.capacity);
        } else {
            self.tokens = self.capacity;
        }
        self.updated_ms = now_ms;
    }

    /// Takes a token if one is there.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token will be there (now, if one is).
    pub fn next_token_at(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            return now_ms;
        }
        // An `as` cast saturates; the sum must too (a rate_limit interval
        // near the top of u64 milliseconds).
        now_ms.saturating_add(((1.0 - self.tokens) * self.per_token_ms).ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(3600));
        for (attempts, base) in [(1, 60.0), (2, 120.0), (3, 240.0), (7, 3600.0), (30, 3600.0)] {
            let got = b.after(attempts).as_secs_f64();
            assert!(
                got >= base * 0.9 - 0.001 && got <= base * 1.1 + 0.001,
                "{attempts}: {got}"
            );
        }
    }

    #[test]
    fn backoff_jitter_comes_from_its_source() {
        let low = Backoff {
            random: || 0,
            ..Backoff::new(Duration::from_secs(100), Duration::from_secs(1000))
        };
        assert_eq!(low.after(1).as_millis(), 90_000);
        let high = Backoff {
            random: || u16::MAX,
            ..low
        };
        assert_eq!(high.after(1).as_millis(), 110_000);
        assert_eq!(high.after(9).as_millis(), 1_100_000);
    }

    #[test]
    fn backoff_at_the_largest_duration_saturates_instead_of_panicking() {
        for random in [|| 0u16, || u16::MAX] {
            let b = Backoff {
                random,
                ..Backoff::new(Duration::MAX, Duration::MAX)
            };
            for attempts in [0, 1, 30, u32::MAX] {
                assert!(b.after(attempts) >= Duration::from_secs(u64::MAX / 10 * 9));
            }
        }
        assert_eq!(scaled(Duration::MAX, 1.1), Duration::MAX);
        assert_eq!(
            scaled(Duration::from_secs(100), 0.9),
            Duration::from_secs(90)
        );
    }

    #[test]
    fn next_token_near_the_end_of_the_clock_saturates() {
        let limit = RateLimit {
            messages: 1,
            per: Duration::MAX,
        };
        let now = u64::MAX - 1;
        let mut bucket = RateBucket::new(limit, now);
        assert!(bucket.try_take(now));
        assert_eq!(bucket.next_token_at(now), u64::MAX);
    }

    #[test]
    fn bucket_allows_a_burst_then_paces() {
        let limit = RateLimit {
            messages: 30,
            per: Duration::from_secs(60),
        };
        let mut bucket = RateBucket::new(limit, 0);
        assert_eq!((0..40).filter(|_| bucket.try_take(0)).count(), 30);
        // One token every 2 s.
        assert_eq!(bucket.next_token_at(0), 2000);
        assert!(!bucket.try_take(1999));
        assert!(bucket.try_take(2000));
        // A long idle time refills to the burst size, not beyond.
        assert_eq!((0..40).filter(|_| bucket.try_take(10_000_000)).count(), 30);
    }
}
