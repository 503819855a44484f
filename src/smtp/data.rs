//! Message transparency: CRLF line ends and, for DATA, dot-stuffing
//! (RFC 5321 §4.5.2). Works on a stream of chunks so no message is held whole.
//!
//! Every bare CR or bare LF becomes CRLF, so `<LF>.<CR><LF>` can never reach
//! the wire (SMTP smuggling), whatever the message file holds. On the wire,
//! lines over 998 octets (RFC 5322 §2.1.1) are broken with CRLF SPACE, as
//! Postfix does (smtp_line_length_limit), which keeps header folding valid.

/// Longest line sent, without its CRLF.
const MAX_WIRE_LINE: usize = 998;

#[derive(Debug, Clone)]
pub struct Transparency {
    dot_stuff: bool,
    fold_long_lines: bool,
    pending_cr: bool,
    at_line_start: bool,
    line_len: usize,
}

impl Transparency {
    /// The DATA body: CRLF, dot-stuffing, long lines folded.
    pub fn for_data() -> Self {
        Transparency {
            dot_stuff: true,
            fold_long_lines: true,
            pending_cr: false,
            at_line_start: true,
            line_len: 0,
        }
    }

    /// A BDAT body (RFC 3030): no dot-stuffing, nothing ends it but the count.
    pub fn for_bdat() -> Self {
        Transparency {
            dot_stuff: false,
            ..Self::for_data()
        }
    }

    /// CRLF normalisation only: what intake stores in the spool.
    pub fn for_storage() -> Self {
        Transparency {
            dot_stuff: false,
            fold_long_lines: false,
            ..Self::for_data()
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.at_line_start = true;
        self.line_len = 0;
    }

    /// Appends the transformed `input` to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        // Saturating: for storage lines are never folded, so nothing bounds
        // their length but the input's.
        out.reserve(
            input
                .len()
                .saturating_add(input.len() / 32)
                .saturating_add(2),
        );
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                self.end_line(out);
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => self.end_line(out),
                _ => {
                    if self.fold_long_lines && self.line_len >= MAX_WIRE_LINE {
                        out.extend_from_slice(b"\r\n ");
                        self.line_len = 1;
                    }
                    if self.at_line_start && self.dot_stuff && b == b'.' {
                        out.push(b'.');
                        self.line_len = self.line_len.saturating_add(1);
                    }
                    out.push(b);
                    self.line_len = self.line_len.saturating_add(1);
                    self.at_line_start = false;
                }
            }
        }
    }

    /// Ends the stream: completes the last line and, for DATA, adds `.CRLF`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.at_line_start {
            self.end_line(out);
        }
        self.pending_cr = false;
        if self.dot_stuff {
            out.extend_from_slice(b".\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(chunks: &[&[u8]]) -> Vec<u8> {
        let mut t = Transparency::for_data();
        let mut out = Vec::new();
        for c in chunks {
            t.feed(c, &mut out);
        }
        t.finish(&mut out);
        out
    }

    #[test]
    fn stuffs_leading_dots() {
        assert_eq!(
            data(&[b".\r\n.x\r\n..\r\nmid.dle\r\n"]),
            b"..\r\n..x\r\n...\r\nmid.dle\r\n.\r\n"
        );
    }

    #[test]
    fn adds_missing_final_crlf() {
        assert_eq!(data(&[b"no newline"]), b"no newline\r\n.\r\n");
        assert_eq!(data(&[b""]), b".\r\n");
    }

    #[test]
    fn normalises_bare_cr_and_lf() {
        assert_eq!(data(&[b"a\nb\rc\r\n"]), b"a\r\nb\r\nc\r\n.\r\n");
    }

    #[test]
    fn smuggling_sequence_cannot_pass() {
        let out = data(&[b"x\n.\r\nMAIL FROM:<evil@x>\r\n"]);
        assert_eq!(out, b"x\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n");
        let out = data(&[b"x\r\n.\n"]);
        assert_eq!(out, b"x\r\n..\r\n.\r\n");
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        let whole = data(&[b"a\r\n.b\r\n\r\n."]);
        let split = data(&[b"a\r", b"\n", b".", b"b\r", b"\n\r", b"\n."]);
        assert_eq!(whole, split);
        assert_eq!(whole, b"a\r\n..b\r\n\r\n..\r\n.\r\n");
    }

    #[test]
    fn lines_up_to_998_octets_pass_longer_ones_fold() {
        let exact = "x".repeat(998);
        assert_eq!(
            data(&[exact.as_bytes()]),
            format!("{exact}\r\n.\r\n").into_bytes()
        );
        let long = "y".repeat(1000);
        let out = String::from_utf8(data(&[long.as_bytes()])).unwrap();
        assert_eq!(out, format!("{}\r\n {}\r\n.\r\n", "y".repeat(998), "yy"));
        // The stuffing dot counts toward the wire line.
        let dotted = format!(".{}", "z".repeat(998));
        let out = String::from_utf8(data(&[dotted.as_bytes()])).unwrap();
        assert!(out.lines().all(|l| l.len() <= 998));
    }

    #[test]
    fn bdat_mode_folds_but_does_not_stuff_or_terminate() {
        let mut t = Transparency::for_bdat();
        let mut out = Vec::new();
        t.feed(b".x\n.", &mut out);
        t.finish(&mut out);
        assert_eq!(out, b".x\r\n.\r\n");
    }

    #[test]
    fn storage_mode_does_not_stuff() {
        let mut t = Transparency::for_storage();
        let mut out = Vec::new();
        t.feed(b".hidden\nline", &mut out);
        t.finish(&mut out);
        assert_eq!(out, b".hidden\r\nline\r\n");
    }
}
