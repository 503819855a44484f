//! sendmail-style submission: read a message from a stream, work out the
//! envelope (command-line recipients, `-t`, `-f` or From), pick the tenant by
//! the sender's domain, add missing Date/Message-ID/From, and commit it to the
//! spool durably. Option parsing lives in cli/sendmail.rs.

use super::message::{Header, MessageReader, ReadError};
use crate::address;
use crate::config::{Config, FreeSpace};
use crate::smtp::data::Transparency;
use crate::spool::{MessageId, Spool, SpoolError};
use crate::time;
use std::fmt;
use std::io::{BufRead, Write};

#[derive(Debug, Default, Clone)]
pub struct SubmitOptions {
    /// `-t`: recipients also from To, Cc and Bcc.
    pub recipients_from_headers: bool,
    /// Without `-i`, a lone `.` line ends the message.
    pub dot_terminates: bool,
    /// `-f`: `Some("")` is the null sender `<>`.
    pub sender: Option<String>,
    /// `-F`: full name for a generated From.
    pub full_name: Option<String>,
    pub recipients: Vec<String>,
}

#[derive(Debug)]
pub enum SubmitError {
    /// The message or its envelope is unusable (exit 65).
    Data(String),
    /// It could not be stored now; the caller keeps its copy (exit 75).
    TempFail(String),
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Data(why) | SubmitError::TempFail(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for SubmitError {}

fn temp_fail(e: impl fmt::Display) -> SubmitError {
    SubmitError::TempFail(format!(
        "cannot store the message now: {e}; try again later"
    ))
}

pub struct Submitted {
    pub id: MessageId,
    pub tenant: String,
}

pub fn submit(
    config: &Config,
    opts: &SubmitOptions,
    input: impl BufRead,
) -> Result<Submitted, SubmitError> {
    let mut reader = MessageReader::new(input, opts.dot_terminates);
    let (mut headers, first_body_piece) = reader.read_headers().map_err(|e| match e {
        ReadError::Io(e) => SubmitError::TempFail(format!("cannot read the message: {e}")),
        ReadError::BadHeaders(why) => SubmitError::Data(why),
    })?;

    let recipients = envelope_recipients(opts, &headers)?;
    let from_header = headers
        .iter()
        .find(|h| h.is("From"))
        .and_then(|h| address::parse_list(&h.value()).into_iter().next());
    let sender = match &opts.sender {
        Some(s) if s.is_empty() || s == "<>" => String::new(),
        Some(s) => {
            let s = s.trim_start_matches('<').trim_end_matches('>').to_string();
            if !address::is_valid(&s) {
                return Err(SubmitError::Data(format!(
                    "sender address \"{s}\" is not valid (-f)"
                )));
            }
            s
        }
        None => from_header.clone().ok_or_else(|| {
            SubmitError::Data("no sender: give -f ADDRESS or a From: header with an address".into())
        })?,
    };

    // The null sender (bounces) is routed by its From header's domain.
    let routing_address = if sender.is_empty() {
        from_header.as_deref()
    } else {
        Some(sender.as_str())
    };
    let domain = routing_address
        .and_then(address::domain_of)
        .unwrap_or_default();
    let tenant = config.tenant_for_sender_domain(domain).ok_or_else(|| {
        SubmitError::Data(format!(
            "no tenant handles the sender's domain \"{domain}\": add it to a tenant's `domains`, \
             or set default_tenant in {}",
            config.path.display()
        ))
    })?;

    if opts.recipients_from_headers {
        headers.retain(|h| !h.is("Bcc"));
    }
    add_missing_headers(&mut headers, config, opts, &sender);

    let spool = Spool::new(&config.daemon.spool_dir);
    check_free_space(&spool, config.daemon.min_free_space)?;
    let mut submission = spool.begin_submission().map_err(temp_fail)?;
    let mut transparency = Transparency::for_storage();
    let mut out = Vec::with_capacity(64 * 1024);
    for header in &headers {
        for line in &header.lines {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    if let Some(piece) = first_body_piece {
        transparency.feed(&piece, &mut out);
    }
    let mut piece = Vec::new();
    loop {
        if out.len() >= 32 * 1024 {
            submission.write_all(&out).map_err(temp_fail)?;
            out.clear();
        }
        let more = reader
            .next_piece(&mut piece)
            .map_err(|e| SubmitError::TempFail(format!("cannot read the message: {e}")))?;
        if !more {
            break;
        }
        transparency.feed(&piece, &mut out);
    }
    transparency.finish(&mut out);
    submission.write_all(&out).map_err(temp_fail)?;

    let tenant_name = tenant.name.as_str().to_string();
    let id = submission
        .commit(&tenant_name, &sender, &recipients)
        .map_err(|e: SpoolError| temp_fail(e))?;
    spool.notify(&tenant_name, &id);
    Ok(Submitted {
        id,
        tenant: tenant_name,
    })
}

/// Refuses new mail below `min_free_space`, so the spool never fills up to
/// the point where results of deliveries in progress cannot be recorded.
pub fn check_free_space(spool: &Spool, minimum: FreeSpace) -> Result<(), SubmitError> {
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
        return Err(SubmitError::TempFail(format!(
            "the spool's filesystem ({}) has only {available} of {total} bytes free, below min_free_space = {wanted}; \
             new mail is refused until space is freed; try again later",
            spool.root().display()
        )));
    }
    Ok(())
}

fn envelope_recipients(
    opts: &SubmitOptions,
    headers: &[Header],
) -> Result<Vec<String>, SubmitError> {
    let mut recipients = Vec::new();
    for arg in &opts.recipients {
        // Callers sometimes pass "a@x, b@y" as one argument.
        for piece in arg.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bare = piece.trim_start_matches('<').trim_end_matches('>');
            if !address::is_valid(bare) {
                return Err(SubmitError::Data(format!(
                    "recipient \"{piece}\" is not a valid address"
                )));
            }
            recipients.push(bare.to_string());
        }
    }
    if opts.recipients_from_headers {
        for header in headers
            .iter()
            .filter(|h| h.is("To") || h.is("Cc") || h.is("Bcc"))
        {
            recipients.extend(address::parse_list(&header.value()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    recipients.retain(|r| seen.insert(r.to_ascii_lowercase()));
    if recipients.is_empty() {
        return Err(SubmitError::Data(
            "no recipients: name them on the command line, or use -t to read To/Cc/Bcc".into(),
        ));
    }
    Ok(recipients)
}

fn add_missing_headers(
    headers: &mut Vec<Header>,
    config: &Config,
    opts: &SubmitOptions,
    sender: &str,
) {
    let now = crate::spool::unix_millis() / 1000;
    let add = |headers: &mut Vec<Header>, name: &str, value: String| {
        headers.push(Header {
            name: name.to_string(),
            lines: vec![format!("{name}: {value}")],
        })
    };
    if !headers.iter().any(|h| h.is("From")) && !sender.is_empty() {
        let value = match &opts.full_name {
            Some(name) => format!(
                "\"{}\" <{sender}>",
                name.replace(['"', '\\', '\r', '\n'], "")
            ),
            None => sender.to_string(),
        };
        add(headers, "From", value);
    }
    if !headers.iter().any(|h| h.is("Date")) {
        add(headers, "Date", time::rfc5322(now));
    }
    if !headers.iter().any(|h| h.is("Message-ID")) {
        let id = MessageId::generate();
        add(
            headers,
            "Message-ID",
            format!("<{id}@{}>", config.daemon.hostname),
        );
    }
}
