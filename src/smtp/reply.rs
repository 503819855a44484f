//! SMTP replies (RFC 5321 §4.2): a three-digit code, then `-` on every line but
//! the last. The parser is bounded in line length and line count, so a hostile
//! server can neither exhaust memory nor keep us reading forever.

use std::fmt;
use std::io::{self, BufRead, Read};

/// RFC 5321 §4.5.3.1.5 allows 512 octets; real servers exceed it a little.
const MAX_LINE: usize = 2048;
/// EHLO replies are the longest legitimate multi-line replies (a few dozen lines).
const MAX_LINES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReplyCode(pub u16);

impl ReplyCode {
    pub fn is_positive(self) -> bool {
        (200..300).contains(&self.0)
    }
    pub fn is_permanent(self) -> bool {
        (500..600).contains(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: ReplyCode,
    /// Text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply pbxmail makes itself for a decision the relay's limits force
    /// (RFC 3463 code in the text, like a relay's own).
    pub fn local(code: u16, text: &str) -> Reply {
        Reply {
            code: ReplyCode(code),
            lines: vec![text.to_string()],
        }
    }

    /// The RFC 3463 enhanced status code, when the first line starts with one
    /// of the same class as the reply code (e.g. "5.1.1" on a 550). Digits are
    /// read with `digit`, never by subtracting `b'0'`: "550 !.1.1" is text.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?.split_ascii_whitespace().next()?;
        let mut parts = first.split('.');
        let class = match parts.next()?.as_bytes() {
            &[c] => digit(c)?,
            _ => return None,
        };
        let ok = class == self.code.0 / 100
            && parts.clone().count() == 2
            && parts.all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(first)
    }

    /// One line for logs and the queue: "550 5.1.1 no such user".
    pub fn summary(&self) -> String {
        let text = self.lines.join(" ");
        let text = text.trim();
        if text.is_empty() {
            self.code.0.to_string()
        } else {
            format!("{} {}", self.code.0, text)
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

#[derive(Debug)]
pub enum ReplyError {
    Io(io::Error),
    /// The server closed the connection before a complete reply.
    Closed,
    /// Not a well-formed reply; the string says what was wrong.
    Malformed(String),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Io(e) => write!(f, "{e}"),
            ReplyError::Closed => f.write_str("connection closed by the server"),
            ReplyError::Malformed(why) => write!(f, "malformed reply: {why}"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// Reads one complete reply. Bare LF line ends are tolerated.
pub fn read_reply(input: &mut impl BufRead) -> Result<Reply, ReplyError> {
    let mut lines = Vec::new();
    let mut code: Option<u16> = None;
    let mut buf = Vec::with_capacity(128);
    loop {
        buf.clear();
        let n = input
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(ReplyError::Io)?;
        if n == 0 {
            return Err(ReplyError::Closed);
        }
        if buf.last() != Some(&b'\n') {
            return Err(if n > MAX_LINE {
                ReplyError::Malformed(format!("line longer than {MAX_LINE} octets"))
            } else {
                ReplyError::Closed
            });
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let (this_code, last, text) = parse_line(&buf)?;
        match code {
            None => code = Some(this_code),
            Some(c) if c != this_code => {
                return Err(ReplyError::Malformed(format!(
                    "code changed from {c} to {this_code} within one reply"
                )))
            }
            Some(_) => {}
        }
        lines.push(text);
        if last {
            return Ok(Reply {
                code: ReplyCode(this_code),
                lines,
            });
        }
        if lines.len() >= MAX_LINES {
            return Err(ReplyError::Malformed(format!(
                "more than {MAX_LINES} lines"
            )));
        }
    }
}

fn parse_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    let bad =
        |why: &str| ReplyError::Malformed(format!("{why}: {:?}", String::from_utf8_lossy(line)));
    if line.contains(&0) {
        return Err(bad("NUL in reply"));
    }
    let digits = line.get(..3).ok_or_else(|| bad("shorter than a code"))?;
    // RFC 5321 §4.2: the first digit 2 to 5, the second 0 to 5, the third any.
    let code = match *digits {
        [a @ b'2'..=b'5', b @ b'0'..=b'5', c @ b'0'..=b'9'] => {
            code_of(a, b, c).ok_or_else(|| bad("no reply code"))?
        }
        _ => return Err(bad("no reply code")),
    };
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, line.get(4..).unwrap_or_default()),
        Some(b'-') => (false, line.get(4..).unwrap_or_default()),
        Some(_) => return Err(bad("code not followed by space or '-'")),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// The value of an ASCII digit; None for any other byte.
fn digit(byte: u8) -> Option<u16> {
    char::from(byte)
        .to_digit(10)
        .and_then(|d| u16::try_from(d).ok())
}

/// Three ASCII digits as a number (at most 999, so no overflow is possible;
/// checked all the same, as every sum a peer's bytes reach).
fn code_of(hundreds: u8, tens: u8, units: u8) -> Option<u16> {
    digit(hundreds)?
        .checked_mul(100)?
        .checked_add(digit(tens)?.checked_mul(10)?)?
        .checked_add(digit(units)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Reply, ReplyError> {
        read_reply(&mut s.as_bytes())
    }

    #[test]
    fn single_line() {
        let r = parse("250 2.0.0 Ok\r\n").unwrap();
        assert_eq!(r.code, ReplyCode(250));
        assert_eq!(r.summary(), "250 2.0.0 Ok");
    }

    #[test]
    fn multi_line_and_bare_lf() {
        let r = parse("250-mx.example\n250-PIPELINING\r\n250 STARTTLS\r\n").unwrap();
        assert_eq!(r.lines, vec!["mx.example", "PIPELINING", "STARTTLS"]);
    }

    #[test]
    fn enhanced_status_codes() {
        assert_eq!(
            parse("550 5.1.1 no such user\r\n").unwrap().enhanced(),
            Some("5.1.1")
        );
        assert_eq!(parse("250 2.0.0 Ok\r\n").unwrap().enhanced(), Some("2.0.0"));
        // Class must agree with the code; junk is not a code.
        assert_eq!(parse("550 4.1.1 odd\r\n").unwrap().enhanced(), None);
        assert_eq!(parse("250 ok\r\n").unwrap().enhanced(), None);
        assert_eq!(parse("250 2.0\r\n").unwrap().enhanced(), None);
        assert_eq!(parse("354\r\n").unwrap().enhanced(), None);
    }

    #[test]
    fn bare_code_is_a_reply() {
        assert_eq!(parse("354\r\n").unwrap().code, ReplyCode(354));
    }

    #[test]
    fn reads_exactly_one_reply() {
        let mut input = &b"250 one\r\n221 two\r\n"[..];
        assert_eq!(read_reply(&mut input).unwrap().code, ReplyCode(250));
        assert_eq!(read_reply(&mut input).unwrap().code, ReplyCode(221));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "hello\r\n",
            "25\r\n",
            "250x\r\n",
            "650 no\r\n",
            "250-a\r\n251 b\r\n",
            "250 a\0b\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ReplyError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn eof_is_closed() {
        assert!(matches!(parse(""), Err(ReplyError::Closed)));
        assert!(matches!(parse("250-partial\r\n"), Err(ReplyError::Closed)));
        assert!(matches!(parse("250 no newline"), Err(ReplyError::Closed)));
    }

    #[test]
    fn bounds_line_length_and_count() {
        let long = format!("250 {}\r\n", "x".repeat(MAX_LINE));
        assert!(matches!(parse(&long), Err(ReplyError::Malformed(_))));
        let many = "250-x\r\n".repeat(MAX_LINES + 1) + "250 end\r\n";
        assert!(matches!(parse(&many), Err(ReplyError::Malformed(_))));
    }

    #[test]
    fn random_replies_parse_within_bounds_and_never_past_one_reply() {
        // Replies shaped like a server's, mutated: 1 to 130 lines of up to
        // 3000 octets, codes sometimes changing, separators sometimes wrong,
        // NULs and bare LFs sprinkled in. Whatever the input, an accepted
        // reply obeys every bound, and the parser stops at its last line.
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n.max(1)
        };
        let noise = [b'a', b' ', b'-', b'.', b'\r', 0u8, 0xc3, b'9'];
        let mut accepted = 0;
        for _ in 0..3_000 {
            let mut input = Vec::new();
            let lines = 1 + next(130);
            let code = format!("{}{}{}", 2 + next(4), next(6), next(10));
            for i in 0..lines {
                let this_code = if next(40) == 0 {
                    format!("{}", 100 + next(900))
                } else {
                    code.clone()
                };
                input.extend_from_slice(this_code.as_bytes());
                let last = i + 1 == lines;
                input.push(match next(30) {
                    0 => b'x',
                    _ if last => b' ',
                    _ => b'-',
                });
                let len = if next(20) == 0 { next(3000) } else { next(60) };
                for _ in 0..len {
                    input.push(if next(200) == 0 {
                        noise[next(8) as usize]
                    } else {
                        b'a' + next(26) as u8
                    });
                }
                input.extend_from_slice(if next(10) == 0 { b"\n" } else { b"\r\n" });
            }
            let after = b"250 NEXT\r\n";
            input.extend_from_slice(after);
            let mut reader = &input[..];
            if let Ok(reply) = read_reply(&mut reader) {
                accepted += 1;
                assert!((200..=559).contains(&reply.code.0), "{reply:?}");
                assert!(
                    reply.lines.len() <= MAX_LINES,
                    "{} lines",
                    reply.lines.len()
                );
                assert!(reply.lines.iter().all(|l| l.len() <= MAX_LINE));
                // Exactly the reply was read: its last line ends it, and
                // what follows is still unread.
                assert_eq!(reader, &after[..], "read past or short of the reply");
            }
        }
        // Enough of them well-formed that the bounds above were really checked.
        assert!(accepted >= 200, "only {accepted} of 3000 parsed");
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every short mix of the bytes that matter.
        let alphabet = [b'2', b'5', b'0', b' ', b'-', b'\r', b'\n', 0u8, 0xff, b'x'];
        let mut input = Vec::new();
        for seed in 0u32..20_000 {
            input.clear();
            let mut s = seed;
            for _ in 0..12 {
                input.push(alphabet[(s % 10) as usize]);
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345) >> 3;
            }
            let mut reader = &input[..];
            while read_reply(&mut reader).is_ok() {}
        }
    }

    #[test]
    fn enhanced_code_never_underflows_on_a_non_digit_class() {
        // "!" is below b'0': the old `c - b'0'` panicked here in debug builds.
        for text in ["550 !.1.1 x\r\n", "550 \x01.1.1\r\n", "250 /.0.0\r\n"] {
            assert_eq!(parse(text).unwrap().enhanced(), None, "{text:?}");
        }
        assert_eq!(parse("550 5.1.1\r\n").unwrap().enhanced(), Some("5.1.1"));
    }

    /// Replies as real relays send them (Postfix, Exchange, Gmail, odd ones).
    const REAL_REPLIES: &[&str] = &[
        "220 mx.example.com ESMTP Postfix (Debian/GNU)\r\n",
        "250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n\
         250-ETRN\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n\
         250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n",
        "250 2.1.0 Ok\r\n",
        "250 2.1.5 Ok\r\n",
        "354 End data with <CR><LF>.<CR><LF>\r\n",
        "250 2.0.0 Ok: queued as 4Bq3Xk1Z2Yz9\r\n",
        "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown\r\n",
        "550-5.7.26 Unauthenticated email is not accepted from this domain.\r\n\
         550 5.7.26 https://support.google.com/mail/answer/81126 - gsmtp\r\n",
        "535 5.7.3 Authentication unsuccessful [AM0PR01CA0001.eurprd01.prod.outlook.com]\r\n",
        "334 VXNlcm5hbWU6\r\n",
        "421 4.7.0 mx.example.com Error: too many connections\r\n",
        "452 4.5.3 Error: too many recipients\r\n",
        "550 !.1.1 odd\r\n",
        "554\r\n",
        "221 2.0.0 Bye\n",
    ];

    /// Whatever a relay sends, the parser returns within its bounds and
    /// never panics (in debug builds arithmetic overflow panics, so this is
    /// also the overflow check; `cargo test --release` runs it too).
    #[test]
    fn mutated_real_replies_never_panic_and_stay_bounded() {
        use crate::base::mutate::{cases, mutate, seed, Rng};
        let mut rng = Rng::seeded(seed(0x5eed_0017));
        let mut accepted = 0usize;
        let count = cases(20_000);
        for _ in 0..count {
            let mut input = Vec::new();
            for _ in 0..1 + rng.below(3) {
                input.extend_from_slice(rng.pick(REAL_REPLIES).as_bytes());
            }
            let input = mutate(&input, &mut rng);
            let mut reader = &input[..];
            let mut replies = 0;
            while let Ok(reply) = read_reply(&mut reader) {
                replies += 1;
                accepted += 1;
                assert!((200..=559).contains(&reply.code.0), "{reply:?}");
                assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_LINES);
                // Lossy UTF-8 may widen a byte to three; never more.
                assert!(reply.lines.iter().all(|l| l.len() <= 3 * MAX_LINE));
                if let Some(code) = reply.enhanced() {
                    assert_eq!(
                        code.as_bytes().first().and_then(|&c| digit(c)),
                        Some(reply.code.0 / 100)
                    );
                    let first =
                        reply.lines[0].trim_start_matches(|c: char| c.is_ascii_whitespace());
                    assert!(first.starts_with(code), "{reply:?}");
                }
                assert!(reply.summary().starts_with(&reply.code.0.to_string()));
                let _ = crate::smtp::Capabilities::from_ehlo(&reply);
                // Each reply consumes at least its code and a line end.
                assert!(
                    replies * 4 <= input.len(),
                    "read more replies than bytes allow"
                );
            }
        }
        // Most mutations leave something parseable: the checks above ran.
        assert!(
            accepted >= count / 4,
            "only {accepted} replies in {count} cases"
        );
    }
}
