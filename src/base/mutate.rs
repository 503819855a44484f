//! Test support: real inputs, mutated the way a hostile or broken peer
//! mangles them (bytes flipped, inserted, deleted, duplicated, truncated), from
//! a seeded generator so every failure replays. The property tests over the
//! reply parser, the SMTP session and the INI reader use it; `make fuzz` runs
//! them with a large count (PBXMAIL_PROPTEST_CASES) beside the cargo-fuzz
//! targets. It lives on the bottom floor so no parser's tests import another's.

/// xorshift64: small, fast, deterministic; quality enough to shake a parser.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        // Zero is xorshift's one fixed point.
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        usize::try_from(self.next() % n.max(1)).unwrap_or(0)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// How many cases a property test runs: `default` (sized to take about a
/// second in a debug build), or PBXMAIL_PROPTEST_CASES for a longer run.
pub fn cases(default: usize) -> usize {
    std::env::var("PBXMAIL_PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// The bytes that matter to a line-and-code parser, most likely first.
const INTERESTING: &[u8] = b"\r\n\r\n -.0259!\0\x7f\x80\xff\xc3";

/// `input` with one to eight mutations, half of the bytes written drawn from
/// those that matter to a line-and-code parser (SMTP replies and commands).
pub fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    mutate_with(input, INTERESTING, rng)
}

/// [`mutate`] with the bytes that matter to another format (an INI file's
/// `[]=:;#\\`, say); `interesting` must not be empty.
pub fn mutate_with(input: &[u8], interesting: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(out.len() + 1);
        let byte = if rng.below(2) == 0 {
            *rng.pick(interesting)
        } else {
            (rng.next() & 0xff) as u8
        };
        match rng.below(6) {
            0 if at < out.len() => out[at] = byte,
            1 => out.insert(at, byte),
            2 if at < out.len() => {
                out.remove(at);
            }
            3 => out.truncate(at),
            4 => {
                // A piece repeated: a doubled line, a code twice.
                let len = rng.below(40).min(out.len() - at.min(out.len()));
                let piece = out[at..at + len].to_vec();
                out.splice(at..at, piece);
            }
            _ => {
                // A run of one byte: long lines, many blank lines.
                let run = vec![byte; rng.below(3000)];
                out.splice(at..at, run);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutations() {
        let input = b"250-mx\r\n250 SIZE 10\r\n";
        let (mut a, mut b) = (Rng::seeded(7), Rng::seeded(7));
        for _ in 0..100 {
            assert_eq!(mutate(input, &mut a), mutate(input, &mut b));
        }
    }

    #[test]
    fn mutations_change_the_input_mostly() {
        let input = b"250 2.0.0 Ok\r\n";
        let mut rng = Rng::seeded(1);
        let changed = (0..200)
            .filter(|_| mutate(input, &mut rng) != input)
            .count();
        assert!(changed > 150, "{changed} of 200");
    }
}
