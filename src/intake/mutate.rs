//! Test-only: seeded mutations of real inputs for the intake parsers'
//! property tests (the sendmail header reader, the listener's conversation).
//! Reproducible and bounded: `PBXMAIL_FUZZ_SEED` and `PBXMAIL_FUZZ_CASES`
//! run other or more cases than `cargo test`'s few thousand.

/// splitmix64: small, fast, and the same sequence on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The seed and case count for a property test: the given defaults unless
/// the environment names others.
pub fn plan(default_cases: usize) -> (u64, usize) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let seed = env("PBXMAIL_FUZZ_SEED").unwrap_or(0x5EED_1414);
    let cases = env("PBXMAIL_FUZZ_CASES").map_or(default_cases, |n: u64| n as usize);
    (seed, cases)
}

/// Byte strings that mean something to a mail parser.
const TOKENS: &[&[u8]] = &[
    b"\r",
    b"\n",
    b"\r\n",
    b".",
    b"\n.\n",
    b"\r\n.\r\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b":",
    b" ",
    b"\t",
    b"<",
    b">",
    b"=",
    b"@",
    b"\"",
    b"(",
    b")",
    b"[",
    b"]",
    b"\\",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xfc",
    b"\x1b[2J",
    b"MAIL FROM:<x@acme.example>\r\n",
    b"RCPT TO:<y@x.example>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"RSET\r\n",
    b"EHLO h\r\n",
    b"SIZE=99999999999999999999",
    b"Bcc: z@x.example\r\n",
    b"From: <>\r\n",
    b"\r\n\r\n",
];

/// Longest mutated input: below the header block's bound, so that limit
/// is met only where a test asks for it.
const MAX_LEN: usize = 256 * 1024;

/// `input` with one to eight random edits.
pub fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(out.len() + 1);
        match rng.below(8) {
            0 => {
                if let Some(b) = out.get_mut(at) {
                    *b = rng.next() as u8;
                }
            }
            1 | 2 => {
                let token = *rng.pick(TOKENS);
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
                // A long run: lines past the 64 KiB piece and line bounds.
                if rng.below(8) == 0 {
                    let byte = *rng.pick(b"x: \r\n.");
                    let run = vec![byte; 60_000 + rng.below(20_000)];
                    out.splice(at..at, run);
                }
            }
            _ => {
                let at = rng.below(out.len() + 1);
                out.insert(at, rng.next() as u8);
            }
        }
        out.truncate(MAX_LEN);
    }
    out
}

/// `input` cut into pieces of random sizes (1 byte up to a few KiB).
pub fn pieces<'a>(rng: &mut Rng, input: &'a [u8]) -> Vec<&'a [u8]> {
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
