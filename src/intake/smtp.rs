//! The SMTP server side of local submission (RFC 5321, with PIPELINING,
//! SIZE and 8BITMIME): one connection's conversation as a state machine over
//! byte buffers. It never touches a socket, and it never fsyncs: at the end
//! of DATA it hands the message over for a durable commit and answers 250
//! only when that is done (`committed`). The server (server.rs) moves bytes.

use crate::address;
use crate::config::{Config, ListenLimits};
use crate::smtp::data::Transparency;
use crate::spool::{Spool, Submission};
use crate::time;
use std::io::Write;

/// Longest command line accepted (RFC 5321 §4.5.3.1.4 says 512; be lenient).
const MAX_COMMAND: usize = 2048;

/// A message ready to be made durable; the 250 waits for `committed`.
pub struct ToCommit {
    pub submission: Submission,
    pub tenant: String,
    pub sender: String,
    pub recipients: Vec<String>,
}

enum State {
    Command,
    /// Receiving the body; `None` once it is over the size limit (still read to the end).
    Data(Option<Box<Submission>>),
    /// The message went to be committed; input waits.
    Committing,
    Closed,
}

pub struct Conversation {
    state: State,
    hostname: String,
    peer: String,
    limits: ListenLimits,
    greeted: Option<String>,
    sender: Option<String>,
    tenant: Option<String>,
    recipients: Vec<String>,
    /// Body octets received (after dot-unstuffing) in this DATA.
    body_size: u64,
    at_line_start: bool,
    transparency: Transparency,
    /// Bytes received but not yet processed.
    input: Vec<u8>,
    /// Bytes to send.
    pub output: Vec<u8>,
}

impl Conversation {
    /// A new connection: the greeting is already in `output`.
    pub fn new(hostname: &str, peer: &str, limits: ListenLimits) -> Conversation {
        let mut c = Conversation {
            state: State::Command,
            hostname: hostname.to_string(),
            peer: peer.to_string(),
            limits,
            greeted: None,
            sender: None,
            tenant: None,
            recipients: Vec::new(),
            body_size: 0,
            at_line_start: true,
            transparency: Transparency::for_storage(),
            input: Vec::new(),
            output: Vec::new(),
        };
        c.reply(&format!("220 {hostname} ESMTP pbxmail"));
        c
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    pub fn is_committing(&self) -> bool {
        matches!(self.state, State::Committing)
    }

    fn reply(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    /// Ends the connection with a last reply (idle timeout, shutdown, overload).
    pub fn close_with(&mut self, line: &str) {
        self.reply(line);
        self.state = State::Closed;
    }

    /// Takes received bytes; returns a message to commit when one is complete.
    pub fn receive(&mut self, bytes: &[u8], config: &Config, spool: &Spool) -> Option<ToCommit> {
        self.input.extend_from_slice(bytes);
        self.process(config, spool)
    }

    /// The commit finished: answer the client and go on with what it pipelined.
    pub fn committed(
        &mut self,
        result: Result<String, String>,
        config: &Config,
        spool: &Spool,
    ) -> Option<ToCommit> {
        match result {
            Ok(id) => self.reply(&format!("250 2.0.0 Ok: queued as {id}")),
            Err(why) => {
                log::error!(
                    "submission from {}: cannot store the message: {why}",
                    self.peer
                );
                self.reply("452 4.3.1 Insufficient system storage; try again later");
            }
        }
        self.reset();
        self.state = State::Command;
        self.process(config, spool)
    }

    fn reset(&mut self) {
        self.sender = None;
        self.tenant = None;
        self.recipients.clear();
        self.body_size = 0;
    }

    fn process(&mut self, config: &Config, spool: &Spool) -> Option<ToCommit> {
        loop {
            match &self.state {
                State::Closed | State::Committing => return None,
                State::Data(_) => {
                    if let Some(done) = self.take_body_line() {
                        if done {
                            return self.finish_data();
                        }
                        continue;
                    }
                    return None;
                }
                State::Command => {
                    let Some(end) = self.input.iter().position(|&b| b == b'\n') else {
                        if self.input.len() > MAX_COMMAND {
                            self.close_with("500 5.5.2 Line too long");
                        }
                        return None;
                    };
                    let line: Vec<u8> = self.input.drain(..=end).collect();
                    if line.len() > MAX_COMMAND {
                        self.reply("500 5.5.2 Line too long");
                        continue;
                    }
                    let text = String::from_utf8_lossy(&line);
                    self.command(text.trim_end_matches(['\r', '\n']), config, spool);
                }
            }
        }
    }

    fn command(&mut self, line: &str, config: &Config, spool: &Spool) {
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                self.reset();
                self.greeted = Some(rest.trim().to_string());
                let size = self.limits.max_message_size;
                let host = self.hostname.clone();
                self.reply(&format!("250-{host}"));
                self.reply("250-PIPELINING");
                self.reply(&format!("250-SIZE {size}"));
                self.reply("250-8BITMIME");
                self.reply("250 ENHANCEDSTATUSCODES");
            }
            "HELO" => {
                self.reset();
                self.greeted = Some(rest.trim().to_string());
                let host = self.hostname.clone();
                self.reply(&format!("250 {host}"));
            }
            "MAIL" => self.mail(rest, config, spool),
            "RCPT" => self.rcpt(rest),
            "DATA" => self.data(spool),
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

    fn mail(&mut self, rest: &str, config: &Config, spool: &Spool) {
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
                "SIZE" => {
                    let declared: u64 = value.parse().unwrap_or(0);
                    if declared > self.limits.max_message_size {
                        return self.reply("552 5.3.4 Message size exceeds the limit");
                    }
                }
                "BODY" => {}
                _ => return self.reply("555 5.5.4 Unsupported MAIL parameter"),
            }
        }
        let domain = address::domain_of(&sender).unwrap_or_default();
        let Some(tenant) = config.tenant_for_sender_domain(domain) else {
            return self.reply(&format!(
                "550 5.7.1 Sender domain \"{domain}\" is not handled here"
            ));
        };
        if let Err(why) =
            crate::intake::sendmail::check_free_space(spool, config.daemon.min_free_space)
        {
            log::warn!("submission from {}: {why}", self.peer);
            return self.reply("452 4.3.1 Insufficient system storage; try again later");
        }
        self.tenant = Some(tenant.name.as_str().to_string());
        self.sender = Some(sender);
        self.reply("250 2.1.0 Ok");
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

    fn data(&mut self, spool: &Spool) {
        if self.sender.is_none() {
            return self.reply("503 5.5.1 Send MAIL first");
        }
        if self.recipients.is_empty() {
            return self.reply("554 5.5.1 No valid recipients");
        }
        let mut submission = match spool.begin_submission() {
            Ok(submission) => submission,
            Err(e) => {
                log::error!("submission from {}: {e}", self.peer);
                return self.reply("452 4.3.1 Insufficient system storage; try again later");
            }
        };
        // Our trace header, as every MTA adds one (RFC 5321 §4.4).
        let received = format!(
            "Received: from {} ({})\r\n\tby {} (pbxmail) with ESMTP id {};\r\n\t{}\r\n",
            self.greeted.as_deref().unwrap_or("unknown"),
            self.peer,
            self.hostname,
            submission.id(),
            time::rfc5322(crate::spool::unix_millis() / 1000)
        );
        let ok = submission.write_all(received.as_bytes()).is_ok();
        self.state = State::Data(ok.then(|| Box::new(submission)));
        self.at_line_start = true;
        self.transparency = Transparency::for_storage();
        self.body_size = 0;
        self.reply("354 End data with <CR><LF>.<CR><LF>");
    }

    /// Consumes one body line (or a long line's piece). Some(true) at the
    /// end-of-data line, Some(false) after other input, None when more is needed.
    fn take_body_line(&mut self) -> Option<bool> {
        let end = self.input.iter().position(|&b| b == b'\n');
        let take = match end {
            Some(end) => end + 1,
            // A long line: pass on what we have, keeping a possible "\r" for later.
            None if self.input.len() > 64 * 1024 => self.input.len() - 1,
            None => return None,
        };
        let line: Vec<u8> = self.input.drain(..take).collect();
        let starts_line = self.at_line_start;
        self.at_line_start = line.last() == Some(&b'\n');
        if starts_line && (line == b".\r\n" || line == b".\n") {
            return Some(true);
        }
        // RFC 5321 §4.5.2: a leading dot was doubled by the client.
        let content = if starts_line && line.first() == Some(&b'.') {
            line.get(1..).unwrap_or_default()
        } else {
            &line[..]
        };
        self.body_size += content.len() as u64;
        if let State::Data(slot) = &mut self.state {
            if self.body_size > self.limits.max_message_size {
                *slot = None; // dropped: its temp file goes with it
            }
            if let Some(submission) = slot.as_mut() {
                let mut normalised = Vec::with_capacity(content.len() + 2);
                self.transparency.feed(content, &mut normalised);
                if submission.write_all(&normalised).is_err() {
                    *slot = None;
                }
            }
        }
        Some(false)
    }

    fn finish_data(&mut self) -> Option<ToCommit> {
        let state = std::mem::replace(&mut self.state, State::Command);
        let State::Data(slot) = state else {
            return None;
        };
        let Some(mut submission) = slot else {
            let over = self.body_size > self.limits.max_message_size;
            self.reset();
            if over {
                self.reply("552 5.3.4 Message size exceeds the limit");
            } else {
                self.reply("452 4.3.1 Insufficient system storage; try again later");
            }
            return None;
        };
        let mut tail = Vec::new();
        self.transparency.finish(&mut tail);
        if submission.write_all(&tail).is_err() {
            self.reset();
            self.reply("452 4.3.1 Insufficient system storage; try again later");
            return None;
        }
        self.state = State::Committing;
        Some(ToCommit {
            submission: *submission,
            tenant: self.tenant.clone().unwrap_or_default(),
            sender: self.sender.clone().unwrap_or_default(),
            recipients: self.recipients.clone(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn setup(name: &str) -> (Config, Spool) {
        let dir =
            std::env::temp_dir().join(format!("pbxmail-intake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!(
            "[daemon]\nspool_dir = {}\nmin_free_space = 1%\nlisten_max_message_size = 100\nlisten_max_recipients = 2\n\
             [tenant:acme]\ndomains = acme.example\nrelay = 127.0.0.1:25\ntls = none\n",
            dir.display()
        );
        let config = crate::config::parse(Path::new("test.ini"), &text).unwrap();
        let spool = Spool::new(&dir);
        spool.create_layout().unwrap();
        (config, spool)
    }

    fn talk(
        c: &mut Conversation,
        input: &str,
        config: &Config,
        spool: &Spool,
    ) -> (String, Option<ToCommit>) {
        let commit = c.receive(input.as_bytes(), config, spool);
        let out = String::from_utf8(std::mem::take(&mut c.output)).unwrap();
        (out, commit)
    }

    #[test]
    fn pipelined_transaction_commits_only_at_the_end() {
        let (config, spool) = setup("pipe");
        let mut c = Conversation::new("pbx.example", "127.0.0.1", config.daemon.listen_limits);
        c.output.clear();
        let (out, commit) = talk(
            &mut c,
            "EHLO client\r\nMAIL FROM:<101@acme.example> SIZE=20\r\nRCPT TO:<a@x.example>\r\nDATA\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n",
            &config,
            &spool,
        );
        assert!(
            out.contains("250-PIPELINING")
                && out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
            "{out}"
        );
        let commit = commit.expect("a message to commit");
        assert_eq!(commit.tenant, "acme");
        assert_eq!(commit.recipients, vec!["a@x.example"]);
        assert!(c.is_committing(), "QUIT waits until the 250 is sent");
        let id = commit
            .submission
            .commit(&commit.tenant, &commit.sender, &commit.recipients)
            .unwrap();
        assert!(c.committed(Ok(id.to_string()), &config, &spool).is_none());
        let out = String::from_utf8(std::mem::take(&mut c.output)).unwrap();
        assert_eq!(
            out,
            format!("250 2.0.0 Ok: queued as {id}\r\n221 2.0.0 Bye\r\n")
        );
        let mut stored = String::new();
        std::io::Read::read_to_string(&mut spool.open_message("acme", &id).unwrap(), &mut stored)
            .unwrap();
        assert!(stored.starts_with("Received: from client"), "{stored}");
        assert!(stored.ends_with("\r\n.dot\r\nbody\r\n"), "{stored}");
    }

    #[test]
    fn limits_and_unknown_senders_are_refused() {
        let (config, spool) = setup("limits");
        let mut c = Conversation::new("pbx.example", "127.0.0.1", config.daemon.listen_limits);
        c.output.clear();
        let (out, _) = talk(&mut c, "MAIL FROM:<a@acme.example>\r\n", &config, &spool);
        assert!(out.starts_with("503"), "{out}");
        let (out, _) = talk(
            &mut c,
            "EHLO c\r\nMAIL FROM:<a@other.example>\r\nMAIL FROM:<a@acme.example> SIZE=1000\r\nMAIL FROM:<a@acme.example>\r\n\
             RCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\nRCPT TO:<d@x.example>\r\n",
            &config,
            &spool,
        );
        let codes: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("250-"))
            .map(|l| &l[..3])
            .collect();
        assert_eq!(
            codes,
            ["250", "550", "552", "250", "250", "250", "452"],
            "{out}"
        );
        // Over the size limit: read to the end, then refused, and nothing is queued.
        let (out, commit) = talk(
            &mut c,
            &format!("DATA\r\n{}\r\n.\r\n", "x".repeat(200)),
            &config,
            &spool,
        );
        assert!(commit.is_none());
        assert!(
            out.ends_with("552 5.3.4 Message size exceeds the limit\r\n"),
            "{out}"
        );
        assert!(spool.message_ids("acme").unwrap().is_empty());
    }
}
