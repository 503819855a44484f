//! A small seeded random source for the kill-at-random-moments tests: the
//! seed is printed, and PBXMAIL_CRASH_SEED repeats a run.

use std::time::{SystemTime, UNIX_EPOCH};

/// xorshift64*: small, seedable, good enough to pick delays and sizes.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `PBXMAIL_CRASH_SEED` or the clock; prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = match std::env::var("PBXMAIL_CRASH_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("PBXMAIL_CRASH_SEED={s:?}: {e}")),
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        };
        eprintln!("{test}: seed {seed} (PBXMAIL_CRASH_SEED={seed} repeats this run)");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
