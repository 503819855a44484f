//! Delivery status notifications (RFC 3464): a multipart/report telling the
//! sender which recipients failed and why, with the original headers. The
//! bounce is queued like any message, with the null sender, for the same
//! tenant; the tenant worker decides when one is due (outcome of a message).

use crate::base::names::MessageId;
use crate::base::names::TenantName;
use crate::base::time;
use crate::spool::envelope::{BounceOf, BounceStage, Envelope, RcptStatus};
use crate::spool::{Spool, SpoolError};
use std::io::{BufRead, BufReader, Read, Write};

/// Original headers quoted in a bounce; more is cut (RFC 3462 allows headers only).
const MAX_QUOTED_HEADERS: u64 = 64 * 1024;

/// Where a bounce for `envelope` goes: its sender, else the postmaster.
/// None: nobody can take it (a null sender and no postmaster configured).
pub fn addressee(envelope: &Envelope, postmaster: Option<&str>) -> Option<(String, BounceStage)> {
    if !envelope.sender.is_empty() {
        return Some((envelope.sender.clone(), BounceStage::Sender));
    }
    postmaster.map(|p| (p.to_string(), BounceStage::Postmaster))
}

pub struct Report<'a> {
    pub hostname: &'a str,
    /// The relay the failures came from, for Remote-MTA.
    pub relay_host: &'a str,
    pub id: &'a MessageId,
    pub envelope: &'a Envelope,
}

/// Writes the bounce for a failed message into the spool and returns its ID.
pub fn queue(
    spool: &Spool,
    tenant: &TenantName,
    report: &Report<'_>,
    to: &str,
    stage: BounceStage,
) -> Result<MessageId, SpoolError> {
    let original_headers = read_headers(spool, tenant, report.id);
    let mut submission = spool.begin_submission()?;
    let text = render(report, to, &original_headers);
    submission
        .write_all(text.as_bytes())
        .map_err(|e| SpoolError::Io {
            path: spool.root().to_path_buf(),
            source: e,
        })?;
    let bounce = BounceOf {
        message: report.id.to_string(),
        stage,
    };
    submission.commit_as(tenant, "", &[to.to_string()], Some(bounce))
}

fn read_headers(spool: &Spool, tenant: &TenantName, id: &MessageId) -> String {
    let Ok(file) = spool.open_message(tenant, id) else {
        return String::from("(the original message could not be read)\r\n");
    };
    let mut reader = BufReader::new(file.take(MAX_QUOTED_HEADERS));
    let mut headers = String::new();
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        headers.push_str(&String::from_utf8_lossy(&line));
        line.clear();
    }
    headers
}

/// The RFC 3463 status for a recipient's last reply: its enhanced code if it
/// has one, else one made from the reply's class.
fn status_of(reply: &str) -> String {
    let mut words = reply.split_ascii_whitespace();
    let first = words.next().unwrap_or_default();
    let is_enhanced = |w: &str| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    if is_enhanced(first) {
        return first.to_string();
    }
    if first.len() == 3 && first.bytes().all(|b| b.is_ascii_digit()) {
        if let Some(second) = words.next().filter(|w| is_enhanced(w)) {
            return second.to_string();
        }
        return format!("{}.0.0", first.get(..1).unwrap_or("5"));
    }
    "5.0.0".to_string()
}

fn diagnostic(reply: &str) -> String {
    let starts_with_code = reply
        .get(..3)
        .is_some_and(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let kind = if starts_with_code {
        "smtp"
    } else {
        "x-pbxmail"
    };
    // Header-safe: one line, no control characters.
    let clean: String = reply
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{kind}; {clean}")
}

fn render(report: &Report<'_>, to: &str, original_headers: &str) -> String {
    let now = crate::base::clock::now_secs();
    let host = report.hostname;
    let boundary = format!("{}/{host}", report.id);
    let failed: Vec<_> = report
        .envelope
        .recipients
        .iter()
        .filter(|r| r.status == RcptStatus::Failed)
        .collect();
    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"
    ));
    out.push_str(&format!("To: <{to}>\r\n"));
    out.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    out.push_str(&format!("Date: {}\r\n", time::rfc5322(now)));
    out.push_str(&format!(
        "Message-ID: <{}.bounce@{host}>\r\n",
        MessageId::generate()
    ));
    out.push_str("Auto-Submitted: auto-replied\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    out.push_str("This is a MIME-encapsulated message.\r\n\r\n");

    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    out.push_str(&format!(
        "This is the mail system at host {host}.\r\n\r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         It is attached below (headers only).\r\n\r\n"
    ));
    for r in &failed {
        let reply = r.last_reply.as_deref().unwrap_or("no reason recorded");
        out.push_str(&format!(
            "<{}>: {}\r\n",
            r.address,
            diagnostic(reply).trim_start_matches("smtp; ")
        ));
    }
    out.push_str("\r\n");

    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    out.push_str(&format!("Reporting-MTA: dns; {host}\r\n"));
    out.push_str(&format!("X-Pbxmail-Queue-ID: {}\r\n", report.id));
    if !report.envelope.sender.is_empty() {
        out.push_str(&format!(
            "X-Original-Sender: rfc822; {}\r\n",
            report.envelope.sender
        ));
    }
    out.push_str(&format!(
        "Arrival-Date: {}\r\n",
        time::rfc5322(report.envelope.queued_at_ms / 1000)
    ));
    for r in &failed {
        let reply = r.last_reply.as_deref().unwrap_or("no reason recorded");
        out.push_str("\r\n");
        out.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.address));
        out.push_str("Action: failed\r\n");
        out.push_str(&format!("Status: {}\r\n", status_of(reply)));
        out.push_str(&format!("Remote-MTA: dns; {}\r\n", report.relay_host));
        out.push_str(&format!("Diagnostic-Code: {}\r\n", diagnostic(reply)));
    }
    out.push_str("\r\n");

    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    out.push_str(original_headers);
    out.push_str(&format!("\r\n--{boundary}--\r\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::envelope::Recipient;

    fn envelope(sender: &str) -> Envelope {
        Envelope {
            sender: sender.into(),
            recipients: vec![
                Recipient {
                    address: "gone@x.example".into(),
                    status: RcptStatus::Failed,
                    last_reply: Some("550 5.1.1 no such user".into()),
                },
                Recipient {
                    address: "ok@x.example".into(),
                    status: RcptStatus::Sent,
                    last_reply: Some("250 ok".into()),
                },
            ],
            queued_at_ms: 1_795_411_302_000,
            size: 10,
            sha256: String::new(),
            attempts: 1,
            next_attempt_ms: None,
            last_error: None,
            bounce: None,
            bounced_as: None,
            held: false,
        }
    }

    #[test]
    fn status_codes() {
        assert_eq!(status_of("550 5.1.1 no such user"), "5.1.1");
        assert_eq!(status_of("554 rejected"), "5.0.0");
        assert_eq!(status_of("4.4.7 expired after 5 days"), "4.4.7");
        assert_eq!(status_of("relay said nothing useful"), "5.0.0");
    }

    #[test]
    fn report_has_the_rfc3464_fields_for_failed_recipients_only() {
        let env = envelope("101@acme.example");
        let id = MessageId::generate();
        let report = Report {
            hostname: "pbx.example",
            relay_host: "smtp.example",
            id: &id,
            envelope: &env,
        };
        let text = render(&report, "101@acme.example", "Subject: voicemail\r\n");
        for field in [
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Reporting-MTA: dns; pbx.example",
            "Final-Recipient: rfc822; gone@x.example",
            "Action: failed",
            "Status: 5.1.1",
            "Diagnostic-Code: smtp; 550 5.1.1 no such user",
            "Content-Type: text/rfc822-headers",
            "Subject: voicemail",
        ] {
            assert!(text.contains(field), "missing {field:?} in\n{text}");
        }
        assert!(!text.contains("Final-Recipient: rfc822; ok@x.example"));
        assert!(text.lines().all(|l| l.len() <= 998));
    }

    #[test]
    fn null_sender_bounces_go_to_the_postmaster_or_nowhere() {
        let env = envelope("");
        assert_eq!(
            addressee(&env, Some("postmaster@pbx.example")),
            Some(("postmaster@pbx.example".into(), BounceStage::Postmaster))
        );
        assert_eq!(addressee(&env, None), None);
    }
}
