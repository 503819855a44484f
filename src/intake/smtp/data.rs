//! The DATA side of the SMTP conversation: end-of-data framing,
//! dot-unstuffing, the header block read into memory (bounded) and put
//! through cleanup.rs as sendmail's is, and body pieces handed to the writer.
//!
//! Line ends, as Postfix ≥ 3.9 by default (`smtpd_forbid_bare_newline =
//! normalize`): a bare LF ends a command or a line of content (stored as
//! CRLF), but only `<CRLF>.<CRLF>` ends DATA (RFC 5321 §4.1.1.4, §2.3.8),
//! so `<LF>.<LF>`, `<CRLF>.<LF>` or `<LF>.<CRLF>` are a dot line of the
//! message and whatever follows stays message text: no second message can
//! be smuggled in behind the first. The EHLO name and anything else that
//! goes into our Received field is checked or made safe first.

use super::{Conversation, State};
use crate::base::time;
use crate::config::Config;
use crate::intake::cleanup;
use crate::intake::message::{HeaderBlock, HeaderError, Step};
use crate::intake::writer::{Envelope, Job};

/// Body bytes gathered before they go to the writer as one job.
pub(super) const CHUNK: usize = 64 * 1024;

/// Why a message is read to its end and then refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    TooBig,
    /// The null sender's From names a domain no tenant handles.
    Unrouted(String),
    /// The header block cannot be inspected (too large, a line too long).
    Headers(HeaderError),
}

/// How the last piece of DATA ended: only a line after a CRLF can be the
/// end-of-data line; any line end starts a line for dot-unstuffing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineStart {
    AfterCrlf,
    AfterBareLf,
    /// The last piece was part of a long line.
    Inside,
}

pub(super) struct Body {
    /// Still reading the header block (None once it ended). What is stored
    /// is what it parsed (message.rs), not the raw bytes.
    headers: Option<HeaderBlock>,
    /// Set once the message is refused; it is still read to the end.
    refused: Option<Refusal>,
    /// Body bytes not yet queued for the writer.
    chunk: Vec<u8>,
    line_start: LineStart,
}

impl Conversation {
    /// The submission is open: our trace field first, then the 354.
    pub(super) fn start_body(&mut self, id: &str) {
        // Our trace header, as every MTA adds one (RFC 5321 §4.4).
        let received = format!(
            "Received: from {} ({})\r\n\tby {} (pbxmail) with ESMTP id {};\r\n\t{}\r\n",
            trace_word(self.greeted.as_deref().unwrap_or("unknown")),
            trace_word(&self.peer),
            trace_word(&self.hostname),
            trace_word(id),
            time::rfc5322(crate::base::clock::now_ms() / 1000)
        );
        self.jobs.push_back(Job::Trace(received.into_bytes()));
        self.body_size = 0;
        self.state = State::Data(Body {
            headers: Some(HeaderBlock::default()),
            refused: None,
            chunk: Vec::new(),
            // The CRLF of the DATA line is the first of <CRLF>.<CRLF>.
            line_start: if self.command_crlf {
                LineStart::AfterCrlf
            } else {
                LineStart::AfterBareLf
            },
        });
        self.reply("354 End data with <CR><LF>.<CR><LF>");
    }

    /// Consumes one body line (or a long line's piece). Some(true) at the
    /// end-of-data line, Some(false) after other input, None when more is needed.
    pub(super) fn take_body_line(&mut self, config: &Config) -> Option<bool> {
        let end = self.input.iter().position(|&b| b == b'\n');
        let take = match end {
            Some(end) => end + 1,
            // A long line: pass on what we have, keeping a possible "\r" for later.
            None if self.input.len() > 64 * 1024 => self.input.len() - 1,
            None => return None,
        };
        let line: Vec<u8> = self.input.drain(..take).collect();
        let State::Data(body) = &mut self.state else {
            return None;
        };
        let before = body.line_start;
        body.line_start = if line.ends_with(b"\r\n") {
            LineStart::AfterCrlf
        } else if line.ends_with(b"\n") {
            LineStart::AfterBareLf
        } else {
            LineStart::Inside
        };
        let refused = body.refused.is_some();
        // Only <CRLF>.<CRLF> ends the data (RFC 5321 §4.1.1.4): no other
        // framing of a lone dot, so no smuggled commands after it.
        if before == LineStart::AfterCrlf && line == b".\r\n" {
            return Some(true);
        }
        // RFC 5321 §4.5.2: a leading dot with more on its line was doubled
        // by the client. A lone dot that is not the end of data stays a dot.
        let content =
            if before != LineStart::Inside && line.first() == Some(&b'.') && !is_lone_dot(&line) {
                line.get(1..).unwrap_or_default()
            } else {
                &line[..]
            };
        self.body_size = self.body_size.saturating_add(content.len() as u64);
        if refused {
            return Some(false);
        }
        if self.body_size > self.limits.max_message_size {
            self.refuse(Refusal::TooBig);
            return Some(false);
        }
        self.body_content(content, config);
        Some(false)
    }

    /// Message bytes: into the header block while it lasts, then the body.
    fn body_content(&mut self, content: &[u8], config: &Config) {
        let State::Data(body) = &mut self.state else {
            return;
        };
        let rest = match body.headers.as_mut() {
            Some(block) => match block.take(content) {
                Ok(Step::More) => return,
                Ok(Step::Separator) => b"\r\n".to_vec(),
                // The body starts without a separator: write one, as
                // sendmail does, so a reader of the stored message sees the
                // header block end where it was parsed to end.
                Ok(Step::Body(line)) => [&b"\r\n"[..], &line].concat(),
                Err(why) => {
                    // Not inspectable, so it cannot be stored as parsed.
                    log::info!("submission from {}: refused: {why}", self.peer);
                    return self.refuse(Refusal::Headers(why));
                }
            },
            None => {
                body.chunk.extend_from_slice(content);
                if body.chunk.len() >= CHUNK {
                    let chunk = std::mem::take(&mut body.chunk);
                    self.jobs.push_back(Job::Content(chunk));
                }
                return;
            }
        };
        self.end_headers(&rest, config);
    }

    /// The header block ended (`rest` is the separator line, the first body
    /// line, or nothing at the end of data): the cleanup step routes the null
    /// sender and adds the missing Date and Message-ID.
    fn end_headers(&mut self, rest: &[u8], config: &Config) {
        let State::Data(body) = &mut self.state else {
            return;
        };
        let Some(block) = body.headers.take() else {
            return;
        };
        let mut out = cleanup::render(block.headers());
        if self.tenant.is_none() {
            let domain = cleanup::routing_domain("", block.headers());
            match cleanup::route(config, &domain) {
                Ok(tenant) => self.tenant = Some(tenant.name.as_str().to_string()),
                Err(unrouted) => return self.refuse(Refusal::Unrouted(unrouted.domain)),
            }
        }
        let now = crate::base::clock::now_ms() / 1000;
        let added = cleanup::missing_fields(block.headers(), &self.hostname, None, now);
        out.extend_from_slice(&cleanup::render(&added));
        out.extend_from_slice(rest);
        out.append(&mut body.chunk);
        body.chunk = out;
    }

    /// Drops what was gathered and the writer's submission; the rest of the
    /// body is still read, then refused.
    fn refuse(&mut self, why: Refusal) {
        if let State::Data(body) = &mut self.state {
            body.refused = Some(why);
            body.headers = None;
            body.chunk = Vec::new();
            self.jobs
                .retain(|job| !matches!(job, Job::Content(_) | Job::Trace(_)));
            self.jobs.push_back(Job::Discard);
        }
    }

    pub(super) fn finish_data(&mut self, config: &Config) {
        // A message that is all header block: it ends here (with the start
        // of the body if its last, unfinished line was no header after all).
        if let State::Data(Body {
            headers: Some(block),
            ..
        }) = &mut self.state
        {
            match block.finish() {
                Ok(None) => self.end_headers(b"", config),
                Ok(Some(line)) => self.end_headers(&[&b"\r\n"[..], &line].concat(), config),
                Err(why) => self.refuse(Refusal::Headers(why)),
            }
        }
        let state = std::mem::replace(&mut self.state, State::Command);
        let State::Data(body) = state else {
            return;
        };
        match body.refused {
            Some(Refusal::TooBig) => {
                self.reset();
                self.reply("552 5.3.4 Message size exceeds the limit");
            }
            Some(Refusal::Unrouted(domain)) => {
                self.reset();
                self.reply(&format!(
                    "550 5.7.1 Sender domain \"{domain}\" is not handled here"
                ));
            }
            Some(Refusal::Headers(why)) => {
                self.reset();
                self.reply(&format!("552 5.3.4 Message header refused: {why}"));
            }
            None => {
                if !body.chunk.is_empty() {
                    self.jobs.push_back(Job::Content(body.chunk));
                }
                self.jobs.push_back(Job::Commit(Envelope {
                    tenant: self.tenant.clone().unwrap_or_default(),
                    sender: self.sender.clone().unwrap_or_default(),
                    recipients: self.recipients.clone(),
                }));
                self.state = State::Committing;
            }
        }
    }
}

/// A lone dot with its line end (any), or at the end of a piece.
fn is_lone_dot(line: &[u8]) -> bool {
    line.first() == Some(&b'.') && line.iter().skip(1).all(|&b| b == b'\r' || b == b'\n')
}

/// A value for the Received field: anything outside the characters a host
/// name, address or ID has becomes `_`, so no value can break the field.
fn trace_word(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
