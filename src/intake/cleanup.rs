//! The one cleanup step every way into the spool goes through, as Postfix's
//! cleanup(8): pick the tenant by the sender's domain (the null sender by its
//! From header's), name the header fields a message lacks (Date, Message-ID,
//! and From where the front end has one to give), refuse new mail below
//! `min_free_space`, and write the message into a new spool submission with
//! CRLF line ends. The front ends (sendmail.rs, the listener's smtp/) only
//! read their input and speak their protocol; where their bytes go is here.

use super::message::Header;
use crate::base::address;
use crate::base::names::{MessageId, TenantName};
use crate::base::time;
use crate::config::{Config, FreeSpace, TenantConfig};
use crate::smtp::data::Transparency;
use crate::spool::{Spool, SpoolError, Submission};
use std::fmt;
use std::io::{self, Write};

/// No tenant handles the domain the message is routed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrouted {
    pub domain: String,
}

/// The domain that picks the tenant: the envelope sender's, or for the null
/// sender (a bounce) the domain of its From header's first address; empty
/// when there is none, which leaves the choice to `default_tenant`.
pub fn routing_domain(sender: &str, headers: &[Header]) -> String {
    let address = if sender.is_empty() {
        from_address(headers)
    } else {
        Some(sender.to_string())
    };
    address
        .as_deref()
        .and_then(address::domain_of)
        .unwrap_or_default()
        .to_string()
}

/// The tenant for `domain`, falling back to `default_tenant`.
pub fn route<'c>(config: &'c Config, domain: &str) -> Result<&'c TenantConfig, Unrouted> {
    config
        .tenant_for_sender_domain(domain)
        .ok_or_else(|| Unrouted {
            domain: domain.to_string(),
        })
}

/// The first address of the From header, if it has one.
pub fn from_address(headers: &[Header]) -> Option<String> {
    headers
        .iter()
        .find(|h| h.is("From"))
        .and_then(|h| address::parse_list(&h.value()).into_iter().next())
}

/// The fields to add at the end of the header block, in this order: From
/// (only when the front end offers a value: sendmail does, from `-f`/`-F`;
/// a listener's client wrote its own headers), Date, Message-ID.
pub fn missing_fields(
    headers: &[Header],
    hostname: &str,
    from: Option<String>,
    now_secs: u64,
) -> Vec<Header> {
    let has = |name: &str| headers.iter().any(|h| h.is(name));
    let mut added = Vec::new();
    if let Some(from) = from.filter(|_| !has("From")) {
        added.push(field("From", &from));
    }
    if !has("Date") {
        added.push(field("Date", &time::rfc5322(now_secs)));
    }
    if !has("Message-ID") {
        let id = MessageId::generate();
        added.push(field("Message-ID", &format!("<{id}@{hostname}>")));
    }
    added
}

fn field(name: &str, value: &str) -> Header {
    Header::composed(name, value)
}

/// Header fields as stored: each line as parsed (message.rs: its bytes,
/// a bare CR made a space), ended with CRLF.
pub fn render(headers: &[Header]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in headers.iter().flat_map(|h| &h.lines) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Refuses new mail below `minimum`, so the spool never fills up to the
/// point where results of deliveries in progress cannot be recorded. The
/// error is the whole sentence for the submitter (or the log).
pub fn check_free_space(spool: &Spool, minimum: FreeSpace) -> Result<(), String> {
    let (available, total) = match spool.free_space() {
        Ok(space) => space,
        // A spool the daemon has not run on yet: make it, then measure.
        Err(e) if e.is_not_found() => {
            spool.create_layout().map_err(temp_fail)?;
            spool.free_space().map_err(temp_fail)?
        }
        Err(e) => return Err(temp_fail(e)),
    };
    let too_low = match minimum {
        FreeSpace::Percent(percent) => {
            available.saturating_mul(100) < total.saturating_mul(u64::from(percent))
        }
        FreeSpace::Bytes(bytes) => available < bytes,
    };
    if too_low {
        let wanted = match minimum {
            FreeSpace::Percent(p) => format!("{p}%"),
            FreeSpace::Bytes(b) => format!("{b} bytes"),
        };
        return Err(format!(
            "the spool's filesystem ({}) has only {available} of {total} bytes free, below min_free_space = {wanted}; \
             new mail is refused until space is freed; try again later",
            spool.root().display()
        ));
    }
    Ok(())
}

/// The sentence for a spool that cannot take the message now.
pub fn temp_fail(e: impl fmt::Display) -> String {
    format!("cannot store the message now: {e}; try again later")
}

#[derive(Debug)]
pub enum DraftError {
    Io(io::Error),
    Spool(SpoolError),
}

impl fmt::Display for DraftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DraftError::Io(e) => e.fmt(f),
            DraftError::Spool(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DraftError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DraftError::Io(e) => Some(e),
            DraftError::Spool(e) => Some(e),
        }
    }
}

/// A message being written into the spool: our own lines verbatim, the
/// submitter's content with its line ends made CRLF (`Transparency::for_storage`).
/// Dropped without `commit`, it leaves nothing behind.
pub struct Draft {
    submission: Submission,
    transparency: Transparency,
    buf: Vec<u8>,
}

impl Draft {
    pub fn begin(spool: &Spool) -> Result<Draft, SpoolError> {
        Ok(Draft {
            submission: spool.begin_submission()?,
            transparency: Transparency::for_storage(),
            buf: Vec::new(),
        })
    }

    pub fn id(&self) -> &MessageId {
        self.submission.id()
    }

    /// Lines pbxmail composed itself, already CRLF-ended.
    pub fn verbatim(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.submission.write_all(bytes)
    }

    /// The submitter's bytes, any line ends.
    pub fn content(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.buf.clear();
        self.transparency.feed(bytes, &mut self.buf);
        self.submission.write_all(&self.buf)
    }

    /// Ends the last line and makes the message durable in `tenant`'s queue;
    /// on `Ok` it may be acknowledged.
    pub fn commit(
        mut self,
        tenant: &TenantName,
        sender: &str,
        recipients: &[String],
    ) -> Result<MessageId, DraftError> {
        self.buf.clear();
        self.transparency.finish(&mut self.buf);
        self.submission
            .write_all(&self.buf)
            .map_err(DraftError::Io)?;
        self.submission
            .commit(tenant, sender, recipients)
            .map_err(DraftError::Spool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::message::HeaderBlock;
    use std::path::Path;

    fn config() -> Config {
        crate::config::parse(
            Path::new("test.ini"),
            "[daemon]\nspool_dir = /nonexistent\ndefault_tenant = main\n\
             [tenant:main]\ndomains = main.example\nrelay = 127.0.0.1:25\ntls = none\n\
             [tenant:acme]\ndomains = acme.example\nrelay = 127.0.0.1:25\ntls = none\n",
        )
        .unwrap()
    }

    fn headers(text: &str) -> Vec<Header> {
        let mut block = HeaderBlock::default();
        for line in text.split_inclusive('\n') {
            block.take(line.as_bytes()).unwrap();
        }
        block.into_headers()
    }

    #[test]
    fn the_null_sender_is_routed_by_its_from_header() {
        let config = config();
        let bounce = headers("From: Mailer <daemon@acme.example>\nTo: x@y.example\n");
        assert_eq!(routing_domain("", &bounce), "acme.example");
        assert_eq!(
            route(&config, "acme.example").unwrap().name.as_str(),
            "acme"
        );
        // The envelope sender wins when there is one.
        assert_eq!(routing_domain("a@main.example", &bounce), "main.example");
        // No From at all: the default tenant decides.
        assert_eq!(routing_domain("", &headers("To: x@y.example\n")), "");
        assert_eq!(route(&config, "").unwrap().name.as_str(), "main");
    }

    #[test]
    fn an_unknown_domain_without_default_is_unrouted() {
        let config = crate::config::parse(
            Path::new("test.ini"),
            "[daemon]\nspool_dir = /nonexistent\n\
             [tenant:acme]\ndomains = acme.example\nrelay = 127.0.0.1:25\ntls = none\n",
        )
        .unwrap();
        assert_eq!(
            route(&config, "other.example").err(),
            Some(Unrouted {
                domain: "other.example".into()
            })
        );
    }

    #[test]
    fn date_and_message_id_are_added_only_when_missing() {
        let now = 1_700_000_000;
        let added = missing_fields(&headers("Subject: x\n"), "pbx.example", None, now);
        let names: Vec<&str> = added.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["Date", "Message-ID"]);
        assert_eq!(added[0].value(), time::rfc5322(now));
        let id = added[1].value();
        assert!(id.starts_with('<') && id.ends_with("@pbx.example>"), "{id}");

        let complete = headers("date: Tue, 14 Nov 2023 22:13:20 +0000\nMESSAGE-ID: <a@b>\n");
        assert!(missing_fields(&complete, "pbx.example", None, now).is_empty());
    }

    #[test]
    fn from_is_added_only_when_offered_and_missing() {
        let with_from = headers("From: a@acme.example\nDate: x\nMessage-ID: <a@b>\n");
        let offered = Some("b@acme.example".to_string());
        assert!(missing_fields(&with_from, "h", offered.clone(), 0).is_empty());
        let without = headers("Date: x\nMessage-ID: <a@b>\n");
        let added = missing_fields(&without, "h", offered, 0);
        assert_eq!(render(&added), b"From: b@acme.example\r\n");
        assert!(missing_fields(&without, "h", None, 0).is_empty());
    }
}
