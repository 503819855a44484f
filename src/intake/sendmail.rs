//! sendmail-style submission: read a message from a stream and work out the
//! envelope (command-line recipients, `-t`, `-f` or From); routing, the
//! missing Date/Message-ID/From and the durable commit are cleanup.rs's, the
//! same as for the listener. Option parsing lives in cli/sendmail.rs.

use super::cleanup::{self, Draft};
use super::message::{Header, MessageReader, ReadError};
use crate::base::address;
use crate::base::names::MessageId;
use crate::config::Config;
use crate::spool::Spool;
use std::fmt;
use std::io::BufRead;

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
    SubmitError::TempFail(cleanup::temp_fail(e))
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
        ReadError::BadHeaders(why) => SubmitError::Data(format!("refused: {why}")),
    })?;

    let recipients = envelope_recipients(opts, &headers)?;
    let sender = match &opts.sender {
        Some(s) if s.is_empty() || s == "<>" => String::new(),
        Some(s) => {
            let s = s.trim_start_matches('<').trim_end_matches('>').to_string();
            if !address::is_valid(&s) {
                return Err(SubmitError::Data(format!(
                    "sender address \"{s}\" given with -f or -r is not valid"
                )));
            }
            s
        }
        None => cleanup::from_address(&headers).ok_or_else(|| {
            SubmitError::Data("no sender: give -f ADDRESS or a From: header with an address".into())
        })?,
    };

    let domain = cleanup::routing_domain(&sender, &headers);
    let tenant = cleanup::route(config, &domain).map_err(|unrouted| {
        let what = if unrouted.domain.is_empty() {
            // The null sender without a From address: nothing names a domain.
            "the null sender's message has no From address to pick a tenant by".to_string()
        } else {
            format!(
                "no tenant handles the sender's domain \"{}\"",
                unrouted.domain
            )
        };
        SubmitError::Data(format!(
            "{what}: add the domain to a tenant's `domains`, or set default_tenant in {}",
            config.path.display()
        ))
    })?;

    if opts.recipients_from_headers {
        headers.retain(|h| !h.is("Bcc"));
    }
    let now = crate::base::clock::now_ms() / 1000;
    let added = cleanup::missing_fields(
        &headers,
        &config.daemon.hostname,
        generated_from(opts, &sender),
        now,
    );
    headers.extend(added);

    let spool = Spool::new(&config.daemon.spool_dir);
    cleanup::check_free_space(&spool, config.daemon.min_free_space)
        .map_err(SubmitError::TempFail)?;
    let mut draft = Draft::begin(&spool).map_err(temp_fail)?;
    let mut head = cleanup::render(&headers);
    head.extend_from_slice(b"\r\n");
    draft.verbatim(&head).map_err(temp_fail)?;
    if let Some(piece) = first_body_piece {
        draft.content(&piece).map_err(temp_fail)?;
    }
    // Pieces of up to 64 KiB go to the draft, which buffers its writes.
    let mut piece = Vec::new();
    while reader
        .next_piece(&mut piece)
        .map_err(|e| SubmitError::TempFail(format!("cannot read the message: {e}")))?
    {
        draft.content(&piece).map_err(temp_fail)?;
    }

    let tenant_name = tenant.name.as_str().to_string();
    let id = draft
        .commit(&tenant.name, &sender, &recipients)
        .map_err(temp_fail)?;
    spool.notify(&tenant.name, &id);
    Ok(Submitted {
        id,
        tenant: tenant_name,
    })
}

/// The From sendmail writes when the message has none: the sender, with
/// `-F`'s full name; none for the null sender.
fn generated_from(opts: &SubmitOptions, sender: &str) -> Option<String> {
    if sender.is_empty() {
        return None;
    }
    Some(match &opts.full_name {
        Some(name) => format!(
            "\"{}\" <{sender}>",
            name.replace(['"', '\\', '\r', '\n'], "")
        ),
        None => sender.to_string(),
    })
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
        return Err(SubmitError::Data(if opts.recipients_from_headers {
            "no recipients: none on the command line and no address in To, Cc or Bcc (-t)".into()
        } else {
            "no recipients: name them on the command line, or use -t to read To/Cc/Bcc".into()
        }));
    }
    Ok(recipients)
}
