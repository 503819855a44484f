//! Reading a submitted message: the header block into memory (bounded, so it
//! can be inspected and amended), the body as a stream of pieces (never whole).
//! Implements sendmail's rule that a lone `.` line ends input unless `-i`.

use std::io::{self, BufRead, Read};

/// A piece of a line: lines longer than this arrive in several pieces.
const MAX_PIECE: u64 = 64 * 1024;
/// The whole header block; real PBX mail has a few KiB.
const MAX_HEADER_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Header {
    pub name: String,
    /// The field as submitted, folded lines included, each line without its line end.
    pub lines: Vec<String>,
}

impl Header {
    /// The unfolded value after the colon.
    pub fn value(&self) -> String {
        let joined = self.lines.join(" ");
        joined
            .split_once(':')
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    }

    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The header block is unusable; the string says why.
    BadHeaders(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Pulls line pieces from the submitter, stopping at EOF or a lone dot.
pub struct MessageReader<R: BufRead> {
    input: R,
    dot_terminates: bool,
    at_line_start: bool,
    done: bool,
}

impl<R: BufRead> MessageReader<R> {
    pub fn new(input: R, dot_terminates: bool) -> Self {
        MessageReader {
            input,
            dot_terminates,
            at_line_start: true,
            done: false,
        }
    }

    /// Fills `buf` with the next piece; false at the end of the message.
    pub fn next_piece(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        buf.clear();
        if self.done {
            return Ok(false);
        }
        let n = (&mut self.input).take(MAX_PIECE).read_until(b'\n', buf)?;
        if n == 0 {
            self.done = true;
            return Ok(false);
        }
        let lone_dot = matches!(buf.as_slice(), b".\n" | b".\r\n" | b".");
        if self.dot_terminates && self.at_line_start && lone_dot {
            self.done = true;
            return Ok(false);
        }
        self.at_line_start = buf.last() == Some(&b'\n');
        Ok(true)
    }

    /// Reads the header block. Returns the headers and, if the first body line
    /// was already read (a message without a blank separator line), that piece.
    pub fn read_headers(&mut self) -> Result<(Vec<Header>, Option<Vec<u8>>), ReadError> {
        let mut block = HeaderBlock::default();
        let mut piece = Vec::new();
        while self.next_piece(&mut piece)? {
            match block.take(&piece).map_err(ReadError::BadHeaders)? {
                Step::More => {}
                Step::Separator => return Ok((block.into_headers(), None)),
                Step::Body => return Ok((block.into_headers(), Some(piece))),
            }
        }
        Ok((block.into_headers(), None))
    }
}

/// Where the header block stands after one more line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A header field (or a folded line of one): more may follow.
    More,
    /// The empty line that separates headers from the body.
    Separator,
    /// Not a header: the body starts with this line, without a separator.
    Body,
}

/// The header block parsed line by line as it arrives, bounded in size, so
/// a stream (sendmail's stdin, an SMTP DATA) can be inspected before it is
/// stored. Both ways in share it.
#[derive(Debug, Default)]
pub struct HeaderBlock {
    headers: Vec<Header>,
    size: usize,
}

impl HeaderBlock {
    /// Takes the next line piece (with its line end). An error says why the
    /// block cannot be inspected (too large, a line over 64 KiB).
    pub fn take(&mut self, piece: &[u8]) -> Result<Step, String> {
        self.size = self.size.saturating_add(piece.len());
        if self.size > MAX_HEADER_BYTES {
            return Err(format!(
                "the header block is larger than {} KiB",
                MAX_HEADER_BYTES / 1024
            ));
        }
        if piece.last() != Some(&b'\n') {
            return Err("a header line is longer than 64 KiB".into());
        }
        let line = String::from_utf8_lossy(piece);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok(Step::Separator);
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = self.headers.last_mut() {
                last.lines.push(line.to_string());
                return Ok(Step::More);
            }
        }
        match field_name(line) {
            Some(name) => {
                self.headers.push(Header {
                    name: name.to_string(),
                    lines: vec![line.to_string()],
                });
                Ok(Step::More)
            }
            None => Ok(Step::Body),
        }
    }

    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    pub fn into_headers(self) -> Vec<Header> {
        self.headers
    }
}

/// RFC 5322 §3.6.8: printable ASCII except colon, then a colon.
fn field_name(line: &str) -> Option<&str> {
    let (name, _) = line.split_once(':')?;
    let name = name.trim_end();
    let ok = !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &str, dot: bool) -> (Vec<Header>, String) {
        let mut r = MessageReader::new(input.as_bytes(), dot);
        let (headers, first) = r.read_headers().unwrap();
        let mut body = first.unwrap_or_default();
        let mut piece = Vec::new();
        while r.next_piece(&mut piece).unwrap() {
            body.extend_from_slice(&piece);
        }
        (headers, String::from_utf8(body).unwrap())
    }

    #[test]
    fn headers_unfold_and_body_streams() {
        let (h, body) = read_all("Subject: a\n  long one\nTo: x@y.example\n\nbody\n", true);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].value(), "a   long one");
        assert!(h[1].is("to"));
        assert_eq!(body, "body\n");
    }

    #[test]
    fn lone_dot_ends_input_unless_i() {
        let (_, body) = read_all("S: x\n\nline\n.\nafter\n", true);
        assert_eq!(body, "line\n");
        let (_, body) = read_all("S: x\n\nline\n.\nafter\n", false);
        assert_eq!(body, "line\n.\nafter\n");
        let (_, body) = read_all("S: x\n\n..\n.x\n", true);
        assert_eq!(body, "..\n.x\n");
    }

    #[test]
    fn body_without_separator() {
        let (h, body) = read_all("Subject: x\nthis is not a header\nmore\n", true);
        assert_eq!(h.len(), 1);
        assert_eq!(body, "this is not a header\nmore\n");
    }

    #[test]
    fn oversized_header_is_refused() {
        let big = format!("X: {}\n\n", "a".repeat(70_000));
        let mut r = MessageReader::new(big.as_bytes(), true);
        assert!(matches!(r.read_headers(), Err(ReadError::BadHeaders(_))));
    }
}
