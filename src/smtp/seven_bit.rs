//! Downgrading an 8-bit message to 7 bits for a relay without 8BITMIME
//! (RFC 6152 §3 forbids sending it raw), as Postfix does: every MIME leaf
//! part with 8-bit octets (or labelled 8bit/binary) is re-encoded as
//! quoted-printable (RFC 2045 §6.7) and relabelled; the rest passes as is.
//! What cannot be converted safely (8-bit in a header, in a message/* part,
//! in an already encoded part, or outside any part) is refused with a reason,
//! which the session turns into a 5.6.3 refusal before anything is sent.
//!
//! Two passes over the spooled message, both streaming line by line with
//! bounded memory: `plan` learns which parts need converting (a part's
//! header goes out before its body shows whether it has 8-bit octets), then
//! `Downgraded` reads the converted message.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

/// Longest piece of a line handled at once; longer lines come in pieces
/// (a MIME boundary line is never that long).
const MAX_SEGMENT: u64 = 8 * 1024;
/// Longest header field (with its folded lines) a part may have.
const MAX_FIELD: usize = 64 * 1024;
/// Nesting of multiparts and count of MIME entities we follow.
const MAX_DEPTH: usize = 16;
const MAX_ENTITIES: usize = 1000;
/// Longest quoted-printable line, without its CRLF (RFC 2045 §6.7 (5)).
const QP_LINE: usize = 76;

/// Why a message cannot be converted to 7 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unconvertible {
    EightBitHeader,
    EightBitMessagePart,
    EightBitInMalformedMultipart,
    EightBitInEncodedPart,
    EightBitOutsideParts,
    TooComplex,
    HeaderTooLong,
}

impl fmt::Display for Unconvertible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unconvertible::EightBitHeader => {
                "a header has 8-bit octets, which no transfer encoding can change"
            }
            Unconvertible::EightBitMessagePart => {
                "an attached message (message/*) has 8-bit octets"
            }
            Unconvertible::EightBitInMalformedMultipart => {
                "a multipart without a boundary has 8-bit octets"
            }
            Unconvertible::EightBitInEncodedPart => {
                "a part labelled base64 or quoted-printable has 8-bit octets"
            }
            Unconvertible::EightBitOutsideParts => "8-bit octets outside any MIME part",
            Unconvertible::TooComplex => "more MIME parts or nesting than the converter follows",
            Unconvertible::HeaderTooLong => "a MIME header field over 64 KiB",
        })
    }
}

/// What the conversion does to one MIME entity (header block), in order of appearance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Keep,
    /// Body re-encoded as quoted-printable, the header relabelled.
    Quote,
    /// A multipart labelled 8bit/binary: only the label changes (to 7bit).
    Relabel,
}

/// Which entities `Downgraded` converts, learnt by `plan`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    actions: Vec<Action>,
}

/// Reads the whole message once: the plan to convert it, or why it cannot be.
pub fn plan(body: impl Read) -> io::Result<Result<Plan, Unconvertible>> {
    let mut walker = Walker::new(body, Mode::Assess(Vec::new()));
    let mut out = Vec::new();
    loop {
        out.clear();
        match walker.step(&mut out)? {
            Ok(true) => {}
            Ok(false) => break,
            Err(why) => return Ok(Err(why)),
        }
    }
    let actions = match walker.mode {
        Mode::Assess(actions) | Mode::Convert(actions) => actions,
    };
    Ok(Ok(Plan { actions }))
}

/// How much of a header block `utf8_headers` reads; a longer one is judged by this much.
const MAX_HEADER_BLOCK: u64 = 1024 * 1024;

/// Whether the message's own header block is internationalized (RFC 6532):
/// it has non-ASCII lines and all of them are UTF-8. Such a message needs
/// SMTPUTF8 (RFC 6531 §3.2). Other 8-bit header octets (Latin-1, say) are
/// plain 8-bit data, for 8BITMIME or a 5.6.3 refusal.
pub fn utf8_headers(body: impl Read) -> io::Result<bool> {
    let mut input = BufReader::new(body.take(MAX_HEADER_BLOCK));
    let mut line = Vec::new();
    let mut utf8 = false;
    loop {
        line.clear();
        // Whole lines (bounded by the block's limit), so no UTF-8
        // sequence is cut; only one the limit cuts may end incomplete.
        if input.read_until(b'\n', &mut line)? == 0 || strip_line_end(&line).is_empty() {
            return Ok(utf8);
        }
        if !line.is_ascii() {
            match std::str::from_utf8(&line) {
                Err(e) if e.error_len().is_some() => return Ok(false),
                _ => utf8 = true,
            }
        }
    }
}

/// The message converted by a plan, as a reader (CRLF lines, not yet dot-stuffed).
pub struct Downgraded<R: Read> {
    walker: Walker<R>,
    out: Vec<u8>,
    at: usize,
    done: bool,
}

impl<R: Read> Downgraded<R> {
    pub fn new(body: R, plan: &Plan) -> Self {
        Downgraded {
            walker: Walker::new(body, Mode::Convert(plan.actions.clone())),
            out: Vec::new(),
            at: 0,
            done: false,
        }
    }
}

impl<R: Read> Read for Downgraded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.out.len() && !self.done {
            self.out.clear();
            self.at = 0;
            // The plan was made over the same bytes, so the walk cannot
            // refuse now; if the file changed under us, stop loudly.
            match self.walker.step(&mut self.out)? {
                Ok(more) => self.done = !more,
                Err(why) => return Err(io::Error::other(why.to_string())),
            }
        }
        let rest = self.out.get(self.at..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), rest.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.at = self.at.saturating_add(n);
        Ok(n)
    }
}

enum Mode {
    /// Learning: the action of each entity so far.
    Assess(Vec<Action>),
    /// Converting by the plan's actions.
    Convert(Vec<Action>),
}

/// What a header block said, as far as conversion cares.
#[derive(Debug, Default)]
struct EntityInfo {
    /// Lower-case `type/subtype`, empty when absent.
    content_type: String,
    boundary: Option<Vec<u8>>,
    /// Lower-case Content-Transfer-Encoding, empty when absent.
    encoding: String,
    mime_version: bool,
}

impl EntityInfo {
    fn labelled_8bit(&self) -> bool {
        matches!(self.encoding.as_str(), "8bit" | "binary")
    }
}

enum State {
    /// In the header block of entity `index`; `field` is the field being read.
    Header {
        index: usize,
        top: bool,
        default_type: &'static str,
        field: Vec<u8>,
        info: EntityInfo,
    },
    /// In the body of a leaf entity.
    Leaf {
        index: usize,
        info: EntityInfo,
        eight_bit: bool,
        action: Action,
    },
    /// A multipart's preamble, or its epilogue (outside any part).
    Between,
}

struct Walker<R: Read> {
    input: BufReader<R>,
    mode: Mode,
    state: State,
    /// Boundaries of the enclosing multiparts, outermost first, with whether each is a digest.
    boundaries: Vec<(Vec<u8>, bool)>,
    entities: usize,
    line: Vec<u8>,
    /// The next segment starts a line.
    at_line_start: bool,
    qp: QuotedPrintable,
}

impl<R: Read> Walker<R> {
    fn new(body: R, mode: Mode) -> Self {
        Walker {
            input: BufReader::with_capacity(32 * 1024, body),
            mode,
            state: State::Header {
                index: 0,
                top: true,
                default_type: "text/plain",
                field: Vec::new(),
                info: EntityInfo::default(),
            },
            boundaries: Vec::new(),
            entities: 1,
            line: Vec::new(),
            at_line_start: true,
            qp: QuotedPrintable::default(),
        }
    }

    fn action(&self, index: usize) -> Action {
        match &self.mode {
            Mode::Convert(actions) => actions.get(index).copied().unwrap_or(Action::Keep),
            Mode::Assess(_) => Action::Keep,
        }
    }

    fn assessing(&self) -> bool {
        matches!(self.mode, Mode::Assess(_))
    }

    /// Handles the next line (or piece of one); Ok(false) at the end.
    fn step(&mut self, out: &mut Vec<u8>) -> io::Result<Result<bool, Unconvertible>> {
        self.line.clear();
        let n = (&mut self.input)
            .take(MAX_SEGMENT)
            .read_until(b'\n', &mut self.line)?;
        let starts_line = self.at_line_start;
        let ends_line = self.line.last() == Some(&b'\n');
        self.at_line_start = ends_line;
        let line = std::mem::take(&mut self.line);
        let result = if n == 0 {
            self.finish(out).map(|()| false)
        } else {
            self.segment(&line, starts_line, ends_line, out)
                .map(|()| true)
        };
        self.line = line;
        Ok(result)
    }

    fn segment(
        &mut self,
        raw: &[u8],
        starts_line: bool,
        ends_line: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Unconvertible> {
        let content = strip_line_end(raw);
        if let State::Header { .. } = self.state {
            return self.header_segment(raw, content, starts_line, out);
        }
        if starts_line && ends_line {
            if let Some((depth, close)) = self.boundary_at(content) {
                self.end_entity(out)?;
                self.boundaries.truncate(depth.saturating_add(1));
                out.extend_from_slice(content);
                out.extend_from_slice(b"\r\n");
                if close {
                    self.boundaries.truncate(depth);
                    self.state = State::Between;
                } else {
                    self.start_entity(depth)?;
                }
                return Ok(());
            }
        }
        match &mut self.state {
            State::Leaf {
                eight_bit, action, ..
            } => {
                *eight_bit |= !raw.is_ascii();
                if *action == Action::Quote {
                    self.qp.encode(content, out);
                    if ends_line {
                        self.qp.end_line(out);
                    }
                } else {
                    out.extend_from_slice(raw);
                }
            }
            State::Between => {
                if !raw.is_ascii() {
                    return Err(Unconvertible::EightBitOutsideParts);
                }
                out.extend_from_slice(raw);
            }
            State::Header { .. } => {}
        }
        Ok(())
    }

    /// Which enclosing boundary a whole line is (RFC 2046 §5.1.1), and whether it closes.
    fn boundary_at(&self, line: &[u8]) -> Option<(usize, bool)> {
        let rest = line.strip_prefix(b"--")?;
        self.boundaries
            .iter()
            .enumerate()
            .rev()
            .find_map(|(depth, (boundary, _))| {
                let after = rest.strip_prefix(boundary.as_slice())?;
                let (close, tail) = match after.strip_prefix(b"--") {
                    Some(tail) => (true, tail),
                    None => (false, after),
                };
                tail.iter()
                    .all(|b| matches!(b, b' ' | b'\t'))
                    .then_some((depth, close))
            })
    }

    fn start_entity(&mut self, depth: usize) -> Result<(), Unconvertible> {
        if self.entities >= MAX_ENTITIES {
            return Err(Unconvertible::TooComplex);
        }
        let digest = self.boundaries.get(depth).is_some_and(|(_, d)| *d);
        self.state = State::Header {
            index: self.entities,
            top: false,
            default_type: if digest {
                "message/rfc822"
            } else {
                "text/plain"
            },
            field: Vec::new(),
            info: EntityInfo::default(),
        };
        self.entities = self.entities.saturating_add(1);
        Ok(())
    }

    fn header_segment(
        &mut self,
        raw: &[u8],
        content: &[u8],
        starts_line: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Unconvertible> {
        if !raw.is_ascii() {
            return Err(Unconvertible::EightBitHeader);
        }
        let folded = starts_line && matches!(content.first(), Some(b' ' | b'\t'));
        let blank = starts_line && content.is_empty();
        let State::Header { field, .. } = &mut self.state else {
            return Ok(());
        };
        if !starts_line || folded {
            field.extend_from_slice(raw);
            if field.len() > MAX_FIELD {
                return Err(Unconvertible::HeaderTooLong);
            }
            return Ok(());
        }
        self.end_field(out);
        if blank {
            return self.end_header(raw, out);
        }
        if let State::Header { field, .. } = &mut self.state {
            field.extend_from_slice(raw);
        }
        Ok(())
    }

    /// A complete header field: noted, and written unless it is a label the conversion replaces.
    fn end_field(&mut self, out: &mut Vec<u8>) {
        let (index, field, info) = match &mut self.state {
            State::Header {
                index, field, info, ..
            } => (*index, std::mem::take(field), info),
            _ => return,
        };
        if field.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&field);
        let (name, value) = text.split_once(':').unwrap_or((&text, ""));
        let name = name.trim().to_ascii_lowercase();
        let mut replaced = false;
        match name.as_str() {
            "content-type" => {
                let (kind, boundary) = parse_content_type(value);
                info.content_type = kind;
                info.boundary = boundary;
            }
            "content-transfer-encoding" => {
                info.encoding = value.trim().to_ascii_lowercase();
                replaced = true;
            }
            "mime-version" => info.mime_version = true,
            _ => {}
        }
        let action = self.action(index);
        if !(replaced && action != Action::Keep) {
            out.extend_from_slice(&field);
        }
    }

    fn end_header(&mut self, blank: &[u8], out: &mut Vec<u8>) -> Result<(), Unconvertible> {
        let State::Header {
            index,
            top,
            default_type,
            info,
            ..
        } = std::mem::replace(&mut self.state, State::Between)
        else {
            return Ok(());
        };
        let mut info = info;
        if info.content_type.is_empty() {
            info.content_type = default_type.to_string();
        }
        let action = self.action(index);
        match action {
            Action::Quote => {
                if top && !info.mime_version {
                    out.extend_from_slice(b"MIME-Version: 1.0\r\n");
                }
                out.extend_from_slice(b"Content-Transfer-Encoding: quoted-printable\r\n");
            }
            Action::Relabel => out.extend_from_slice(b"Content-Transfer-Encoding: 7bit\r\n"),
            Action::Keep => {}
        }
        out.extend_from_slice(blank);
        let multipart = info.content_type.starts_with("multipart/");
        match info.boundary.take().filter(|_| multipart) {
            Some(boundary) => {
                if self.boundaries.len() >= MAX_DEPTH {
                    return Err(Unconvertible::TooComplex);
                }
                let digest = info.content_type == "multipart/digest";
                self.boundaries.push((boundary, digest));
                if let Mode::Assess(actions) = &mut self.mode {
                    let relabel = if info.labelled_8bit() {
                        Action::Relabel
                    } else {
                        Action::Keep
                    };
                    set_action(actions, index, relabel);
                }
            }
            None => {
                self.qp = QuotedPrintable::default();
                self.state = State::Leaf {
                    index,
                    info,
                    eight_bit: false,
                    action,
                };
            }
        }
        Ok(())
    }

    /// The end of a leaf's body: when assessing, what it needs.
    fn end_entity(&mut self, out: &mut Vec<u8>) -> Result<(), Unconvertible> {
        if let State::Leaf {
            action: Action::Quote,
            ..
        } = &self.state
        {
            self.qp.flush(out);
        }
        if !self.assessing() {
            return Ok(());
        }
        let State::Leaf {
            index,
            info,
            eight_bit,
            ..
        } = &self.state
        else {
            return Ok(());
        };
        let action = if !*eight_bit && !info.labelled_8bit() {
            Action::Keep
        } else if !*eight_bit {
            // Labelled 8bit but all ASCII: the label must not reach a 7-bit relay.
            Action::Quote
        } else if info.content_type.starts_with("message/") {
            // Its content is a message of its own (RFC 2046 §5.2.1: no
            // encoding of it); converting inside it is not done here.
            return Err(Unconvertible::EightBitMessagePart);
        } else if info.content_type.starts_with("multipart/") {
            return Err(Unconvertible::EightBitInMalformedMultipart);
        } else if matches!(info.encoding.as_str(), "base64" | "quoted-printable") {
            return Err(Unconvertible::EightBitInEncodedPart);
        } else {
            Action::Quote
        };
        let index = *index;
        if let Mode::Assess(actions) = &mut self.mode {
            set_action(actions, index, action);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Unconvertible> {
        if let State::Header { .. } = self.state {
            self.end_field(out);
            self.state = State::Between;
        }
        self.end_entity(out)
    }
}

fn set_action(actions: &mut Vec<Action>, index: usize, action: Action) {
    if actions.len() <= index {
        actions.resize(index.saturating_add(1), Action::Keep);
    }
    if let Some(slot) = actions.get_mut(index) {
        *slot = action;
    }
}

fn strip_line_end(raw: &[u8]) -> &[u8] {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    raw.strip_suffix(b"\r").unwrap_or(raw)
}

/// `type/subtype` in lower case, and the boundary parameter if any (RFC 2045 §5.1).
fn parse_content_type(value: &str) -> (String, Option<Vec<u8>>) {
    let unfolded: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let mut params = unfolded.split(';');
    let kind = params
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let boundary = params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.split('"').next())
            .unwrap_or(value);
        (!value.is_empty()).then(|| value.as_bytes().to_vec())
    });
    (kind, boundary)
}

/// A streaming quoted-printable encoder for one part's body, line by line.
#[derive(Debug, Default)]
struct QuotedPrintable {
    /// Octets on the current encoded line.
    column: usize,
    /// A space or tab not yet written: literal unless it ends the line (§6.7 (3)).
    pending_space: Option<u8>,
}

impl QuotedPrintable {
    fn put(&mut self, token: &[u8], out: &mut Vec<u8>) {
        // Keep room for the soft break's "=".
        if self.column.saturating_add(token.len()) > QP_LINE - 1 {
            out.extend_from_slice(b"=\r\n");
            self.column = 0;
        }
        out.extend_from_slice(token);
        self.column = self.column.saturating_add(token.len());
    }

    fn escaped(&mut self, byte: u8, out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let token = [
            b'=',
            HEX.get(usize::from(byte >> 4)).copied().unwrap_or(b'0'),
            HEX.get(usize::from(byte & 0x0f)).copied().unwrap_or(b'0'),
        ];
        self.put(&token, out);
    }

    fn encode(&mut self, content: &[u8], out: &mut Vec<u8>) {
        for &byte in content {
            if let Some(space) = self.pending_space.take() {
                self.put(&[space], out);
            }
            match byte {
                b' ' | b'\t' => self.pending_space = Some(byte),
                b'=' => self.escaped(byte, out),
                33..=126 => self.put(&[byte], out),
                _ => self.escaped(byte, out),
            }
        }
    }

    /// A hard line break: trailing white space is encoded so it survives.
    fn end_line(&mut self, out: &mut Vec<u8>) {
        self.flush(out);
        out.extend_from_slice(b"\r\n");
        self.column = 0;
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if let Some(space) = self.pending_space.take() {
            self.escaped(space, out);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Decodes quoted-printable (for the round trip), CRLF line ends.
    pub(crate) fn decode_qp(encoded: &[u8]) -> Vec<u8> {
        let text = String::from_utf8(encoded.to_vec()).unwrap();
        let mut out = Vec::new();
        let mut lines = text.split("\r\n").peekable();
        while let Some(line) = lines.next() {
            let (line, soft) = match line.strip_suffix('=') {
                Some(l) => (l, true),
                None => (line, false),
            };
            let bytes = line.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'=' {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            if !soft && lines.peek().is_some() {
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    pub(crate) fn convert(message: &[u8]) -> Result<Vec<u8>, Unconvertible> {
        let plan = plan(message).unwrap()?;
        let mut out = Vec::new();
        Downgraded::new(message, &plan)
            .read_to_end(&mut out)
            .unwrap();
        Ok(out)
    }

    fn split(message: &[u8]) -> (String, Vec<u8>) {
        let at = message.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8(message[..at + 2].to_vec()).unwrap(),
            message[at + 4..].to_vec(),
        )
    }

    #[test]
    fn a_single_part_8bit_text_becomes_quoted_printable_and_decodes_back() {
        let body = "Grüße aus Köln = 100%, trailing space \r\n\
                    a long line: "
            .to_string()
            + &"é".repeat(60)
            + "\r\n.dot\r\n";
        let message = format!(
            "From: pbx@x\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n{body}"
        );
        let out = convert(message.as_bytes()).unwrap();
        assert!(out.is_ascii());
        let (header, encoded) = split(&out);
        assert_eq!(
            header,
            "From: pbx@x\r\nContent-Type: text/plain; charset=utf-8\r\n\
             MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        );
        assert!(encoded
            .split(|&b| b == b'\n')
            .all(|l| l.len() <= QP_LINE + 1));
        assert_eq!(decode_qp(&encoded), body.as_bytes());
    }

    #[test]
    fn a_multipart_voicemail_converts_the_8bit_text_and_keeps_the_base64_wav() {
        let text = "Neue Sprachnachricht von Jürgen\r\nDauer: 0:42\r\n";
        let wav = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=\r\n";
        let message = format!(
            "From: pbx@x\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"vm-1\"\r\n\r\n\
             preamble\r\n--vm-1\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n{text}--vm-1\r\n\
             Content-Type: audio/wav; name=msg.wav\r\nContent-Transfer-Encoding: base64\r\n\r\n\
             {wav}--vm-1--\r\nepilogue\r\n"
        );
        let out = String::from_utf8(convert(message.as_bytes()).unwrap()).unwrap();
        let expected_text = "Neue Sprachnachricht von J=C3=BCrgen\r\nDauer: 0:42\r\n";
        assert_eq!(
            out,
            format!(
                "From: pbx@x\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"vm-1\"\r\n\r\n\
                 preamble\r\n--vm-1\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Transfer-Encoding: quoted-printable\r\n\r\n{expected_text}--vm-1\r\n\
                 Content-Type: audio/wav; name=msg.wav\r\nContent-Transfer-Encoding: base64\r\n\r\n\
                 {wav}--vm-1--\r\nepilogue\r\n"
            )
        );
        assert_eq!(decode_qp(expected_text.as_bytes()), text.as_bytes());
    }

    #[test]
    fn an_undeclared_8bit_part_is_found_by_the_plan_and_converted() {
        let message = "Content-Type: multipart/alternative; boundary=b\r\n\r\n\
                       --b\r\n\r\nplain ascii\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>café</p>\r\n--b--\r\n";
        let out = String::from_utf8(convert(message.as_bytes()).unwrap()).unwrap();
        assert!(out.contains("--b\r\n\r\nplain ascii\r\n--b\r\n"), "{out}");
        assert!(out.contains(
            "Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>caf=C3=A9</p>\r\n--b--"
        ), "{out}");
    }

    #[test]
    fn what_cannot_be_converted_is_refused_with_its_reason() {
        let cases: [(&str, Unconvertible); 4] = [
            (
                "Subject: Anruf von Jürgen\r\n\r\nbody\r\n",
                Unconvertible::EightBitHeader,
            ),
            (
                "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
                 Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\ncafé\r\n--b--\r\n",
                Unconvertible::EightBitMessagePart,
            ),
            (
                "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\ncafé\r\n",
                Unconvertible::EightBitInEncodedPart,
            ),
            (
                "Content-Type: multipart/mixed; boundary=b\r\n\r\ncafé\r\n--b\r\n\r\nx\r\n--b--\r\n",
                Unconvertible::EightBitOutsideParts,
            ),
        ];
        for (message, why) in cases {
            assert_eq!(plan(message.as_bytes()).unwrap(), Err(why), "{message}");
        }
    }

    #[test]
    fn utf8_headers_are_told_from_other_8bit_headers() {
        let utf8 = "Subject: Anruf von Jürgen\r\nFrom: pbx@x\r\n\r\nbody\r\n";
        assert!(utf8_headers(utf8.as_bytes()).unwrap());
        // Latin-1 "ü" is not UTF-8: 8-bit data, not an internationalized header.
        let latin1 = b"Subject: Anruf von J\xfcrgen\r\n\r\nbody\r\n";
        assert!(!utf8_headers(&latin1[..]).unwrap());
        // 8-bit octets in the body only do not count.
        assert!(!utf8_headers("Subject: x\r\n\r\nJürgen\r\n".as_bytes()).unwrap());
    }

    /// A hostile message, as a property: mutated versions of real 8-bit
    /// messages never panic the converter, and whatever it agrees to
    /// convert comes out 7-bit with lines a 7-bit relay takes.
    #[test]
    fn mutated_messages_never_panic_and_what_converts_is_7bit() {
        use crate::base::mutate::{cases, mutate, seed, Rng};
        let seeds: [&str; 3] = [
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
             Grüße =  \r\n.x\r\n",
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
             Content-Type: text/plain\r\n\r\nJürgen\r\n--b\r\nContent-Type: audio/wav\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nUklGRg==\r\n--b--\r\n",
            "Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n\
             Content-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\n\r\nü\r\n--i--\r\n\
             --o--\r\n",
        ];
        let mut rng = Rng::seeded(seed(0x5eed_0007));
        for _ in 0..cases(2_000) {
            let message = mutate(rng.pick(&seeds).as_bytes(), &mut rng);
            let Ok(out) = convert(&message) else { continue };
            assert!(out.is_ascii(), "{:?}", String::from_utf8_lossy(&message));
        }
    }

    #[test]
    fn long_8bit_lines_are_encoded_in_pieces_and_decode_back() {
        let body = "ü".repeat(20_000) + "\r\n";
        let message = format!("Content-Type: text/plain\r\n\r\n{body}");
        let out = convert(message.as_bytes()).unwrap();
        let (_, encoded) = split(&out);
        assert_eq!(decode_qp(&encoded), body.as_bytes());
    }
}
