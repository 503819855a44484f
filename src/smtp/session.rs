//! One SMTP conversation over any `Read + Write` stream: typed commands out
//! (alone or as a group, pipelined where the relay allows), replies in, each
//! phase under its own timeout. A negative reply is data (`Reply`); only a
//! broken conversation is an error. The mail transaction run over it
//! (MAIL, RCPT, the body) is transaction.rs.

use super::command::Command;
use super::deadline::Deadlined;
use super::reply::{read_reply, Reply};
use super::{Capabilities, Phase, SessionError};
use crate::base::stream::Transport;
use std::io::{self, BufReader, Write};
use std::time::Duration;

/// Named from here by client.rs; they belong with the AUTH commands.
pub use super::command::{AuthMechanism, BearerMechanism};

/// Per-phase limits (RFC 5321 §4.5.3.2 gives 5 minutes for commands, 10 for
/// the end of data); `connect` covers the TCP connect and the greeting.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data: Duration,
}

/// What a lockstep group's replies so far say about its next command.
#[derive(Debug, Default)]
struct Lockstep {
    mail_refused: bool,
    rcpt_sent: bool,
    rcpt_accepted: bool,
}

impl Lockstep {
    fn answered(&mut self, command: &Command, reply: &Reply) {
        match command {
            Command::Mail { .. } => self.mail_refused |= !reply.code.is_positive(),
            Command::Rcpt(_) => {
                self.rcpt_sent = true;
                self.rcpt_accepted |= reply.code.is_positive();
            }
            _ => {}
        }
    }

    /// Whether `next` has nothing left to do (RFC 5321 §3.3): RCPT needs an
    /// accepted MAIL, DATA an accepted MAIL and, if the group has RCPTs, an
    /// accepted one.
    fn needless(&self, next: &Command) -> bool {
        match next {
            Command::Rcpt(_) => self.mail_refused,
            Command::Data => self.mail_refused || (self.rcpt_sent && !self.rcpt_accepted),
            _ => false,
        }
    }
}

/// Receives the conversation line by line (`C: ...` / `S: ...`) for
/// `pbxmail test`; credentials are already redacted when it sees them.
pub type Trace = Box<dyn FnMut(&str) + Send>;

pub struct Session<S: Transport> {
    io: BufReader<Deadlined<S>>,
    pub(super) timeouts: Timeouts,
    /// The current phase's timeout: per write, and for each reply as a whole.
    phase_timeout: Duration,
    /// The relay hung up mid-body after replying; nothing more can be sent.
    pub(super) closed: bool,
    pub caps: Capabilities,
    trace: Option<Trace>,
}

impl<S: Transport> Session<S> {
    pub fn new(stream: S, timeouts: Timeouts) -> Self {
        Session {
            io: BufReader::with_capacity(8 * 1024, Deadlined::new(stream)),
            timeouts,
            phase_timeout: timeouts.command,
            closed: false,
            caps: Capabilities::default(),
            trace: None,
        }
    }

    pub fn with_trace(mut self, trace: Option<Trace>) -> Self {
        self.trace = trace;
        self
    }

    /// Hands the trace on (to the session that continues after STARTTLS).
    pub fn take_trace(&mut self) -> Option<Trace> {
        self.trace.take()
    }

    pub fn note(&mut self, line: &str) {
        if let Some(trace) = self.trace.as_mut() {
            trace(line);
        }
    }

    /// Hands back the stream for a TLS upgrade. Refuses if the server sent
    /// anything we have not read yet: after `220` to STARTTLS such bytes could
    /// only be an injection (CVE-2011-0411 class), never a legitimate reply.
    pub fn into_stream(self) -> Result<S, SessionError> {
        if !self.io.buffer().is_empty() {
            return Err(SessionError::Protocol(
                Phase::StartTls,
                format!(
                    "the relay sent {} bytes after its STARTTLS reply, before the TLS handshake; \
                     possible command injection, session aborted",
                    self.io.buffer().len()
                ),
            ));
        }
        Ok(self.io.into_inner().into_inner())
    }

    /// The stream underneath, for tests that look at what it saw.
    #[cfg(test)]
    pub(super) fn stream(&self) -> &S {
        self.io.get_ref().get_ref()
    }

    #[cfg(test)]
    pub(super) fn stream_mut(&mut self) -> &mut S {
        self.io.get_mut().get_mut()
    }

    pub(super) fn set_timeout(
        &mut self,
        phase: Phase,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        self.phase_timeout = timeout;
        self.io
            .get_mut()
            .set_timeout(timeout)
            .map_err(|e| SessionError::Io(phase, e))
    }

    /// Reads one reply, all of it within the phase's timeout.
    pub fn read_reply(&mut self, phase: Phase) -> Result<Reply, SessionError> {
        self.io.get_mut().start(self.phase_timeout);
        let read = read_reply(&mut self.io);
        self.io.get_mut().clear();
        self.set_timeout(phase, self.phase_timeout)?;
        let reply = read.map_err(|e| SessionError::from_reply_error(phase, e))?;
        if let Some(trace) = self.trace.as_mut() {
            let last = reply.lines.len().saturating_sub(1);
            for (i, text) in reply.lines.iter().enumerate() {
                let separator = if i == last { ' ' } else { '-' };
                trace(&format!("S: {}{separator}{text}", reply.code.0));
            }
        }
        Ok(reply)
    }

    /// A reply, where 421 ends the session (RFC 5321 §3.8): the rest is deferred.
    pub(super) fn read_checked(&mut self, phase: Phase) -> Result<Reply, SessionError> {
        let reply = self.read_reply(phase)?;
        if reply.code.0 == 421 {
            return Err(SessionError::Rejected(phase, reply));
        }
        Ok(reply)
    }

    /// Every reply we asked for has been read when this is called (before a
    /// command, the body or a BDAT chunk goes out, and after the reply that
    /// decides a message), so bytes already buffered are replies nobody asked
    /// for. Taking them as answers would let commands and replies drift: a
    /// stray 250 after 354 read as the answer to the final dot made a refused
    /// message "sent". The buffered reader knows exactly what has arrived, so
    /// this needs no timing; the session ends and the message is deferred.
    pub(super) fn ensure_in_step(&self, phase: Phase) -> Result<(), SessionError> {
        if self.io.buffer().is_empty() {
            return Ok(());
        }
        Err(SessionError::Protocol(
            phase,
            format!(
                "the relay sent {} bytes nobody asked for; replies are out of step, \
                 so the session ends here and nothing more is sent",
                self.io.buffer().len()
            ),
        ))
    }

    /// Writes commands in one go (one, or a pipelined group); `phase` names
    /// the step a failure is reported against.
    fn send(&mut self, phase: Phase, commands: &[Command]) -> Result<(), SessionError> {
        if self.closed {
            let gone = io::Error::new(io::ErrorKind::BrokenPipe, "the relay closed the connection");
            return Err(SessionError::Io(phase, gone));
        }
        self.ensure_in_step(phase)?;
        if let Some(trace) = self.trace.as_mut() {
            for command in commands {
                trace(&format!("C: {}", command.redacted()));
            }
        }
        let mut wire = String::new();
        for command in commands {
            wire.push_str(&command.to_string());
            wire.push_str("\r\n");
        }
        self.write_all(phase, wire.as_bytes())?;
        self.flush(phase)
    }

    /// Sends one command and reads its reply, under the command timeout.
    pub fn command(&mut self, command: &Command) -> Result<Reply, SessionError> {
        let phase = command.phase();
        self.set_timeout(phase, self.timeouts.command)?;
        self.send(phase, std::slice::from_ref(command))?;
        self.read_checked(phase)
    }

    /// Sends a group of commands under the command timeout and returns their
    /// replies in order, one per command sent. Where the relay offers
    /// PIPELINING (RFC 2920) the whole group goes out in one write and every
    /// reply is then read; a command that must end a group (EHLO, DATA,
    /// QUIT; RFC 2920 §3.1) may only come last. Otherwise each command waits
    /// for the reply before it, and the group stops early at a command those
    /// replies leave nothing to do (`Lockstep`), so fewer replies come back.
    /// A 421 anywhere ends the session (`Rejected`).
    pub fn command_group(&mut self, group: &[Command]) -> Result<Vec<Reply>, SessionError> {
        let mut replies = Vec::with_capacity(group.len());
        let Some(first) = group.first() else {
            return Ok(replies);
        };
        if !self.caps.pipelining {
            let mut lockstep = Lockstep::default();
            let mut last = first.phase();
            for command in group {
                if lockstep.needless(command) {
                    break;
                }
                let reply = self.command(command)?;
                lockstep.answered(command, &reply);
                replies.push(reply);
                last = command.phase();
            }
            self.ensure_in_step(last)?;
            return Ok(replies);
        }
        self.set_timeout(first.phase(), self.timeouts.command)?;
        self.send(first.phase(), group)?;
        let mut last = first.phase();
        for command in group {
            last = command.phase();
            replies.push(self.read_checked(last)?);
        }
        // More replies than commands: the group's answers cannot be trusted
        // (the group may end in DATA, and the body must not follow).
        self.ensure_in_step(last)?;
        Ok(replies)
    }

    /// The greeting counts as part of connecting: a relay that accepts TCP but
    /// never greets (black-holed) is given up on after `connect_timeout`.
    pub fn greeting(&mut self) -> Result<Reply, SessionError> {
        self.set_timeout(Phase::Greeting, self.timeouts.connect)?;
        let reply = self.read_reply(Phase::Greeting)?;
        if !reply.code.is_positive() {
            return Err(SessionError::Rejected(Phase::Greeting, reply));
        }
        Ok(reply)
    }

    /// EHLO, falling back to HELO when the server does not know EHLO.
    /// Replaces every capability learned before (after STARTTLS only the new EHLO counts).
    pub fn hello(&mut self, hostname: &str) -> Result<(), SessionError> {
        self.caps = Capabilities::default();
        let reply = self.command(&Command::Ehlo(hostname.to_string()))?;
        if reply.code.is_positive() {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if !reply.code.is_permanent() {
            return Err(SessionError::Rejected(Phase::Ehlo, reply));
        }
        let reply = self.command(&Command::Helo(hostname.to_string()))?;
        if !reply.code.is_positive() {
            return Err(SessionError::Rejected(Phase::Ehlo, reply));
        }
        Ok(())
    }

    /// Asks for STARTTLS; the caller upgrades with `into_stream` on success.
    pub fn start_tls(&mut self) -> Result<(), SessionError> {
        let reply = self.command(&Command::StartTls)?;
        if reply.code.0 != 220 {
            return Err(SessionError::Rejected(Phase::StartTls, reply));
        }
        Ok(())
    }

    pub(super) fn flush(&mut self, phase: Phase) -> Result<(), SessionError> {
        self.io
            .get_mut()
            .flush()
            .map_err(|e| SessionError::from_io(phase, e))
    }

    pub(super) fn write_all(&mut self, phase: Phase, bytes: &[u8]) -> Result<(), SessionError> {
        self.io
            .get_mut()
            .write_all(bytes)
            .map_err(|e| SessionError::from_io(phase, e))
    }

    /// Polite close; the reply does not matter any more.
    pub fn quit(mut self) {
        let _ = self.command(&Command::Quit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::script::{outgoing, script, session, session_with, written};
    use std::io::Read;

    fn codes_of(replies: &[Reply]) -> Vec<u16> {
        replies.iter().map(|r| r.code.0).collect()
    }

    fn transaction_group(rcpts: &[&str]) -> Vec<Command> {
        let mut group = vec![Command::Mail {
            from: "a@x".into(),
            parameters: Vec::new(),
        }];
        group.extend(rcpts.iter().map(|r| Command::Rcpt(r.to_string())));
        group.push(Command::Data);
        group
    }

    fn texts(replies: &[Reply]) -> Vec<String> {
        replies.iter().map(Reply::summary).collect()
    }

    #[test]
    fn pipelined_group_is_one_write_and_replies_come_back_in_order() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 PIPELINING\r\n",
            "250 2.1.0 sender\r\n550 5.1.1 b\r\n250 2.1.5 c\r\n354 go\r\n",
        ]);
        s.hello("pbx").unwrap();
        let before = script(&s).writes;
        let replies = s
            .command_group(&transaction_group(&["b@y", "c@y"]))
            .unwrap();
        assert_eq!(script(&s).writes - before, 1);
        assert_eq!(codes_of(&replies), vec![250, 550, 250, 354]);
        assert_eq!(
            texts(&replies),
            vec!["250 2.1.0 sender", "550 5.1.1 b", "250 2.1.5 c", "354 go"]
        );
        assert_eq!(
            written(s),
            "EHLO pbx\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"
        );
    }

    /// The group after a message's end of data (10 minutes by default) is
    /// bounded by the command timeout again, pipelined as in lockstep.
    #[test]
    fn pipelined_group_after_a_message_waits_the_command_timeout() {
        let command = Duration::from_secs(1);
        let mut s = session_with(
            &[
                "",
                "250-mx\r\n250 PIPELINING\r\n",
                "250 ok\r\n250 ok\r\n354 go\r\n",
                "250 queued\r\n",
                "250 ok\r\n250 ok\r\n354 go\r\n",
            ],
            Timeouts {
                connect: command,
                command,
                data: Duration::from_secs(600),
            },
        );
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        s.transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"x"[..]))
            .unwrap();
        s.stream_mut().timeouts.clear();
        let replies = s.command_group(&transaction_group(&["b@y"])).unwrap();
        assert_eq!(codes_of(&replies), vec![250, 250, 354]);
        let set = &script(&s).timeouts;
        assert!(
            !set.is_empty() && set.iter().all(|&t| t <= command),
            "{set:?}"
        );
    }

    #[test]
    fn pipelined_group_reads_every_reply_even_after_a_refused_mail() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 PIPELINING\r\n",
            "550 no sender\r\n503 need MAIL\r\n503 need RCPT\r\n",
        ]);
        s.hello("pbx").unwrap();
        let replies = s.command_group(&transaction_group(&["b@y"])).unwrap();
        assert_eq!(codes_of(&replies), vec![550, 503, 503]);
        assert!(written(s).ends_with("MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"));
    }

    #[test]
    fn lockstep_group_waits_for_each_reply() {
        let mut s = session(&[
            "",
            "250 mx\r\n",
            "250 sender\r\n",
            "550 b\r\n",
            "250 c\r\n",
            "354 go\r\n",
        ]);
        s.hello("pbx").unwrap();
        let before = script(&s).writes;
        let replies = s
            .command_group(&transaction_group(&["b@y", "c@y"]))
            .unwrap();
        assert_eq!(script(&s).writes - before, 4);
        assert_eq!(
            texts(&replies),
            vec!["250 sender", "550 b", "250 c", "354 go"]
        );
        assert_eq!(
            written(s),
            "EHLO pbx\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"
        );
    }

    #[test]
    fn lockstep_group_stops_after_a_refused_mail() {
        let mut s = session(&["", "550 no sender\r\n"]);
        let replies = s.command_group(&transaction_group(&["b@y"])).unwrap();
        assert_eq!(codes_of(&replies), vec![550]);
        assert_eq!(written(s), "MAIL FROM:<a@x>\r\n");
    }

    #[test]
    fn lockstep_group_sends_no_data_when_every_rcpt_is_refused() {
        let mut s = session(&["", "250 ok\r\n", "550 b\r\n", "450 c\r\n"]);
        let replies = s
            .command_group(&transaction_group(&["b@y", "c@y"]))
            .unwrap();
        assert_eq!(codes_of(&replies), vec![250, 550, 450]);
        assert_eq!(
            written(s),
            "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\n"
        );
    }

    #[test]
    fn group_421_ends_the_session_in_either_mode() {
        let mut s = session(&["", "250 ok\r\n", "421 4.3.2 bye\r\n"]);
        let err = s.command_group(&transaction_group(&["b@y"])).unwrap_err();
        assert!(matches!(err, SessionError::Rejected(Phase::Rcpt, r) if r.code.0 == 421));

        let mut s = session(&[
            "",
            "250-mx\r\n250 PIPELINING\r\n",
            "250 ok\r\n421 4.3.2 bye\r\n",
        ]);
        s.hello("pbx").unwrap();
        let err = s.command_group(&transaction_group(&["b@y"])).unwrap_err();
        assert!(matches!(err, SessionError::Rejected(Phase::Rcpt, r) if r.code.0 == 421));
    }

    #[test]
    fn empty_group_sends_nothing() {
        let mut s = session(&["", "250-mx\r\n250 PIPELINING\r\n"]);
        s.hello("pbx").unwrap();
        assert!(s.command_group(&[]).unwrap().is_empty());
        assert_eq!(written(s), "EHLO pbx\r\n");
    }

    #[test]
    fn lockstep_follows_the_replies_to_mail_and_rcpt() {
        let ok = Reply::local(250, "ok");
        let no = Reply::local(550, "no");
        let mail = Command::Mail {
            from: "a@x".into(),
            parameters: Vec::new(),
        };
        let rcpt = Command::Rcpt("b@y".into());
        let mut state = Lockstep::default();
        assert!(!state.needless(&Command::Data), "a group without RCPT");
        state.answered(&mail, &ok);
        assert!(!state.needless(&rcpt));
        state.answered(&rcpt, &no);
        assert!(state.needless(&Command::Data));
        state.answered(&rcpt, &ok);
        assert!(!state.needless(&Command::Data));

        let mut state = Lockstep::default();
        state.answered(&mail, &no);
        assert!(state.needless(&rcpt));
        assert!(state.needless(&Command::Data));
        assert!(!state.needless(&Command::Rset));
    }

    #[test]
    fn pipelined_group_with_more_replies_than_commands_is_a_protocol_error() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 PIPELINING\r\n",
            "250 ok\r\n550 no\r\n503 no\r\n250 extra\r\n",
        ]);
        s.hello("pbx").unwrap();
        let err = s.command_group(&transaction_group(&["b@y"])).unwrap_err();
        assert!(
            matches!(err, SessionError::Protocol(Phase::Data, _)),
            "{err}"
        );
    }

    #[test]
    fn lockstep_group_with_a_stray_reply_is_a_protocol_error() {
        let mut s = session(&["", "250 ok\r\n250 extra\r\n"]);
        let group = &transaction_group(&["b@y"])[..1];
        let err = s.command_group(group).unwrap_err();
        assert!(
            matches!(err, SessionError::Protocol(Phase::Mail, _)),
            "{err}"
        );
    }

    #[test]
    fn helo_when_ehlo_is_refused() {
        let mut s = session(&["", "500 what\r\n", "250 hello\r\n"]);
        s.hello("pbx").unwrap();
        assert!(!s.caps.esmtp);
        assert_eq!(written(s), "EHLO pbx\r\nHELO pbx\r\n");
    }

    #[test]
    fn bytes_after_starttls_reply_abort_the_upgrade() {
        let mut s = session(&["", "220 go ahead\r\n250 injected\r\n"]);
        s.start_tls().unwrap();
        assert!(matches!(
            s.into_stream(),
            Err(SessionError::Protocol(Phase::StartTls, _))
        ));
    }

    #[test]
    fn server_closing_mid_reply_is_a_protocol_error() {
        let mut s = session(&["", "250-partial\r\n"]);
        assert!(matches!(
            s.hello("pbx"),
            Err(SessionError::Protocol(Phase::Ehlo, _))
        ));
    }

    /// The whole-reply deadline (deadline.rs) as a session meets it.
    mod whole_reply_deadline {
        use super::*;
        use std::thread::sleep;
        use std::time::Instant;

        /// A relay that answers one byte per read, 20 ms apart: each read is
        /// quick, the reply as a whole is slow.
        struct Trickle {
            reply: Vec<u8>,
            at: usize,
        }

        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let (Some(byte), Some(slot)) = (self.reply.get(self.at), buf.first_mut()) else {
                    return Ok(0);
                };
                sleep(Duration::from_millis(20));
                *slot = *byte;
                self.at += 1;
                Ok(1)
            }
        }

        impl Write for Trickle {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        impl Transport for Trickle {
            fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
                Ok(())
            }
        }

        fn greeting_within(connect: Duration) -> Result<(), SessionError> {
            // 30 bytes at 20 ms: about 0.6 s for the whole greeting.
            let stream = Trickle {
                reply: b"220 relay.test ESMTP ready ok\r\n".to_vec(),
                at: 0,
            };
            let timeouts = Timeouts {
                connect,
                command: connect,
                data: connect,
            };
            Session::new(stream, timeouts).greeting().map(|_| ())
        }

        #[test]
        fn a_trickled_reply_times_out_as_a_whole() {
            let started = Instant::now();
            let result = greeting_within(Duration::from_millis(200));
            assert!(
                matches!(result, Err(SessionError::Timeout(Phase::Greeting))),
                "{result:?}"
            );
            assert!(
                started.elapsed() < Duration::from_millis(400),
                "{:?}",
                started.elapsed()
            );
        }

        #[test]
        fn a_trickled_reply_within_the_timeout_is_read() {
            let result = greeting_within(Duration::from_secs(10));
            assert!(result.is_ok(), "{result:?}");
        }
    }
}
