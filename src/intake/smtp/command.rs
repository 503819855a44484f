//! The command side of the SMTP conversation: the verbs, EHLO/HELO name
//! validation, and MAIL/RCPT path arguments and parameters (SIZE, BODY).
//! What DATA receives is data.rs's.

use super::{Conversation, State};
use crate::base::address;
use crate::config::Config;
use crate::intake::cleanup;
use crate::intake::writer::Job;

impl Conversation {
    pub(super) fn command(&mut self, line: &str, config: &Config) {
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                let Some(name) = client_name(rest) else {
                    return self.reply("501 5.5.4 Syntax: EHLO domain or address literal");
                };
                self.reset();
                self.greeted = Some(name);
                let size = self.limits.max_message_size;
                let host = self.hostname.clone();
                self.reply(&format!("250-{host}"));
                self.reply("250-PIPELINING");
                self.reply(&format!("250-SIZE {size}"));
                self.reply("250-8BITMIME");
                self.reply("250 ENHANCEDSTATUSCODES");
            }
            "HELO" => {
                let Some(name) = client_name(rest) else {
                    return self.reply("501 5.5.4 Syntax: HELO domain");
                };
                self.reset();
                self.greeted = Some(name);
                let host = self.hostname.clone();
                self.reply(&format!("250 {host}"));
            }
            "MAIL" => self.mail(rest, config),
            "RCPT" => self.rcpt(rest),
            "DATA" => self.data(),
            "RSET" => {
                self.reset();
                self.reply("250 2.0.0 Ok");
            }
            "NOOP" => self.reply("250 2.0.0 Ok"),
            "QUIT" => self.close_with("221 2.0.0 Bye"),
            "VRFY" => self.reply("252 2.5.2 Cannot verify; send the message and see"),
            _ => self.reply("502 5.5.2 Command not recognized"),
        }
    }

    fn mail(&mut self, rest: &str, config: &Config) {
        if self.greeted.is_none() {
            return self.reply("503 5.5.1 Send EHLO first");
        }
        if self.sender.is_some() {
            return self.reply("503 5.5.1 Sender already given");
        }
        let Some((sender, params)) = path_argument(rest, "FROM:") else {
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        if !sender.is_empty() && !address::is_valid(&sender) {
            return self.reply("501 5.1.7 Bad sender address");
        }
        for param in params.split_ascii_whitespace() {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key.to_ascii_uppercase().as_str() {
                "SIZE" => match declared_size(value) {
                    Some(declared) if declared <= self.limits.max_message_size => {}
                    Some(_) => return self.reply("552 5.3.4 Message size exceeds the limit"),
                    None => return self.reply("501 5.5.4 Syntax: SIZE=<number of octets>"),
                },
                // RFC 6152 §2: the only two values; we take 8-bit data either way.
                "BODY"
                    if value.eq_ignore_ascii_case("7BIT")
                        || value.eq_ignore_ascii_case("8BITMIME") => {}
                "BODY" => return self.reply("501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME"),
                _ => return self.reply("555 5.5.4 Unsupported MAIL parameter"),
            }
        }
        // The null sender is routed by its From header, known after DATA.
        // Over SMTP it needs a default_tenant to be taken at all, as before
        // cleanup: the reply to MAIL cannot wait for the From.
        let tenant = if sender.is_empty() {
            if let Err(unrouted) = cleanup::route(config, "") {
                return self.reply(&format!(
                    "550 5.7.1 Sender domain \"{}\" is not handled here",
                    unrouted.domain
                ));
            }
            None
        } else {
            let domain = cleanup::routing_domain(&sender, &[]);
            match cleanup::route(config, &domain) {
                Ok(tenant) => Some(tenant.name.as_str().to_string()),
                Err(unrouted) => {
                    return self.reply(&format!(
                        "550 5.7.1 Sender domain \"{}\" is not handled here",
                        unrouted.domain
                    ))
                }
            }
        };
        self.jobs
            .push_back(Job::CheckSpace(config.daemon.min_free_space));
        self.state = State::CheckingSpace { sender, tenant };
    }

    fn rcpt(&mut self, rest: &str) {
        if self.sender.is_none() {
            return self.reply("503 5.5.1 Send MAIL first");
        }
        let Some((rcpt, _)) = path_argument(rest, "TO:") else {
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        if !address::is_valid(&rcpt) {
            return self.reply("501 5.1.3 Bad recipient address");
        }
        if self.recipients.len() >= self.limits.max_recipients as usize {
            return self.reply("452 4.5.3 Too many recipients");
        }
        self.recipients.push(rcpt);
        self.reply("250 2.1.5 Ok");
    }

    fn data(&mut self) {
        if self.sender.is_none() {
            return self.reply("503 5.5.1 Send MAIL first");
        }
        if self.recipients.is_empty() {
            return self.reply("554 5.5.1 No valid recipients");
        }
        self.jobs.push_back(Job::Open);
        self.opened = true;
        self.state = State::Opening;
    }
}

/// The EHLO/HELO argument, if it is one (RFC 5321 §4.1.1.1, §4.1.3): a
/// domain or an address literal. Lenient where real clients are sloppy
/// (underscores, a trailing dot, a single label), strict where it matters:
/// nothing but these characters ever reaches our Received field.
fn client_name(rest: &str) -> Option<String> {
    let name = rest.trim_matches([' ', '\t']);
    if name.is_empty() || name.len() > 255 {
        return None;
    }
    let ok = if let Some(literal) = name.strip_prefix('[') {
        let inner = literal.strip_suffix(']')?;
        !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':'))
    } else {
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            && !name.starts_with(['.', '-'])
    };
    ok.then(|| name.to_string())
}

/// `SIZE=` (RFC 1870 §6: digits): None when malformed. A number too big for
/// u64 is larger than any limit, so it saturates (then gets 552) instead of
/// being taken as 0.
fn declared_size(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.bytes().fold(0u64, |n, digit| {
        n.saturating_mul(10)
            .saturating_add(u64::from(digit.saturating_sub(b'0')))
    }))
}

/// `FROM:<addr> PARAMS` → (addr, params); tolerant of a space after the colon.
fn path_argument(rest: &str, keyword: &str) -> Option<(String, String)> {
    let rest = rest.trim_start();
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = rest.get(keyword.len()..)?.trim_start();
    let rest = rest.strip_prefix('<')?;
    let (path, params) = rest.split_once('>')?;
    Some((path.to_string(), params.trim().to_string()))
}
