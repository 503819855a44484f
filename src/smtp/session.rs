//! One SMTP conversation over any `Read + Write` stream: commands out, replies
//! in, one at a time, each phase under its own timeout. A negative reply is
//! data (`Reply`); only a broken conversation is an error.

use super::data::Transparency;
use super::reply::{read_reply, Reply};
use super::{Capabilities, Phase, SessionError};
use crate::config::Secret;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use std::io::{self, BufReader, Read, Write};
use std::time::Duration;

/// A stream whose blocking operations can be bounded in time.
pub trait Transport: Read + Write {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()>;
}

impl Transport for std::net::TcpStream {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        let t = Some(timeout.max(Duration::from_millis(1)));
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// Per-phase limits (RFC 5321 §4.5.3.2 gives 5 minutes for commands, 10 for
/// the end of data); `connect` covers the TCP connect and the greeting.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    Plain,
    Login,
}

/// The result of one MAIL/RCPT/DATA transaction: for every recipient, the
/// reply that decided it (its RCPT reply if refused, else the final DATA reply).
#[derive(Debug)]
pub struct TransactionResult {
    pub per_recipient: Vec<Reply>,
}

pub struct Session<S: Transport> {
    io: BufReader<S>,
    timeouts: Timeouts,
    pub caps: Capabilities,
}

impl<S: Transport> Session<S> {
    pub fn new(stream: S, timeouts: Timeouts) -> Self {
        Session {
            io: BufReader::with_capacity(8 * 1024, stream),
            timeouts,
            caps: Capabilities::default(),
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
        Ok(self.io.into_inner())
    }

    fn set_timeout(&mut self, phase: Phase, timeout: Duration) -> Result<(), SessionError> {
        self.io
            .get_mut()
            .set_timeout(timeout)
            .map_err(|e| SessionError::Io(phase, e))
    }

    pub fn read_reply(&mut self, phase: Phase) -> Result<Reply, SessionError> {
        read_reply(&mut self.io).map_err(|e| SessionError::from_reply_error(phase, e))
    }

    fn send_line(&mut self, phase: Phase, line: &str) -> Result<(), SessionError> {
        let stream = self.io.get_mut();
        let mut wire = Vec::with_capacity(line.len() + 2);
        wire.extend_from_slice(line.as_bytes());
        wire.extend_from_slice(b"\r\n");
        stream
            .write_all(&wire)
            .and_then(|()| stream.flush())
            .map_err(|e| SessionError::from_io(phase, e))
    }

    /// Sends one command line and reads its reply, under the command timeout.
    pub fn command(&mut self, phase: Phase, line: &str) -> Result<Reply, SessionError> {
        self.set_timeout(phase, self.timeouts.command)?;
        self.send_line(phase, line)?;
        self.read_reply(phase)
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
        let reply = self.command(Phase::Ehlo, &format!("EHLO {hostname}"))?;
        if reply.code.is_positive() {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if !reply.code.is_permanent() {
            return Err(SessionError::Rejected(Phase::Ehlo, reply));
        }
        let reply = self.command(Phase::Ehlo, &format!("HELO {hostname}"))?;
        if !reply.code.is_positive() {
            return Err(SessionError::Rejected(Phase::Ehlo, reply));
        }
        Ok(())
    }

    /// Asks for STARTTLS; the caller upgrades with `into_stream` on success.
    pub fn start_tls(&mut self) -> Result<(), SessionError> {
        let reply = self.command(Phase::StartTls, "STARTTLS")?;
        if reply.code.0 != 220 {
            return Err(SessionError::Rejected(Phase::StartTls, reply));
        }
        Ok(())
    }

    /// SASL PLAIN or LOGIN (RFC 4954). A refusal is `Rejected(Auth, reply)`.
    pub fn authenticate(
        &mut self,
        mechanism: AuthMechanism,
        username: &str,
        password: &Secret,
    ) -> Result<(), SessionError> {
        let reply = match mechanism {
            AuthMechanism::Plain => {
                let token = BASE64.encode(format!("\0{username}\0{}", password.expose()));
                self.command(Phase::Auth, &format!("AUTH PLAIN {token}"))?
            }
            AuthMechanism::Login => {
                let reply = self.command(Phase::Auth, "AUTH LOGIN")?;
                if reply.code.0 != 334 {
                    return Err(SessionError::Rejected(Phase::Auth, reply));
                }
                let reply = self.command(Phase::Auth, &BASE64.encode(username))?;
                if reply.code.0 != 334 {
                    return Err(SessionError::Rejected(Phase::Auth, reply));
                }
                self.command(Phase::Auth, &BASE64.encode(password.expose()))?
            }
        };
        if reply.code.0 != 235 {
            return Err(SessionError::Rejected(Phase::Auth, reply));
        }
        Ok(())
    }

    /// MAIL, RCPT for each recipient, DATA and the body from `body`.
    pub fn transaction(
        &mut self,
        mail_from: &str,
        recipients: &[String],
        body: &mut impl Read,
    ) -> Result<TransactionResult, SessionError> {
        let mail = self.command(Phase::Mail, &format!("MAIL FROM:<{mail_from}>"))?;
        if !mail.code.is_positive() {
            self.reset()?;
            return Ok(TransactionResult {
                per_recipient: vec![mail; recipients.len()],
            });
        }
        let mut per_recipient: Vec<Option<Reply>> = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            let reply = self.command(Phase::Rcpt, &format!("RCPT TO:<{rcpt}>"))?;
            per_recipient.push((!reply.code.is_positive()).then_some(reply));
        }
        if per_recipient.iter().all(Option::is_some) {
            // Nobody accepted: no DATA, so no empty message reaches anyone.
            self.reset()?;
            return Ok(TransactionResult {
                per_recipient: per_recipient.into_iter().flatten().collect(),
            });
        }
        let data = self.command(Phase::Data, "DATA")?;
        let final_reply = if data.code.0 == 354 {
            self.send_body(body)?;
            self.set_timeout(Phase::DataEnd, self.timeouts.data)?;
            self.read_reply(Phase::DataEnd)?
        } else {
            self.reset()?;
            data
        };
        Ok(TransactionResult {
            per_recipient: per_recipient
                .into_iter()
                .map(|r| r.unwrap_or_else(|| final_reply.clone()))
                .collect(),
        })
    }

    fn send_body(&mut self, body: &mut impl Read) -> Result<(), SessionError> {
        self.set_timeout(Phase::Body, self.timeouts.data)?;
        let mut transparency = Transparency::for_data();
        let mut chunk = vec![0u8; 32 * 1024];
        let mut wire = Vec::with_capacity(chunk.len() + 1024);
        loop {
            let n = match body.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The server is mid-DATA; dropping the connection is the only
                // safe way out: it must not store a truncated message.
                Err(e) => {
                    return Err(SessionError::Local(format!(
                        "cannot read the spooled message: {e}"
                    )))
                }
            };
            wire.clear();
            transparency.feed(chunk.get(..n).unwrap_or_default(), &mut wire);
            self.write_all(Phase::Body, &wire)?;
        }
        wire.clear();
        transparency.finish(&mut wire);
        self.write_all(Phase::Body, &wire)?;
        self.io
            .get_mut()
            .flush()
            .map_err(|e| SessionError::from_io(Phase::Body, e))
    }

    fn write_all(&mut self, phase: Phase, bytes: &[u8]) -> Result<(), SessionError> {
        self.io
            .get_mut()
            .write_all(bytes)
            .map_err(|e| SessionError::from_io(phase, e))
    }

    /// RSET after a failed transaction so the next one starts clean.
    pub fn reset(&mut self) -> Result<(), SessionError> {
        let reply = self.command(Phase::Reset, "RSET")?;
        if !reply.code.is_positive() {
            return Err(SessionError::Rejected(Phase::Reset, reply));
        }
        Ok(())
    }

    /// Polite close; the reply does not matter any more.
    pub fn quit(mut self) {
        let _ = self.command(Phase::Quit, "QUIT");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: fixed input bytes, records what the client wrote.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Script {
        fn new(server: &str) -> Script {
            Script {
                input: io::Cursor::new(server.as_bytes().to_vec()),
                written: Vec::new(),
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Script {
        fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
            Ok(())
        }
    }

    fn session(server: &str) -> Session<Script> {
        let t = Duration::from_secs(1);
        Session::new(
            Script::new(server),
            Timeouts {
                connect: t,
                command: t,
                data: t,
            },
        )
    }

    fn written(s: Session<Script>) -> String {
        String::from_utf8(s.io.into_inner().written).unwrap()
    }

    #[test]
    fn full_transaction_writes_exact_bytes() {
        let mut s = session("220 hi\r\n250-mx\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n250 queued\r\n");
        s.greeting().unwrap();
        s.hello("pbx.example").unwrap();
        assert!(s.caps.pipelining);
        let result = s
            .transaction("a@x", &["b@y".into(), "c@y".into()], &mut &b".dot\nend"[..])
            .unwrap();
        let codes: Vec<u16> = result.per_recipient.iter().map(|r| r.code.0).collect();
        assert_eq!(codes, vec![250, 550]);
        assert_eq!(
            written(s),
            "EHLO pbx.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n..dot\r\nend\r\n.\r\n"
        );
    }

    #[test]
    fn no_data_when_every_recipient_is_refused() {
        let mut s = session("250 ok\r\n450 busy\r\n250 reset\r\n");
        let result = s
            .transaction("a@x", &["b@y".into()], &mut &b"body"[..])
            .unwrap();
        assert_eq!(result.per_recipient[0].code.0, 450);
        assert_eq!(written(s), "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRSET\r\n");
    }

    #[test]
    fn helo_when_ehlo_is_refused() {
        let mut s = session("500 what\r\n250 hello\r\n");
        s.hello("pbx").unwrap();
        assert!(!s.caps.esmtp);
        assert_eq!(written(s), "EHLO pbx\r\nHELO pbx\r\n");
    }

    #[test]
    fn bytes_after_starttls_reply_abort_the_upgrade() {
        let mut s = session("220 go ahead\r\n250 injected\r\n");
        s.start_tls().unwrap();
        assert!(matches!(
            s.into_stream(),
            Err(SessionError::Protocol(Phase::StartTls, _))
        ));
    }

    #[test]
    fn auth_login_sends_base64_steps() {
        let mut s = session("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 ok\r\n");
        s.authenticate(AuthMechanism::Login, "u", &Secret::new("p".into()))
            .unwrap();
        assert_eq!(written(s), "AUTH LOGIN\r\ndQ==\r\ncA==\r\n");
    }

    #[test]
    fn rejected_auth_is_an_error_with_the_reply() {
        let mut s = session("535 5.7.8 bad\r\n");
        let err = s
            .authenticate(AuthMechanism::Plain, "u", &Secret::new("p".into()))
            .unwrap_err();
        assert!(matches!(err, SessionError::Rejected(Phase::Auth, r) if r.code.0 == 535));
    }

    #[test]
    fn server_closing_mid_reply_is_a_protocol_error() {
        let mut s = session("250-partial\r\n");
        assert!(matches!(
            s.hello("pbx"),
            Err(SessionError::Protocol(Phase::Ehlo, _))
        ));
    }
}
