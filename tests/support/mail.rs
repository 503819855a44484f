//! Messages as the tests write them and read them back, written once: the
//! builder for a PBX's message (LF line ends, as piped into `sendmail`), the
//! queue ID `sendmail -v` reports, and the header fields and body of the copy
//! a relay received.

use super::smtp_server::{Received, TestServer};

/// A message as a PBX pipes it into `sendmail`: LF line ends; From, To and
/// Subject fields, an empty line, then `body` and a final line end.
pub fn message(from: &str, to: &str, subject: &str, body: &str) -> Vec<u8> {
    format!("From: {from}\nTo: {to}\nSubject: {subject}\n\n{body}\n").into_bytes()
}

/// The tests' usual small message: `message` with the body "body of SUBJECT".
pub fn note(from: &str, to: &str, subject: &str) -> Vec<u8> {
    message(from, to, subject, &format!("body of {subject}"))
}

/// The ID in `sendmail -v`'s "queued as ID for tenant T"; panics without one.
pub fn queued_id(stderr: &str) -> String {
    stderr
        .split_once("queued as ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue ID in sendmail -v output: {stderr:?}"))
        .to_string()
}

/// The header block of a received copy, without the empty line after it
/// (the whole text when there is no body).
pub fn headers(m: &Received) -> String {
    let text = m.text();
    text.split_once("\r\n\r\n")
        .map(|(h, _)| h.to_string())
        .unwrap_or(text)
}

/// The header fields of `block` (CRLF lines) in order, folded lines joined
/// with one space, names and values trimmed.
pub fn parse_headers(block: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in block.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    fields
}

/// The first field called `name` (any case) in `fields`.
pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The Subject field of a received copy ("" if it has none).
pub fn subject(m: &Received) -> String {
    field(&parse_headers(&headers(m)), "Subject")
        .unwrap_or_default()
        .to_string()
}

/// The Subjects of every message `server` received, in order.
pub fn subjects(server: &TestServer) -> Vec<String> {
    server.messages().iter().map(subject).collect()
}

/// The body of a received copy, byte-exact: everything after the first empty
/// line; panics when there is none.
pub fn body_bytes(m: &Received) -> Vec<u8> {
    let at = m
        .data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body separator in {:?}", m.text()));
    m.data.get(at + 4..).unwrap_or_default().to_vec()
}

/// `body_bytes` as text.
pub fn body(m: &Received) -> String {
    let text = m.text();
    match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => panic!("no header/body separator in {text:?}"),
    }
}
