//! The SMTP client: a blocking session state machine (session.rs) over any
//! stream, the mail transaction it runs (transaction.rs), typed commands (command.rs), SASL (auth.rs), the reply parser,
//! message transparency, and `client::open`, which connects, upgrades to TLS
//! and authenticates for one tenant.
//! What a failure *means* is decided elsewhere (outcome.rs); this module only talks.

mod auth;
pub mod client;
pub mod command;
pub mod data;
mod deadline;
pub mod reply;
#[cfg(test)]
mod script;
pub mod session;
pub mod seven_bit;
pub mod transaction;

use crate::tls::TlsError;
use reply::{Reply, ReplyError};
use std::fmt;
use std::io;

/// Where in the conversation something happened, for logs and for policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Body,
    DataEnd,
    Reset,
    Quit,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Greeting => "greeting",
            Phase::Ehlo => "EHLO",
            Phase::StartTls => "STARTTLS",
            Phase::Auth => "AUTH",
            Phase::Mail => "MAIL FROM",
            Phase::Rcpt => "RCPT TO",
            Phase::Data => "DATA",
            Phase::Body => "message body",
            Phase::DataEnd => "end of data",
            Phase::Reset => "RSET",
            Phase::Quit => "QUIT",
        }
    }
}

/// A failure that ends the session (a rejected recipient is not one: that is a `Reply`).
#[derive(Debug)]
pub enum SessionError {
    /// No address of the relay accepted a TCP connection. `peer` is
    /// `host[ip]:port` when the host had one address, else `host:port` and
    /// `reason` names each address with its failure.
    Connect {
        peer: String,
        reason: String,
    },
    Timeout(Phase),
    Io(Phase, io::Error),
    /// The server broke the protocol (malformed reply, closed early, injected data).
    Protocol(Phase, String),
    /// The server refused a session-level step (greeting, EHLO, STARTTLS, AUTH).
    Rejected(Phase, Reply),
    /// `tls = starttls` and the relay does not offer it: nothing is sent in plaintext.
    StartTlsNotOffered,
    Tls(TlsError),
    /// A login is configured but the relay (in its last EHLO reply) offers
    /// none of the mechanisms we could use for it (`wanted`); nothing is
    /// sent without the login.
    NoUsableAuth {
        wanted: &'static str,
        offered: Vec<String>,
    },
    /// Our side: the configuration cannot work with this relay.
    Config(String),
    /// Our side: the spooled message could not be read.
    Local(String),
}

impl SessionError {
    pub fn from_reply_error(phase: Phase, e: ReplyError) -> SessionError {
        match e {
            ReplyError::Io(e) => SessionError::from_io(phase, e),
            ReplyError::Closed => {
                SessionError::Protocol(phase, "connection closed by the relay".into())
            }
            ReplyError::Malformed(why) => SessionError::Protocol(phase, why),
        }
    }

    pub fn from_io(phase: Phase, e: io::Error) -> SessionError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => SessionError::Timeout(phase),
            _ => SessionError::Io(phase, e),
        }
    }
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Connect { peer, reason } => {
                write!(f, "cannot connect to {peer}: {reason}")
            }
            SessionError::Timeout(phase) => {
                write!(f, "timed out waiting for the relay ({})", phase.as_str())
            }
            SessionError::Io(phase, e) => {
                write!(f, "connection error during {}: {e}", phase.as_str())
            }
            SessionError::Protocol(phase, why) => {
                write!(f, "protocol error during {}: {why}", phase.as_str())
            }
            SessionError::Rejected(phase, reply) => {
                write!(f, "relay refused {}: {}", phase.as_str(), reply.summary())
            }
            SessionError::StartTlsNotOffered => f.write_str(
                "relay does not offer STARTTLS and the tenant requires it (tls = starttls); \
                 nothing was sent. Check the relay's port, or use tls = implicit for port 465",
            ),
            SessionError::Tls(e) => write!(f, "{e}"),
            SessionError::NoUsableAuth { wanted, offered } if offered.is_empty() => write!(
                f,
                "the relay offers no AUTH in its EHLO reply, but this tenant has a login to use \
                 (by {wanted}); nothing was sent without it"
            ),
            SessionError::NoUsableAuth { wanted, offered } => write!(
                f,
                "the relay offers AUTH {} but not {wanted}, which this tenant's login needs; \
                 nothing was sent without it",
                offered.join(" ")
            ),
            SessionError::Config(why) => f.write_str(why),
            SessionError::Local(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for SessionError {}

/// What the relay said it supports in its (post-TLS) EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub starttls: bool,
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    /// SIZE offered (RFC 1870), so MAIL may carry SIZE=.
    pub size_ext: bool,
    /// The relay's declared limit; SIZE 0 or no number means none.
    pub size: Option<u64>,
    /// Upper-cased SASL mechanisms.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Parses an EHLO reply; keywords are case-insensitive (RFC 5321 §2.4).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        // The first line is the server's greeting name, not a keyword.
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "CHUNKING" => caps.chunking = true,
                "SIZE" => {
                    caps.size_ext = true;
                    caps.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0);
                }
                "AUTH" => caps.auth = words.map(|m| m.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::reply::ReplyCode;
    use super::*;

    #[test]
    fn ehlo_keywords_are_case_insensitive() {
        let reply = Reply {
            code: ReplyCode(250),
            lines: vec![
                "mx.example greets you".into(),
                "pipelining".into(),
                "Size 1000".into(),
                "auth plain Login".into(),
                "StartTLS".into(),
            ],
        };
        let caps = Capabilities::from_ehlo(&reply);
        assert!(caps.pipelining && caps.starttls);
        assert_eq!(caps.size, Some(1000));
        assert_eq!(caps.auth, vec!["PLAIN", "LOGIN"]);
    }

    #[test]
    fn greeting_name_is_not_a_keyword() {
        let reply = Reply {
            code: ReplyCode(250),
            lines: vec!["STARTTLS".into()],
        };
        assert!(!Capabilities::from_ehlo(&reply).starttls);
    }
}
