//! Message transparency: CRLF line ends and, for DATA, dot-stuffing
//! (RFC 5321 §4.5.2). Works on a stream of chunks so no message is held whole.
//!
//! Every bare CR or bare LF becomes CRLF, so `<LF>.<CR><LF>` can never reach
//! the wire (SMTP smuggling), whatever the message file holds.

#[derive(Debug, Clone)]
pub struct Transparency {
    dot_stuff: bool,
    pending_cr: bool,
    at_line_start: bool,
}

impl Transparency {
    /// CRLF normalisation with dot-stuffing: the DATA body.
    pub fn for_data() -> Self {
        Transparency {
            dot_stuff: true,
            pending_cr: false,
            at_line_start: true,
        }
    }

    /// CRLF normalisation only: what intake stores in the spool.
    pub fn for_storage() -> Self {
        Transparency {
            dot_stuff: false,
            ..Self::for_data()
        }
    }

    /// Appends the transformed `input` to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 32 + 2);
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.at_line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.at_line_start = true;
                }
                _ => {
                    if self.at_line_start && self.dot_stuff && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    self.at_line_start = false;
                }
            }
        }
    }

    /// Ends the stream: completes the last line and, for DATA, adds `.CRLF`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        self.pending_cr = false;
        self.at_line_start = true;
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
    fn storage_mode_does_not_stuff() {
        let mut t = Transparency::for_storage();
        let mut out = Vec::new();
        t.feed(b".hidden\nline", &mut out);
        t.finish(&mut out);
        assert_eq!(out, b".hidden\r\nline\r\n");
    }
}
