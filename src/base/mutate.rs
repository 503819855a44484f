//! Test support: real inputs, mutated the way a hostile or broken peer
//! mangles them (bytes flipped, inserted, deleted, duplicated, truncated;
//! tokens of the format spliced in; long runs; input cut into pieces), from
//! a seeded generator so every failure replays. The property tests over the
//! reply parser, the SMTP session, the INI reader and the intake parsers use
//! it; `make fuzz` runs them with a large count (PBXMAIL_PROPTEST_CASES, and
//! another seed with PBXMAIL_PROPTEST_SEED) beside the cargo-fuzz targets.
//! It lives on the bottom floor so no parser's tests import another's.

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

/// The seed a property test starts from: `default`, or PBXMAIL_PROPTEST_SEED
/// (decimal, or hex with `0x` as failures print it) to replay a failure or
/// to explore other cases.
pub fn seed(default: u64) -> u64 {
    std::env::var("PBXMAIL_PROPTEST_SEED")
        .ok()
        .and_then(|s| match s.trim().strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.trim().parse().ok(),
        })
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

/// Longest token-mutated input: long runs and copies must not grow it
/// without bound; below the intake's header block bound (1 MiB), so that
/// limit is met only where a test asks for it.
pub const MAX_TOKEN_LEN: usize = 256 * 1024;

/// `input` with one to eight edits at the level of a format's tokens: a
/// byte replaced or inserted, one of `tokens` (the byte strings that mean
/// something to the format: line ends, separators, whole commands) spliced
/// in, a stretch deleted or copied elsewhere, a truncation, or now and then
/// a run of 60 000 to 80 000 of one of `runs` (lines past 64 KiB bounds).
/// At most [`MAX_TOKEN_LEN`] bytes; `tokens` and `runs` must not be empty.
pub fn mutate_tokens(input: &[u8], tokens: &[&[u8]], runs: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(out.len() + 1);
        match rng.below(8) {
            0 => {
                if let Some(b) = out.get_mut(at) {
                    *b = (rng.next() & 0xff) as u8;
                }
            }
            1 | 2 => {
                let token = *rng.pick(tokens);
                out.splice(at..at, token.iter().copied());
            }
            3 => {
                let end = (at + rng.below(32)).min(out.len());
                out.drain(at..end);
            }
            4 => {
                let end = (at + rng.below(256)).min(out.len());
                let copy = out[at..end].to_vec();
                let to = rng.below(out.len() + 1);
                out.splice(to..to, copy);
            }
            5 => out.truncate(at),
            6 => {
                if rng.below(8) == 0 {
                    let byte = *rng.pick(runs);
                    let run = vec![byte; 60_000 + rng.below(20_000)];
                    out.splice(at..at, run);
                }
            }
            _ => out.insert(at, (rng.next() & 0xff) as u8),
        }
        out.truncate(MAX_TOKEN_LEN);
    }
    out
}

/// `input` cut into pieces of random sizes (1 byte up to 4 KiB, short ones
/// often), as reads from a socket or a pipe deliver it.
pub fn pieces<'a>(input: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let most = if rng.below(4) == 0 { 8 } else { 4096 };
        let n = 1 + rng.below(most);
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(piece);
        rest = tail;
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

    #[test]
    fn token_mutations_replay_stay_bounded_and_pieces_rejoin() {
        let input = b"EHLO h\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n";
        let tokens: &[&[u8]] = &[b"\r\n", b".", b"RSET\r\n"];
        let (mut a, mut b, mut cut) = (Rng::seeded(3), Rng::seeded(3), Rng::seeded(4));
        let mut changed = 0;
        for _ in 0..500 {
            let out = mutate_tokens(input, tokens, b"x.", &mut a);
            assert_eq!(out, mutate_tokens(input, tokens, b"x.", &mut b));
            assert!(out.len() <= MAX_TOKEN_LEN);
            changed += usize::from(out != input);
            assert_eq!(pieces(&out, &mut cut).concat(), out);
        }
        assert!(changed > 400, "{changed} of 500");
    }
}
