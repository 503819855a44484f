//! The SMTP server side of local submission (RFC 5321, with PIPELINING,
//! SIZE and 8BITMIME): one connection's conversation as a state machine over
//! byte buffers. It never touches a socket or the disk: what needs the disk
//! (free space at MAIL, the new submission at DATA, the body, the commit) it
//! queues as `Job`s for the writer thread (writer.rs), and the reply that
//! depends on it waits for the writer's `Answer`. Here: the states, the
//! replies and the input loop; the commands and their arguments are in
//! command.rs, the DATA side (framing, header block, body) in data.rs.
//! The server (server.rs) moves bytes and jobs.

mod command;
mod data;

use crate::config::{Config, ListenLimits};
use crate::intake::writer::{Answer, Job};
use data::Body;
use std::collections::VecDeque;

/// Longest command line accepted (RFC 5321 §4.5.3.1.4 says 512; be lenient).
const MAX_COMMAND: usize = 2048;
/// Body bytes queued for the writer past which input waits (back-pressure).
const MAX_UNSENT: usize = 2 * data::CHUNK;

/// Where a transaction stands; the waiting states hold input until the
/// writer answers, so pipelined commands get their replies in order.
enum State {
    Command,
    /// MAIL passed its checks but free space: the writer measures it.
    /// `tenant` is None for the null sender, routed by its From later.
    CheckingSpace {
        sender: String,
        tenant: Option<String>,
    },
    /// DATA: the writer opens a submission; the 354 waits for it.
    Opening,
    /// Receiving the body.
    Data(Body),
    /// The message went to be committed; input waits for the 250.
    Committing,
    Closed,
}

impl State {
    fn as_str(&self) -> &'static str {
        match self {
            State::Command => "command",
            State::CheckingSpace { .. } => "checking-space",
            State::Opening => "opening",
            State::Data(_) => "data",
            State::Committing => "committing",
            State::Closed => "closed",
        }
    }
}

pub struct Conversation {
    state: State,
    hostname: String,
    peer: String,
    limits: ListenLimits,
    greeted: Option<String>,
    sender: Option<String>,
    /// None until routed (the null sender's is decided by its headers).
    tenant: Option<String>,
    recipients: Vec<String>,
    /// Body octets received (after dot-unstuffing) in this DATA.
    body_size: u64,
    /// A submission may be open on the writer for this connection.
    opened: bool,
    /// The last command line ended with CRLF: for DATA, that CRLF is the
    /// first of an immediate <CRLF>.<CRLF>; a bare LF is not.
    command_crlf: bool,
    /// Jobs for the writer, in order; the server sends them.
    jobs: VecDeque<Job>,
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
            opened: false,
            command_crlf: true,
            jobs: VecDeque::new(),
            input: Vec::new(),
            output: Vec::new(),
        };
        c.reply(&format!("220 {hostname} ESMTP pbxmail"));
        c
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// An answer from the writer is due, or jobs wait to be sent: the
    /// client is not the one keeping things idle.
    pub fn is_waiting(&self) -> bool {
        !self.jobs.is_empty()
            || matches!(
                self.state,
                State::CheckingSpace { .. } | State::Opening | State::Committing
            )
    }

    /// True when more input can be taken now: not waiting for the writer,
    /// nothing queued for it that it has no room for (back-pressure), open.
    pub fn wants_input(&self) -> bool {
        self.jobs.is_empty() && matches!(self.state, State::Command | State::Data(_))
    }

    /// A submission may be open on the writer: discard it when the client goes.
    pub fn may_hold_draft(&self) -> bool {
        self.opened
    }

    /// The next job for the writer, in order.
    pub fn next_job(&mut self) -> Option<Job> {
        self.jobs.pop_front()
    }

    /// A job the writer had no room for: it goes first next time.
    pub fn unsend(&mut self, job: Job) {
        self.jobs.push_front(job);
    }

    fn unsent_bytes(&self) -> usize {
        self.jobs.iter().map(Job::len).sum()
    }

    /// One reply line. A value from the client quoted in it (a domain)
    /// cannot break the line or reach the client's terminal raw: anything
    /// but printable ASCII becomes `?`.
    fn reply(&mut self, line: &str) {
        self.output.extend(
            line.bytes()
                .map(|b| if (32..=126).contains(&b) { b } else { b'?' }),
        );
        self.output.extend_from_slice(b"\r\n");
    }

    /// Ends the connection with a last reply (idle timeout, shutdown, overload).
    pub fn close_with(&mut self, line: &str) {
        self.reply(line);
        self.state = State::Closed;
    }

    /// Takes received bytes and goes as far as it can.
    pub fn receive(&mut self, bytes: &[u8], config: &Config) {
        self.input.extend_from_slice(bytes);
        self.process(config);
    }

    /// Goes on with input already received (after the writer made room).
    pub fn resume(&mut self, config: &Config) {
        self.process(config);
    }

    /// The writer's answer: reply to the client and go on with what it pipelined.
    pub fn answer(&mut self, answer: Answer, config: &Config) {
        let state = std::mem::replace(&mut self.state, State::Command);
        match (state, answer) {
            (State::CheckingSpace { sender, tenant }, Answer::Space(result)) => match result {
                Ok(()) => {
                    self.sender = Some(sender);
                    self.tenant = tenant;
                    self.reply("250 2.1.0 Ok");
                }
                Err(why) => {
                    log::warn!("submission from {}: {why}", self.peer);
                    self.reply("452 4.3.1 Insufficient system storage; try again later");
                }
            },
            (State::Opening, Answer::Opened(result)) => match result {
                Ok(id) => self.start_body(&id.to_string()),
                Err(why) => {
                    log::error!("submission from {}: {why}", self.peer);
                    self.reply("452 4.3.1 Insufficient system storage; try again later");
                }
            },
            (State::Committing, Answer::Committed { result, .. }) => {
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
            }
            (state, answer) => {
                log::debug!(
                    "submission from {}: ignored {answer:?} in state {}",
                    self.peer,
                    state.as_str()
                );
                self.state = state;
                return;
            }
        }
        self.process(config);
    }

    fn reset(&mut self) {
        self.sender = None;
        self.tenant = None;
        self.recipients.clear();
        self.body_size = 0;
    }

    fn process(&mut self, config: &Config) {
        loop {
            match &self.state {
                State::Closed
                | State::Committing
                | State::CheckingSpace { .. }
                | State::Opening => return,
                State::Data(_) => {
                    // Back-pressure: the writer has not taken what we have.
                    if self.unsent_bytes() >= MAX_UNSENT {
                        return;
                    }
                    match self.take_body_line(config) {
                        Some(true) => self.finish_data(config),
                        Some(false) => {}
                        None => return,
                    }
                }
                State::Command => {
                    let Some(end) = self.input.iter().position(|&b| b == b'\n') else {
                        if self.input.len() > MAX_COMMAND {
                            self.close_with("500 5.5.2 Line too long");
                        }
                        return;
                    };
                    let line: Vec<u8> = self.input.drain(..=end).collect();
                    if line.len() > MAX_COMMAND {
                        self.reply("500 5.5.2 Line too long");
                        continue;
                    }
                    self.command_crlf = line.ends_with(b"\r\n");
                    let text = String::from_utf8_lossy(&line);
                    self.command(text.trim_end_matches(['\r', '\n']), config);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::names::TenantName;
    use crate::intake::writer::{self, DiskSide, Envelope, Step};
    use crate::spool::Spool;
    use mio::Token;
    use std::path::Path;

    const T: Token = Token(7);

    fn setup(name: &str, size: &str) -> (Config, Spool) {
        setup_with(name, size, "")
    }

    fn setup_with(name: &str, size: &str, extra: &str) -> (Config, Spool) {
        let dir =
            std::env::temp_dir().join(format!("pbxmail-intake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!(
            "[daemon]\nspool_dir = {}\nmin_free_space = 1%\nlisten_max_message_size = {size}\nlisten_max_recipients = 2\n{extra}\
             [tenant:acme]\ndomains = acme.example\nrelay = 127.0.0.1:25\ntls = none\n\
             [tenant:beta]\ndomains = beta.example\nrelay = 127.0.0.1:25\ntls = none\n",
            dir.display()
        );
        let config = crate::config::parse(Path::new("test.ini"), &text).unwrap();
        let spool = Spool::new(&dir);
        spool.create_layout().unwrap();
        (config, spool)
    }

    fn conversation(config: &Config) -> Conversation {
        let mut c = Conversation::new("pbx.example", "127.0.0.1", config.daemon.listen_limits);
        c.output.clear();
        c
    }

    fn output(c: &mut Conversation) -> String {
        String::from_utf8(std::mem::take(&mut c.output)).unwrap()
    }

    /// Plays the writer and committer threads in line: every job the
    /// conversation has queued is done, every answer given, until it waits
    /// for nothing. Returns the IDs committed.
    fn serve(c: &mut Conversation, disk: &mut DiskSide, config: &Config) -> Vec<String> {
        let mut committed = Vec::new();
        loop {
            let mut answers = Vec::new();
            while let Some(job) = c.next_job() {
                match disk.handle(T, job) {
                    Step::Answer(answer) => answers.push(answer),
                    Step::Commit(draft, envelope) => answers.push(writer::commit(*draft, envelope)),
                    Step::Nothing => {}
                }
            }
            if answers.is_empty() {
                return committed;
            }
            for answer in answers {
                if let Answer::Committed { result: Ok(id), .. } = &answer {
                    committed.push(id.to_string());
                }
                c.answer(answer, config);
            }
        }
    }

    fn stored(spool: &Spool, tenant: &str, id: &str) -> String {
        let id = crate::base::names::MessageId::parse(id).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut spool
                .open_message(&TenantName::parse(tenant).unwrap(), &id)
                .unwrap(),
            &mut text,
        )
        .unwrap();
        text
    }

    #[test]
    fn replies_that_need_the_disk_wait_for_the_writer() {
        let (config, spool) = setup("pipe", "100");
        let mut disk = DiskSide::new(spool.clone());
        let mut c = conversation(&config);
        c.receive(
            b"EHLO client\r\nMAIL FROM:<101@acme.example> SIZE=20\r\nRCPT TO:<a@x.example>\r\nDATA\r\n\
              Subject: s\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n",
            &config,
        );
        let out = output(&mut c);
        assert!(out.ends_with("250 ENHANCEDSTATUSCODES\r\n"), "{out}");
        assert!(
            c.is_waiting() && !c.wants_input(),
            "MAIL waits for free space"
        );
        assert_eq!(
            c.next_job(),
            Some(Job::CheckSpace(config.daemon.min_free_space))
        );
        c.answer(Answer::Space(Ok(())), &config);
        assert_eq!(output(&mut c), "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
        assert_eq!(c.next_job(), Some(Job::Open), "DATA opens a submission");
        assert!(c.next_job().is_none());
        c.unsend(Job::Open);

        let ids = serve(&mut c, &mut disk, &config);
        let out = output(&mut c);
        assert_eq!(ids.len(), 1);
        let id = &ids[0];
        assert_eq!(
            out,
            format!(
                "354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as {id}\r\n221 2.0.0 Bye\r\n"
            )
        );
        assert!(c.is_closed());
        let text = stored(&spool, "acme", id);
        assert!(text.starts_with("Received: from client"), "{text}");
        assert!(text.contains(&format!("with ESMTP id {id};")), "{text}");
        assert!(text.ends_with("\r\n\r\n.dot\r\nbody\r\n"), "{text}");
    }

    #[test]
    fn low_space_at_mail_and_a_failed_open_at_data_get_452() {
        let (config, _spool) = setup("space", "100");
        let mut c = conversation(&config);
        c.receive(
            b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<b@x.example>\r\n",
            &config,
        );
        output(&mut c);
        let _ = c.next_job();
        c.answer(Answer::Space(Err("full".into())), &config);
        assert_eq!(
            output(&mut c),
            "452 4.3.1 Insufficient system storage; try again later\r\n503 5.5.1 Send MAIL first\r\n"
        );
        c.receive(
            b"MAIL FROM:<a@acme.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n",
            &config,
        );
        let _ = c.next_job();
        c.answer(Answer::Space(Ok(())), &config);
        assert_eq!(c.next_job(), Some(Job::Open));
        c.answer(Answer::Opened(Err("cannot create".into())), &config);
        let out = output(&mut c);
        assert!(
            out.ends_with("452 4.3.1 Insufficient system storage; try again later\r\n"),
            "{out}"
        );
        assert!(c.wants_input(), "the connection goes on");
    }

    #[test]
    fn limits_and_unknown_senders_are_refused() {
        let (config, spool) = setup("limits", "100");
        let mut disk = DiskSide::new(spool.clone());
        let mut c = conversation(&config);
        c.receive(b"MAIL FROM:<a@acme.example>\r\n", &config);
        assert!(output(&mut c).starts_with("503"));
        c.receive(
            b"EHLO c\r\nMAIL FROM:<a@other.example>\r\nMAIL FROM:<a@acme.example> SIZE=1000\r\nMAIL FROM:<a@acme.example>\r\n\
              RCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\nRCPT TO:<d@x.example>\r\n",
            &config,
        );
        serve(&mut c, &mut disk, &config);
        let out = output(&mut c);
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
        c.receive(
            format!("DATA\r\n{}\r\n.\r\n", "x".repeat(200)).as_bytes(),
            &config,
        );
        assert!(serve(&mut c, &mut disk, &config).is_empty());
        let out = output(&mut c);
        assert!(
            out.ends_with("552 5.3.4 Message size exceeds the limit\r\n"),
            "{out}"
        );
        assert!(spool
            .message_ids(&TenantName::parse("acme").unwrap())
            .unwrap()
            .is_empty());
        assert!(spool.tenants().unwrap().is_empty());
    }

    fn submit_over_listen(
        config: &Config,
        spool: &Spool,
        from: &str,
        message: &str,
    ) -> (String, String) {
        let mut disk = DiskSide::new(spool.clone());
        let mut c = conversation(config);
        let mut wire = format!("EHLO c\r\nMAIL FROM:<{from}>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n");
        for line in message.split_inclusive("\r\n") {
            if line.starts_with('.') {
                wire.push('.');
            }
            wire.push_str(line);
        }
        wire.push_str(".\r\n");
        c.receive(wire.as_bytes(), config);
        let ids = serve(&mut c, &mut disk, config);
        let out = output(&mut c);
        let Some(id) = ids.first() else {
            return (out, String::new());
        };
        let tenant = spool
            .tenant_of(&crate::base::names::MessageId::parse(id).unwrap())
            .unwrap()
            .to_string();
        (
            tenant,
            stored(
                spool,
                &spool
                    .tenant_of(&crate::base::names::MessageId::parse(id).unwrap())
                    .unwrap()
                    .to_string(),
                id,
            ),
        )
    }

    fn field_names(text: &str) -> Vec<String> {
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        head.lines()
            .filter(|l| !l.starts_with([' ', '\t']))
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_string()))
            .collect()
    }

    #[test]
    fn missing_date_and_message_id_are_added_at_the_end_of_the_header_block() {
        let (config, spool) = setup("added", "100");
        let (tenant, text) = submit_over_listen(
            &config,
            &spool,
            "a@acme.example",
            "From: a@acme.example\r\nSubject: s\r\n\r\nbody\r\n",
        );
        assert_eq!(tenant, "acme");
        assert_eq!(
            field_names(&text),
            ["Received", "From", "Subject", "Date", "Message-ID"],
            "{text}"
        );
        assert!(
            text.contains("\r\nMessage-ID: <") && text.contains("@pbx.example>\r\n\r\nbody\r\n"),
            "{text}"
        );

        let complete = "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-Id: <x@y>\r\n\r\nbody\r\n";
        let (_, text) = submit_over_listen(&config, &spool, "a@acme.example", complete);
        assert_eq!(
            field_names(&text),
            ["Received", "Date", "Message-Id"],
            "{text}"
        );
        assert!(text.ends_with(complete), "{text}");
    }

    #[test]
    fn the_null_sender_is_routed_by_its_from_header() {
        let (config, spool) = setup_with("null", "100", "default_tenant = acme\n");
        let bounce = "From: Mailer <daemon@beta.example>\r\nSubject: bounce\r\n\r\nx\r\n";
        let (tenant, _) = submit_over_listen(&config, &spool, "", bounce);
        assert_eq!(tenant, "beta");
        // A From no tenant handles: the default tenant's.
        let (tenant, _) =
            submit_over_listen(&config, &spool, "", "From: d@other.example\r\n\r\nx\r\n");
        assert_eq!(tenant, "acme");
        // Without a default_tenant the null sender is refused at MAIL.
        let (config, spool) = setup("null-nodefault", "100");
        let (out, text) = submit_over_listen(&config, &spool, "", bounce);
        assert!(text.is_empty());
        assert!(
            out.contains("\r\n550 5.7.1 Sender domain \"\" is not handled here\r\n503"),
            "{out}"
        );
    }

    #[test]
    fn a_null_sender_unrouted_after_a_reload_is_refused_after_the_data() {
        let (config, spool) = setup_with("null-reload", "100", "default_tenant = acme\n");
        let (no_default, _) = setup("null-reload-new", "100");
        let mut disk = DiskSide::new(spool.clone());
        let mut c = conversation(&config);
        c.receive(
            b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n",
            &config,
        );
        serve(&mut c, &mut disk, &config);
        assert!(output(&mut c).ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"));
        c.receive(b"From: d@other.example\r\n\r\nbody\r\n.\r\n", &no_default);
        assert!(serve(&mut c, &mut disk, &no_default).is_empty());
        assert_eq!(
            output(&mut c),
            "550 5.7.1 Sender domain \"other.example\" is not handled here\r\n"
        );
        assert!(spool.tenants().unwrap().is_empty());
    }

    #[test]
    fn both_ways_in_give_the_same_result() {
        let (config, spool) = setup_with("same", "100", "default_tenant = acme\n");
        let message = "From: Mailer <daemon@beta.example>\r\nTo: r@x.example\r\nSubject: same\r\n\r\nbody\r\n..dot\r\n";
        let (tenant, over_listen) = submit_over_listen(&config, &spool, "", message);
        let opts = crate::intake::sendmail::SubmitOptions {
            sender: Some(String::new()),
            recipients: vec!["r@x.example".into()],
            ..Default::default()
        };
        let done = crate::intake::sendmail::submit(&config, &opts, message.as_bytes()).unwrap();
        let by_sendmail = stored(&spool, &done.tenant, &done.id.to_string());
        assert_eq!(done.tenant, tenant);
        let without_received: Vec<String> = field_names(&over_listen).into_iter().skip(1).collect();
        assert_eq!(without_received, field_names(&by_sendmail));
        let (_, listen_body) = over_listen.split_once("\r\n\r\n").unwrap();
        let (_, sendmail_body) = by_sendmail.split_once("\r\n\r\n").unwrap();
        assert_eq!(listen_body, sendmail_body);
        assert_eq!(listen_body, "body\r\n..dot\r\n");
    }

    /// The whole stored file, as bytes (any charset).
    fn stored_bytes(spool: &Spool, tenant: &str, id: &str) -> Vec<u8> {
        let id = crate::base::names::MessageId::parse(id).unwrap();
        let mut bytes = Vec::new();
        let tenant = crate::base::names::TenantName::parse(tenant).unwrap();
        std::io::Read::read_to_end(&mut spool.open_message(&tenant, &id).unwrap(), &mut bytes)
            .unwrap();
        bytes
    }

    /// The reply codes in `out`, one per reply (continuation lines left out).
    fn codes(out: &str) -> Vec<&str> {
        out.split_terminator("\r\n")
            .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
            .map(|l| l.get(..3).unwrap_or(l))
            .collect()
    }

    /// One session over scripted bytes, the writer played in line: the
    /// replies' codes, the IDs committed.
    fn session(config: &Config, spool: &Spool, wire: &[u8]) -> (String, Vec<String>) {
        let mut disk = DiskSide::new(spool.clone());
        let mut c = conversation(config);
        c.receive(wire, config);
        let ids = serve(&mut c, &mut disk, config);
        (output(&mut c), ids)
    }

    #[test]
    fn smuggled_end_of_data_never_starts_a_second_message() {
        // The classic payloads (SMTP smuggling, 2023): a lone dot framed by
        // anything but CRLF on both sides, then a second transaction.
        let variants: [&[u8]; 6] = [
            b"\n.\n",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\n..\n.\n",
        ];
        for (i, dot) in variants.iter().enumerate() {
            let (config, spool) = setup(&format!("smuggle{i}"), "100K");
            let mut wire =
                b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n\
                Subject: one\r\n\r\nfirst"
                    .to_vec();
            wire.extend_from_slice(dot);
            wire.extend_from_slice(
                b"MAIL FROM:<evil@beta.example>\r\nRCPT TO:<victim@x.example>\r\nDATA\r\n\
                  Subject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n",
            );
            let (out, ids) = session(&config, &spool, &wire);
            assert_eq!(
                codes(&out),
                ["250", "250", "250", "354", "250", "221"],
                "{dot:?}: {out}"
            );
            assert_eq!(ids.len(), 1, "{dot:?}: {out}");
            // One message, the first transaction's: the rest is its text.
            let acme = crate::base::names::TenantName::parse("acme").unwrap();
            assert_eq!(
                spool.tenants().unwrap(),
                std::slice::from_ref(&acme),
                "{dot:?}"
            );
            let id = crate::base::names::MessageId::parse(&ids[0]).unwrap();
            let envelope = spool.load_envelope(&acme, &id).unwrap();
            assert_eq!(envelope.sender, "a@acme.example");
            let rcpts: Vec<&str> = envelope
                .recipients
                .iter()
                .map(|r| r.address.as_str())
                .collect();
            assert_eq!(rcpts, ["r@x.example"], "{dot:?}");
            let text = stored(&spool, "acme", &ids[0]);
            assert!(
                text.contains("\r\nMAIL FROM:<evil@beta.example>\r\n"),
                "{dot:?}: {text}"
            );
            assert!(text.ends_with("\r\nevil\r\n"), "{dot:?}: {text}");
        }
    }

    #[test]
    fn a_lone_dot_not_framed_by_crlf_stays_a_dot_line_and_crlf_dot_crlf_ends_data() {
        let (config, spool) = setup("lone-dot", "100K");
        let (out, ids) = session(
            &config,
            &spool,
            b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n\
              S: x\r\n\r\na\n.\nb\n..c\r\n.\r\n",
        );
        assert_eq!(codes(&out), ["250", "250", "250", "354", "250"], "{out}");
        let text = stored(&spool, "acme", &ids[0]);
        assert!(text.ends_with("\r\n\r\na\r\n.\r\nb\r\n.c\r\n"), "{text}");
    }

    #[test]
    fn a_data_line_ended_by_a_bare_lf_is_not_half_of_the_end_of_data() {
        let (config, spool) = setup("data-lf", "100K");
        let (out, ids) = session(
            &config,
            &spool,
            b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\n\
              .\r\nRSET\r\n\r\n.\r\n",
        );
        assert_eq!(codes(&out), ["250", "250", "250", "354", "250"], "{out}");
        let text = stored(&spool, "acme", &ids[0]);
        assert!(text.ends_with(">\r\n\r\n.\r\nRSET\r\n\r\n"), "{text:?}");
    }

    #[test]
    fn ehlo_names_that_are_not_a_domain_or_address_literal_get_501() {
        let (config, spool) = setup("ehlo", "100K");
        for bad in [
            "EHLO",
            "EHLO a\rb",
            "EHLO x\rReceived: forged",
            "EHLO two words",
            "EHLO x(y)",
            "EHLO .x",
            "HELO a;b",
            "EHLO [1.2.3.4",
            "EHLO []",
        ] {
            let (out, _) = session(
                &config,
                &spool,
                format!("{bad}\r\nMAIL FROM:<a@acme.example>\r\n").as_bytes(),
            );
            assert_eq!(codes(&out), ["501", "503"], "{bad:?}: {out}");
        }
        for good in [
            "EHLO pbx.example",
            "EHLO pbx.example.",
            "EHLO my_pc",
            "EHLO [127.0.0.1]",
            "EHLO [IPv6:::1]",
            "HELO localhost",
        ] {
            let (out, _) = session(&config, &spool, format!("{good}\r\n").as_bytes());
            assert_eq!(codes(&out), ["250"], "{good:?}: {out}");
        }
    }

    #[test]
    fn the_received_field_cannot_be_broken_by_the_client_or_peer() {
        let (config, spool) = setup("received", "100K");
        let mut disk = DiskSide::new(spool.clone());
        let mut c = Conversation::new(
            "pbx.example",
            "1.2.3.4\r\nX-Peer: forged",
            config.daemon.listen_limits,
        );
        c.receive(
            b"EHLO a\rBcc: forged@x.example\r\nEHLO [10.0.0.1]\r\nMAIL FROM:<a@acme.example>\r\n\
              RCPT TO:<r@x.example>\r\nDATA\r\nSubject: s\r\n\r\nb\r\n.\r\n",
            &config,
        );
        let ids = serve(&mut c, &mut disk, &config);
        assert_eq!(ids.len(), 1, "{}", output(&mut c));
        let text = stored(&spool, "acme", &ids[0]);
        let (head, _) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            field_names(&text),
            ["Received", "Subject", "Date", "Message-ID"],
            "{head}"
        );
        assert!(
            head.starts_with(
                "Received: from [10.0.0.1] (1.2.3.4__X-Peer:_forged)\r\n\tby pbx.example"
            ),
            "{head}"
        );
        assert!(!head.replace("\r\n", "").contains(['\r', '\n']), "{head:?}");
    }

    #[test]
    fn size_parameter_that_overflows_or_is_malformed_is_refused_not_read_as_zero() {
        let (config, spool) = setup("size", "100K");
        for (param, code) in [
            ("SIZE=99999999999999999999999", "552"),
            ("SIZE=18446744073709551616", "552"),
            ("SIZE=18446744073709551615", "552"),
            ("SIZE=102401", "552"),
            ("SIZE=", "501"),
            ("SIZE", "501"),
            ("SIZE=-1", "501"),
            ("SIZE=+5", "501"),
            ("SIZE=1e9", "501"),
            ("SIZE=0x10", "501"),
            ("BODY=BINARYMIME", "501"),
            ("SIZE=102400 BODY=8bitmime", "250"),
            ("SIZE=00000000000000000000000000012", "250"),
        ] {
            let (out, _) = session(
                &config,
                &spool,
                format!("EHLO c\r\nMAIL FROM:<a@acme.example> {param}\r\n").as_bytes(),
            );
            assert_eq!(codes(&out), ["250", code], "{param}: {out}");
        }
    }

    #[test]
    fn a_bare_cr_in_a_header_over_listen_is_stored_as_a_space_and_adds_no_field() {
        let (config, spool) = setup("bare-cr", "100K");
        let (_, text) = submit_over_listen(
            &config,
            &spool,
            "a@acme.example",
            "X-A: 1\rBcc: secret@y.example\r\nSubject: s\rFrom: forged@beta.example\r\n\r\nbody\rline\r\n",
        );
        assert_eq!(
            field_names(&text),
            ["Received", "X-A", "Subject", "Date", "Message-ID"],
            "{text:?}"
        );
        assert!(
            text.contains(
                "\r\nX-A: 1 Bcc: secret@y.example\r\nSubject: s From: forged@beta.example\r\n"
            ),
            "{text:?}"
        );
        // In the body a bare CR is a line end, as every line end is made CRLF.
        assert!(text.ends_with("\r\n\r\nbody\r\nline\r\n"), "{text:?}");
    }

    #[test]
    fn header_bytes_that_are_not_utf8_are_stored_unchanged_over_listen() {
        let (config, spool) = setup("latin1", "100K");
        let (out, ids) = session(
            &config,
            &spool,
            b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n\
              Subject: Gr\xfc\xdfe\r\nX-Name: M\xfcller\r\n\r\nK\xe4se\r\n.\r\n",
        );
        assert_eq!(ids.len(), 1, "{out}");
        let bytes = stored_bytes(&spool, "acme", &ids[0]);
        let needle: &[u8] = b"\r\nSubject: Gr\xfc\xdfe\r\nX-Name: M\xfcller\r\n";
        assert!(
            bytes.windows(needle.len()).any(|w| w == needle),
            "{bytes:?}"
        );
        assert!(bytes.ends_with(b"\r\n\r\nK\xe4se\r\n"), "{bytes:?}");
    }

    #[test]
    fn a_header_block_that_cannot_be_inspected_is_refused_after_the_data() {
        let (config, spool) = setup("long-header", "10M");
        let wire = format!(
            "EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n\
             X-Long: {}\r\n\r\nbody\r\n.\r\nNOOP\r\n",
            "v".repeat(70_000)
        );
        let (out, ids) = session(&config, &spool, wire.as_bytes());
        assert!(ids.is_empty(), "{out}");
        assert_eq!(
            codes(&out),
            ["250", "250", "250", "354", "552", "250"],
            "{out}"
        );
        assert!(spool.tenants().unwrap().is_empty());
    }

    #[test]
    fn a_body_without_a_separator_gets_one_after_the_header_block() {
        let (config, spool) = setup("no-separator", "100K");
        let (_, text) = submit_over_listen(
            &config,
            &spool,
            "a@acme.example",
            "Subject: s\r\nnot a header\r\nFrom: late@beta.example\r\n",
        );
        assert_eq!(
            field_names(&text),
            ["Received", "Subject", "Date", "Message-ID"],
            "{text:?}"
        );
        assert!(
            text.ends_with(">\r\n\r\nnot a header\r\nFrom: late@beta.example\r\n"),
            "{text:?}"
        );
    }

    #[test]
    fn a_big_body_waits_for_the_writer_and_never_piles_up() {
        let (config, spool) = setup("big", "10M");
        let mut disk = DiskSide::new(spool.clone());
        let mut c = conversation(&config);
        c.receive(b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\nSubject: big\r\n\r\n", &config);
        serve(&mut c, &mut disk, &config);
        assert!(output(&mut c).ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"));
        let line = format!("{}\r\n", "y".repeat(998));
        let piece = line.repeat(16);
        let mut sent = 0usize;
        // The writer takes nothing: input stops being wanted, with little queued.
        while c.wants_input() {
            c.receive(piece.as_bytes(), &config);
            sent += piece.len();
            assert!(sent < 4 << 20, "input never paused");
        }
        let queued: Vec<Job> = std::iter::from_fn(|| c.next_job()).collect();
        let bytes: usize = queued.iter().map(Job::len).sum();
        assert!(bytes <= 2 * MAX_UNSENT, "{bytes} bytes queued");
        // The writer takes them: the conversation goes on, paused again and
        // again, until the whole body is through.
        for job in queued {
            assert!(matches!(disk.handle(T, job), Step::Nothing));
        }
        while sent < 2 << 20 {
            c.resume(&config);
            if c.wants_input() {
                c.receive(piece.as_bytes(), &config);
                sent += piece.len();
            } else {
                serve(&mut c, &mut disk, &config);
            }
        }
        c.receive(b".\r\n", &config);
        let ids = serve(&mut c, &mut disk, &config);
        assert_eq!(ids.len(), 1, "{}", output(&mut c));
        let text = stored(&spool, "acme", &ids[0]);
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body.len(), sent);
    }

    /// The writer played without a disk for the property test: every job
    /// answered at once, the bytes of each committed message kept.
    #[derive(Default)]
    struct FakeDisk {
        open: Option<(crate::base::names::MessageId, Vec<u8>)>,
        committed: Vec<(Envelope, Vec<u8>)>,
    }

    impl FakeDisk {
        fn handle(&mut self, job: Job) -> Option<Answer> {
            match job {
                Job::CheckSpace(_) => Some(Answer::Space(Ok(()))),
                Job::Open => {
                    let id = crate::base::names::MessageId::generate();
                    self.open = Some((id.clone(), Vec::new()));
                    Some(Answer::Opened(Ok(id)))
                }
                Job::Trace(bytes) | Job::Content(bytes) => {
                    if let Some((_, message)) = &mut self.open {
                        message.extend_from_slice(&bytes);
                    }
                    None
                }
                Job::Commit(envelope) => {
                    let tenant = envelope.tenant.clone();
                    let result = match self.open.take() {
                        Some((id, message)) => {
                            self.committed.push((envelope, message));
                            Ok(id)
                        }
                        None => Err("no message was open".into()),
                    };
                    Some(Answer::Committed { tenant, result })
                }
                Job::Discard => {
                    self.open = None;
                    None
                }
            }
        }
    }

    /// Real sessions the property test starts from.
    const SESSIONS: &[&[u8]] = &[
        b"EHLO pbx.example\r\nMAIL FROM:<101@acme.example> SIZE=120 BODY=8BITMIME\r\n\
          RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\nFrom: 101@acme.example\r\n\
          Subject: Voicemail\r\n\r\n..dot\r\nbody\r\n.\r\nMAIL FROM:<102@beta.example>\r\n\
          RCPT TO:<c@x.example>\r\nDATA\r\nSubject: two\r\n\r\nx\r\n.\r\nQUIT\r\n",
        b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n\
          Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@beta.example>\r\nRCPT TO:<v@x.example>\r\n\
          DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n",
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n\
          From: Mailer <daemon@beta.example>\r\nSubject: bounce\r\n\r\nx\r\n.\r\n",
        b"NOOP\r\nEHLO [127.0.0.1]\r\nVRFY x\r\nRSET\r\nHELP\r\nMAIL FROM:<a@acme.example>\r\n\
          RSET\r\nDATA\r\nRCPT TO:<r@x.example>\r\nQUIT\r\n",
        b"EHLO lf\nMAIL FROM:<a@acme.example>\nRCPT TO:<r@x.example>\nDATA\n\
          Subject: lf\nX-A: 1\rBcc: b@x.example\n\nline\n..dot\r\n.\r\n",
        b"EHLO c\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n\
          Subject: Gr\xfc\xdfe\r\nnot a header\r\n\r\nK\xe4se\r\n.\r\n",
    ];

    /// Every reply line: a code, a space or dash, printable ASCII, CRLF.
    fn assert_replies_well_formed(out: &[u8], case: usize) {
        assert!(
            out.is_empty() || out.ends_with(b"\r\n"),
            "case {case}: {out:?}"
        );
        for line in out.split_inclusive(|&b| b == b'\n') {
            let text = line.strip_suffix(b"\r\n").unwrap_or(line);
            let ok = text.len() >= 4
                && text[..3].iter().all(u8::is_ascii_digit)
                && matches!(text[3], b' ' | b'-')
                && text.iter().all(|&b| (32..=126).contains(&b));
            assert!(ok, "case {case}: reply line {line:?}");
        }
    }

    /// The header block of a stored message (up to the blank line, or all):
    /// CRLF line ends only, so no line break appears that the parser did not see.
    fn assert_header_block_is_crlf_clean(message: &[u8], case: usize) {
        let end = message
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(message.len(), |p| p + 2);
        let head = &message[..end];
        for (i, &b) in head.iter().enumerate() {
            match b {
                b'\r' => assert_eq!(head.get(i + 1), Some(&b'\n'), "case {case}: {head:?}"),
                b'\n' => assert_eq!(
                    i.checked_sub(1).map(|p| head[p]),
                    Some(b'\r'),
                    "case {case}"
                ),
                _ => {}
            }
        }
        let first = head.split(|&b| b == b'\r').next().unwrap_or_default();
        assert!(
            first.starts_with(b"Received: from "),
            "case {case}: {head:?}"
        );
        assert!(
            first.iter().all(|&b| (32..=126).contains(&b)),
            "case {case}: {first:?}"
        );
    }

    /// Issue 14: the conversation over mutated real sessions, fed in random
    /// pieces, never panics or stalls, holds bounded input, replies only in
    /// well-formed lines, stores header blocks whose line breaks are the
    /// parsed ones, and commits no more messages than the input has
    /// `<CRLF>.<CRLF>` sequences (nothing smuggled in).
    #[test]
    fn mutated_sessions_never_panic_stall_or_smuggle() {
        let (config, _) = setup_with("prop", "100K", "default_tenant = acme\n");
        let (strict, _) = setup("prop-strict", "100K");
        use crate::base::mutate::{cases, mutate_tokens, pieces, seed, Rng};
        use crate::intake::{MAIL_RUNS, MAIL_TOKENS};
        let seed = seed(0x5EED_1414);
        let mut rng = Rng::seeded(seed);
        for case in 0..cases(1500) {
            let start = *rng.pick(SESSIONS);
            let input = mutate_tokens(start, MAIL_TOKENS, MAIL_RUNS, &mut rng);
            let config = if rng.below(2) == 0 { &config } else { &strict };
            let mut pieces = pieces(&input, &mut rng).into_iter();
            let mut disk = FakeDisk::default();
            let mut c = conversation(config);
            loop {
                let mut moved = false;
                while let Some(job) = c.next_job() {
                    moved = true;
                    if let Some(answer) = disk.handle(job) {
                        c.answer(answer, config);
                    }
                }
                assert!(
                    c.input.len() <= MAX_COMMAND + 64 * 1024 + 4096,
                    "case {case}: {} bytes held",
                    c.input.len()
                );
                let out = std::mem::take(&mut c.output);
                assert_replies_well_formed(&out, case);
                if c.is_closed() {
                    break;
                }
                if c.wants_input() {
                    match pieces.next() {
                        Some(piece) => c.receive(piece, config),
                        None => break,
                    }
                } else if !moved {
                    panic!(
                        "case {case} (seed {seed:#x}): stalled in {}",
                        c.state.as_str()
                    );
                }
            }
            let ends = input.windows(5).filter(|w| w == b"\r\n.\r\n").count();
            assert!(
                disk.committed.len() <= ends,
                "case {case} (seed {seed:#x}): {} messages from {ends} ends: {input:?}",
                disk.committed.len()
            );
            for (envelope, message) in &disk.committed {
                assert!(envelope.recipients.len() <= 2, "case {case}");
                assert!(!envelope.tenant.is_empty(), "case {case}");
                assert_header_block_is_crlf_clean(message, case);
            }
        }
    }
}
