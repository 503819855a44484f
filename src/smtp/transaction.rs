//! One mail transaction on an open session: what the relay's limits decide
//! before anything is sent, the 7-bit conversion an 8-bit message may need,
//! MAIL/RCPT (and DATA) as one command group, then the body as DATA or BDAT
//! chunks, and the reply that decides each recipient. How commands and
//! replies travel is session.rs.

use super::command::{Command, MailParameter};
use super::data::Transparency;
use super::reply::Reply;
use super::session::Session;
use super::seven_bit::{self, Downgraded};
use super::{Phase, SessionError};
use crate::base::stream::Transport;
use std::io::{self, Read, Seek, SeekFrom};
use std::time::Duration;

/// The spooled message a transaction reads: from its start, and again if
/// it must be converted to 7 bits first (`Session::transaction`).
pub trait Body: Read + Seek {}

impl<T: Read + Seek> Body for T {}

/// What a transaction needs to know about the message it carries.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub mail_from: &'a str,
    pub recipients: &'a [String],
    /// Octets as stored (CRLF lines), for SIZE.
    pub size: u64,
    /// Any octet above 127: BODY=8BITMIME where offered.
    pub eight_bit: bool,
}

impl Outgoing<'_> {
    /// A non-ASCII address anywhere in the envelope (RFC 6531).
    fn needs_smtputf8(&self) -> bool {
        !self.mail_from.is_ascii() || self.recipients.iter().any(|r| !r.is_ascii())
    }
}

/// The result of one MAIL/RCPT/DATA transaction: for every recipient, the
/// reply that decided it (its RCPT reply if refused, else the final DATA reply).
#[derive(Debug)]
pub struct TransactionResult {
    pub per_recipient: Vec<Reply>,
}

impl TransactionResult {
    fn from_decided(decided: Vec<Option<Reply>>) -> Self {
        let missing = Reply::local(451, "4.3.0 no reply recorded for this recipient");
        TransactionResult {
            per_recipient: decided
                .into_iter()
                .map(|r| r.unwrap_or_else(|| missing.clone()))
                .collect(),
        }
    }
}

/// How a message goes to this relay: as it is, converted to 7 bits, or not at all.
enum Conversion {
    /// 7-bit already, or the relay takes 8 bits.
    AsIs,
    Downgrade(seven_bit::Plan),
    Refused(seven_bit::Unconvertible),
    /// UTF-8 headers, and the relay does not offer SMTPUTF8.
    NeedsSmtpUtf8,
}

impl Conversion {
    /// The local refusal every recipient gets when the message cannot go
    /// to this relay; the judge (outcome.rs) bounces it.
    fn refusal(&self) -> Option<Reply> {
        match self {
            Conversion::Refused(why) => Some(Reply::local(
                554,
                &format!(
                    "5.6.3 the relay does not offer 8BITMIME and the message cannot be \
                     converted to 7 bits: {why}; not sent"
                ),
            )),
            Conversion::NeedsSmtpUtf8 => Some(Reply::local(
                553,
                "5.6.7 a header has UTF-8 text (RFC 6532) and the relay does not offer \
                 SMTPUTF8; not sent",
            )),
            Conversion::AsIs | Conversion::Downgrade(_) => None,
        }
    }
}

/// Reads the next piece of the spooled body; None at its end.
fn read_body(body: &mut impl Read, chunk: &mut [u8]) -> Result<Option<usize>, SessionError> {
    loop {
        match body.read(chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The relay is mid-DATA; dropping the connection is the only safe
            // way out: it must not store a truncated message.
            Err(e) => {
                return Err(SessionError::Local(format!(
                    "cannot read the spooled message: {e}"
                )))
            }
        }
    }
}

impl<S: Transport> Session<S> {
    /// One transaction: MAIL, RCPT for each recipient and DATA as one
    /// command group, then the body (or MAIL and RCPTs, then BDAT chunks
    /// where CHUNKING is offered). Limits the relay declared are applied
    /// before anything is sent, as local replies.
    ///
    /// An 8-bit message goes with BODY=8BITMIME where the relay offers it;
    /// where not, it is converted to 7 bits (seven_bit.rs: two more reads of
    /// `body`, which is why it must seek) or, if that cannot be done safely,
    /// refused with 5.6.3 for every recipient before anything is sent. UTF-8
    /// headers go with SMTPUTF8 where offered, else as 8-bit data with
    /// BODY=8BITMIME, else are refused with 5.6.7.
    pub fn transaction(
        &mut self,
        message: &Outgoing<'_>,
        body: &mut (impl Read + Seek),
    ) -> Result<TransactionResult, SessionError> {
        let mut message = *message;
        let (conversion, utf8_headers) = self.prepare(&mut message, body)?;
        let message = &message;
        let mut decided = match conversion.refusal() {
            Some(reply) => vec![Some(reply); message.recipients.len()],
            None => self.decide_locally(message),
        };
        let mut converted;
        let mut body: &mut dyn Read = match &conversion {
            Conversion::Downgrade(plan) => {
                converted = Downgraded::new(&mut *body, plan);
                &mut converted
            }
            Conversion::AsIs | Conversion::Refused(_) | Conversion::NeedsSmtpUtf8 => body,
        };
        let sendable: Vec<usize> = decided
            .iter()
            .enumerate()
            .filter_map(|(i, reply)| reply.is_none().then_some(i))
            .collect();
        if sendable.is_empty() {
            return Ok(TransactionResult::from_decided(decided));
        }
        let chunking = self.caps.chunking;
        let mut group = vec![self.mail_command(message, utf8_headers)];
        let recipients = sendable.iter().filter_map(|&i| message.recipients.get(i));
        group.extend(recipients.map(|r| Command::Rcpt(r.clone())));
        if !chunking {
            group.push(Command::Data);
        }
        let mut replies = self.command_group(&group)?.into_iter();
        let Some(mail) = replies.next() else {
            return Err(SessionError::Protocol(
                Phase::Mail,
                "no reply to MAIL".into(),
            ));
        };
        let rcpt_replies: Vec<Reply> = replies.by_ref().take(sendable.len()).collect();
        let data_reply = replies.next();

        let mut accepted = Vec::new();
        for (position, &index) in sendable.iter().enumerate() {
            let reply = match rcpt_replies.get(position) {
                Some(reply) if mail.code.is_positive() => reply.clone(),
                _ => mail.clone(),
            };
            if reply.code.is_positive() {
                accepted.push(index);
            } else if let Some(slot) = decided.get_mut(index) {
                *slot = Some(reply);
            }
        }
        if accepted.is_empty() {
            self.abandon(data_reply.as_ref())?;
            return Ok(TransactionResult::from_decided(decided));
        }
        let final_reply = if chunking {
            let reply = self.send_bdat(&mut body)?;
            if !reply.code.is_positive() && !self.closed {
                self.reset()?;
            }
            reply
        } else {
            self.send_data(data_reply, &mut body)?
        };
        for index in accepted {
            if let Some(slot) = decided.get_mut(index) {
                *slot = Some(final_reply.clone());
            }
        }
        Ok(TransactionResult::from_decided(decided))
    }

    /// How an 8-bit message goes to this relay, and whether its headers
    /// are UTF-8 (so MAIL asks for SMTPUTF8). RFC 6531 §3.2: such a message
    /// goes only where SMTPUTF8 is offered; it is not downgraded (RFC 6857
    /// is lossy), as Postfix refuses it too. `body` is left where it was.
    fn prepare(
        &mut self,
        message: &mut Outgoing<'_>,
        body: &mut (impl Read + Seek),
    ) -> Result<(Conversion, bool), SessionError> {
        if !message.eight_bit {
            return Ok((Conversion::AsIs, false));
        }
        let utf8_headers = self.read_ahead(body, |b| seven_bit::utf8_headers(b))?;
        // Without SMTPUTF8 but with 8BITMIME, UTF-8 header text goes as the
        // 8-bit data it is, as relays have always taken it (a voicemail whose
        // Subject names "Jürgen" must not bounce where it used to arrive);
        // with neither, it can be carried no way and is refused.
        if utf8_headers && !self.caps.smtputf8 && !self.caps.eight_bit_mime {
            return Ok((Conversion::NeedsSmtpUtf8, true));
        }
        Ok((self.conversion(message, body)?, utf8_headers))
    }

    /// How the body goes to this relay (RFC 6152 §3: 8-bit octets only
    /// after BODY=8BITMIME). A downgraded message is 7-bit and has the size
    /// of its converted form, so `message` is updated to say so.
    fn conversion(
        &mut self,
        message: &mut Outgoing<'_>,
        body: &mut (impl Read + Seek),
    ) -> Result<Conversion, SessionError> {
        if !message.eight_bit || self.caps.eight_bit_mime {
            return Ok(Conversion::AsIs);
        }
        let plan = match self.read_ahead(body, |b| seven_bit::plan(b))? {
            Ok(plan) => plan,
            Err(why) => return Ok(Conversion::Refused(why)),
        };
        // SIZE counts the octets as sent, before dot-stuffing (RFC 1870 §3).
        let size = self.read_ahead(body, |b| {
            io::copy(&mut Downgraded::new(b, &plan), &mut io::sink())
        })?;
        self.note("C: (8-bit message converted to 7 bits: the relay does not offer 8BITMIME)");
        message.size = size;
        message.eight_bit = false;
        Ok(Conversion::Downgrade(plan))
    }

    /// Runs `look` over the body from where it is, then puts it back there.
    fn read_ahead<B: Read + Seek, T>(
        &mut self,
        body: &mut B,
        look: impl FnOnce(&mut B) -> io::Result<T>,
    ) -> Result<T, SessionError> {
        let unreadable =
            |e: io::Error| SessionError::Local(format!("cannot read the spooled message: {e}"));
        let start = body.stream_position().map_err(unreadable)?;
        let seen = look(body).map_err(unreadable)?;
        body.seek(SeekFrom::Start(start)).map_err(unreadable)?;
        Ok(seen)
    }

    /// What the relay's declared limits decide before anything is sent, as
    /// local replies: a message over its SIZE fails every recipient; without
    /// SMTPUTF8 a non-ASCII sender fails every recipient, a non-ASCII
    /// recipient only itself. `None` is a recipient still to send to.
    fn decide_locally(&self, message: &Outgoing<'_>) -> Vec<Option<Reply>> {
        let count = message.recipients.len();
        if let Some(limit) = self.caps.size.filter(|&limit| message.size > limit) {
            let reply = Reply::local(
                552,
                &format!(
                    "5.3.4 message of {} octets exceeds the relay's limit of {limit} (SIZE); not sent",
                    message.size
                ),
            );
            return vec![Some(reply); count];
        }
        if self.caps.smtputf8 {
            return vec![None; count];
        }
        let reply = Reply::local(
            553,
            "5.6.7 non-ASCII address and the relay does not offer SMTPUTF8; not sent",
        );
        if !message.mail_from.is_ascii() {
            return vec![Some(reply); count];
        }
        message
            .recipients
            .iter()
            .map(|r| (!r.is_ascii()).then(|| reply.clone()))
            .collect()
    }

    /// MAIL FROM with the parameters the relay offers and the message needs
    /// (SMTPUTF8 for a non-ASCII envelope or UTF-8 headers).
    fn mail_command(&self, message: &Outgoing<'_>, utf8_headers: bool) -> Command {
        let mut parameters = Vec::new();
        if self.caps.size_ext {
            parameters.push(MailParameter::Size(message.size));
        }
        if message.eight_bit && self.caps.eight_bit_mime {
            parameters.push(MailParameter::EightBitMime);
        }
        if (message.needs_smtputf8() || utf8_headers) && self.caps.smtputf8 {
            parameters.push(MailParameter::SmtpUtf8);
        }
        Command::Mail {
            from: message.mail_from.to_string(),
            parameters,
        }
    }

    /// Ends a transaction no recipient survived: a pipelined DATA the relay
    /// accepted anyway is ended empty (RFC 2920 §3.1), then RSET.
    fn abandon(&mut self, data_reply: Option<&Reply>) -> Result<(), SessionError> {
        if data_reply.is_some_and(|r| r.code.0 == 354) {
            self.set_timeout(Phase::DataEnd, self.timeouts.data)?;
            self.write_all(Phase::Body, b".\r\n")?;
            self.flush(Phase::Body)?;
            self.read_checked(Phase::DataEnd)?;
        }
        self.reset()
    }

    /// The body after DATA's reply; returns the reply that decides the
    /// accepted recipients (a refused DATA's own, after RSET).
    fn send_data(
        &mut self,
        data_reply: Option<Reply>,
        body: &mut impl Read,
    ) -> Result<Reply, SessionError> {
        match data_reply {
            Some(reply) if reply.code.0 == 354 => {
                // 354 must be the relay's last word before the body: anything
                // behind it would be read as the verdict on the message.
                self.ensure_in_step(Phase::Data)?;
                match self.send_body(body) {
                    Ok(()) => {
                        self.set_timeout(Phase::DataEnd, self.timeouts.data)?;
                        self.read_verdict(Phase::DataEnd)
                    }
                    Err(e) => self.reply_behind_write_error(e),
                }
            }
            // Only 354 invites the body (RFC 5321 §4.1.1.4). Any other
            // positive reply would have us call a message delivered that
            // was never sent.
            Some(reply) if reply.code.is_positive() => Err(SessionError::Protocol(
                Phase::Data,
                format!("DATA answered with {} instead of 354", reply.summary()),
            )),
            Some(reply) => {
                self.reset()?;
                Ok(reply)
            }
            None => Err(SessionError::Protocol(
                Phase::Data,
                "no reply to DATA".into(),
            )),
        }
    }

    fn send_body(&mut self, body: &mut impl Read) -> Result<(), SessionError> {
        self.set_timeout(Phase::Body, self.timeouts.data)?;
        let mut transparency = Transparency::for_data();
        let mut chunk = vec![0u8; 32 * 1024];
        let mut wire = Vec::with_capacity(chunk.len() + 1024);
        while let Some(n) = read_body(body, &mut chunk)? {
            wire.clear();
            transparency.feed(chunk.get(..n).unwrap_or_default(), &mut wire);
            self.write_all(Phase::Body, &wire)?;
        }
        wire.clear();
        transparency.finish(&mut wire);
        self.write_all(Phase::Body, &wire)?;
        self.note("C: (the message) and <CRLF>.<CRLF>");
        self.flush(Phase::Body)
    }

    /// RFC 3030: the body in counted chunks; each chunk's reply is checked.
    /// Returns the reply that decides the message (the first refusal, or LAST's).
    fn send_bdat(&mut self, body: &mut impl Read) -> Result<Reply, SessionError> {
        let mut transparency = Transparency::for_bdat();
        let mut chunk = vec![0u8; 32 * 1024];
        let mut wire = Vec::with_capacity(64 * 1024 + 1024);
        loop {
            let more = read_body(body, &mut chunk)?;
            match more {
                Some(n) => transparency.feed(chunk.get(..n).unwrap_or_default(), &mut wire),
                None => transparency.finish(&mut wire),
            }
            if more.is_some() && wire.len() < 64 * 1024 {
                continue;
            }
            let last = more.is_none();
            let bdat = Command::Bdat {
                size: wire.len(),
                last,
            };
            self.set_timeout(Phase::Body, self.timeouts.data)?;
            self.ensure_in_step(Phase::Body)?;
            self.note(&format!(
                "C: {} (and that many octets of the message)",
                bdat.redacted()
            ));
            self.write_all(Phase::Body, format!("{bdat}\r\n").as_bytes())?;
            self.write_all(Phase::Body, &wire)?;
            self.flush(Phase::Body)?;
            wire.clear();
            let reply = if last {
                self.read_verdict(bdat.phase())?
            } else {
                self.read_checked(bdat.phase())?
            };
            if last || !reply.code.is_positive() {
                return Ok(reply);
            }
        }
    }

    /// The reply that decides a message (to the final dot, or to BDAT LAST),
    /// which must be the relay's only answer: a second one behind it means
    /// we cannot tell which of them is the real verdict.
    fn read_verdict(&mut self, phase: Phase) -> Result<Reply, SessionError> {
        let reply = self.read_checked(phase)?;
        self.ensure_in_step(phase)?;
        Ok(reply)
    }

    /// A relay may refuse a message mid-body and close (RFC 5321 §4.2.5
    /// lets it reply early); our next write then fails. If its refusal is
    /// already here, that reply decides the recipients, and the session is
    /// over either way.
    fn reply_behind_write_error(&mut self, error: SessionError) -> Result<Reply, SessionError> {
        let SessionError::Io(Phase::Body, _) = &error else {
            return Err(error);
        };
        self.closed = true;
        if self
            .set_timeout(Phase::DataEnd, Duration::from_secs(1))
            .is_err()
        {
            return Err(error);
        }
        match self.read_reply(Phase::DataEnd) {
            Ok(reply) if !reply.code.is_positive() => Ok(reply),
            _ => Err(error),
        }
    }

    /// RSET after a failed transaction so the next one starts clean.
    fn reset(&mut self) -> Result<(), SessionError> {
        let reply = self.command(&Command::Rset)?;
        if !reply.code.is_positive() {
            return Err(SessionError::Rejected(Phase::Reset, reply));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::script::{outgoing, script, session, written, Script};
    use crate::smtp::session::Timeouts;
    use std::io::Write;

    fn codes(result: &TransactionResult) -> Vec<u16> {
        result.per_recipient.iter().map(|r| r.code.0).collect()
    }

    #[test]
    fn one_command_at_a_time_without_pipelining() {
        let mut s = session(&[
            "220 hi\r\n",
            "250 mx\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "550 no\r\n",
            "354 go\r\n",
            "250 queued\r\n",
        ]);
        s.greeting().unwrap();
        s.hello("pbx.example").unwrap();
        let rcpts = ["b@y".to_string(), "c@y".to_string()];
        let result = s
            .transaction(
                &outgoing("a@x", &rcpts),
                &mut io::Cursor::new(&b".dot\nend"[..]),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![250, 550]);
        assert_eq!(
            written(s),
            "EHLO pbx.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n..dot\r\nend\r\n.\r\n"
        );
    }

    #[test]
    fn pipelining_sends_mail_rcpts_and_data_in_one_write() {
        let mut s = session(&[
            "",
            "250-mx\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
            "250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n",
            "250 queued\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string(), "c@y".to_string()];
        let result = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"hi\n"[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![250, 550]);
        assert_eq!(
            written(s),
            "EHLO pbx\r\nMAIL FROM:<a@x> SIZE=100\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\nhi\r\n.\r\n"
        );
    }

    #[test]
    fn pipelined_data_accepted_without_recipients_gets_no_body() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 PIPELINING\r\n",
            "250 ok\r\n550 no\r\n354 go\r\n",
            "554 no valid recipients\r\n",
            "250 reset\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        let result = s
            .transaction(
                &outgoing("a@x", &rcpts),
                &mut io::Cursor::new(&b"SECRET BODY"[..]),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![550]);
        let out = written(s);
        assert!(!out.contains("SECRET"), "{out}");
        assert!(out.ends_with("DATA\r\n.\r\nRSET\r\n"), "{out}");
    }

    #[test]
    fn chunking_sends_bdat_without_dot_stuffing() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 CHUNKING\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "250 2.0.0 stored\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        let result = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b".x\n"[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![250]);
        assert!(written(s).ends_with("RCPT TO:<b@y>\r\nBDAT 4 LAST\r\n.x\r\n"));
    }

    #[test]
    fn message_over_the_relays_size_limit_is_not_sent() {
        let mut s = session(&["", "250-mx\r\n250 SIZE 50\r\n"]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        let result = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"body"[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![552]);
        assert_eq!(result.per_recipient[0].enhanced(), Some("5.3.4"));
        assert_eq!(written(s), "EHLO pbx\r\n");
    }

    #[test]
    fn non_ascii_recipient_without_smtputf8_fails_alone() {
        let mut s = session(&[
            "",
            "250 mx\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["jörg@y".to_string(), "b@y".to_string()];
        let result = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"x"[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![553, 250]);
        assert!(!written(s).contains("jörg"));
    }

    #[test]
    fn smtputf8_and_8bitmime_parameters_where_offered() {
        let mut s = session(&[
            "",
            "250-mx\r\n250-SMTPUTF8\r\n250 8BITMIME\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["jörg@y".to_string()];
        let mut message = outgoing("a@x", &rcpts);
        message.eight_bit = true;
        s.transaction(&message, &mut io::Cursor::new(&b"x"[..]))
            .unwrap();
        assert!(written(s).contains("MAIL FROM:<a@x> BODY=8BITMIME SMTPUTF8\r\n"));
    }

    /// Issue 14 (14): the voicemail an 8-bit test uses: a UTF-8 text part
    /// and a base64 WAV.
    const VOICEMAIL: &str = "From: pbx@x\r\nMIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=\"vm\"\r\n\r\n\
        --vm\r\nContent-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n\r\n\
        Neue Nachricht von Jürgen Müller\r\n.Ende\r\n\
        --vm\r\nContent-Type: audio/wav\r\nContent-Transfer-Encoding: base64\r\n\r\n\
        UklGRiQAAABXQVZF\r\n--vm--\r\n";

    fn eight_bit<'a>(rcpts: &'a [String], body: &str) -> Outgoing<'a> {
        Outgoing {
            size: body.len() as u64,
            eight_bit: true,
            ..outgoing("a@x", rcpts)
        }
    }

    /// The text of the DATA body between DATA's reply and the final dot, unstuffed.
    fn data_body(written: &str) -> String {
        let after = written.split_once("DATA\r\n").unwrap().1;
        let body = after.rsplit_once("\r\n.\r\n").unwrap().0;
        format!("{body}\r\n").replace("\r\n..", "\r\n.")
    }

    #[test]
    fn an_8bit_body_goes_raw_with_body_8bitmime_where_offered() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 8BITMIME\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        let result = s
            .transaction(
                &eight_bit(&rcpts, VOICEMAIL),
                &mut io::Cursor::new(VOICEMAIL.as_bytes()),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![250]);
        let out = written(s);
        assert!(out.contains("MAIL FROM:<a@x> BODY=8BITMIME\r\n"), "{out}");
        assert_eq!(data_body(&out), VOICEMAIL);
    }

    #[test]
    fn an_8bit_voicemail_to_a_relay_without_8bitmime_goes_quoted_printable() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 SIZE 1000000\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        let result = s
            .transaction(
                &eight_bit(&rcpts, VOICEMAIL),
                &mut io::Cursor::new(VOICEMAIL.as_bytes()),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![250]);
        let out = written(s);
        assert!(out.is_ascii(), "{out}");
        assert!(!out.contains("BODY="), "{out}");
        let sent = data_body(&out);
        // SIZE is that of what was sent, not of the 8-bit original.
        assert!(
            out.contains(&format!("MAIL FROM:<a@x> SIZE={}\r\n", sent.len())),
            "{out}"
        );
        let (head, rest) = sent.split_once("charset=utf-8\r\n").unwrap();
        assert_eq!(head, VOICEMAIL.split_once("charset=utf-8\r\n").unwrap().0);
        let (text, wav_part) = rest
            .strip_prefix("Content-Transfer-Encoding: quoted-printable\r\n\r\n")
            .unwrap()
            .split_once("--vm\r\n")
            .unwrap();
        assert_eq!(
            crate::smtp::seven_bit::tests::decode_qp(text.as_bytes()),
            "Neue Nachricht von Jürgen Müller\r\n.Ende\r\n".as_bytes()
        );
        assert_eq!(
            wav_part,
            "Content-Type: audio/wav\r\nContent-Transfer-Encoding: base64\r\n\r\n\
             UklGRiQAAABXQVZF\r\n--vm--\r\n"
        );
    }

    #[test]
    fn an_8bit_body_in_bdat_chunks_is_converted_too() {
        let mut s = chunking_session(&["250 2.0.0 stored\r\n"]);
        let rcpts = ["b@y".to_string()];
        let body = "Content-Type: text/plain\r\n\r\ncafé\r\n";
        let result = s
            .transaction(
                &eight_bit(&rcpts, body),
                &mut io::Cursor::new(body.as_bytes()),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![250]);
        let converted = "Content-Type: text/plain\r\nMIME-Version: 1.0\r\n\
                         Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n";
        assert!(written(s).ends_with(&format!("BDAT {} LAST\r\n{converted}", converted.len())),);
    }

    /// 8-bit octets in a header cannot be made 7-bit by a transfer
    /// encoding: refused for every recipient before MAIL, and the judge
    /// bounces it (never retried until it expires).
    #[test]
    fn an_unconvertible_8bit_message_to_a_relay_without_8bitmime_bounces_with_5_6_3() {
        let mut s = session(&["", "250-mx\r\n250 PIPELINING\r\n"]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string(), "c@y".to_string()];
        // Latin-1 "ü": 8-bit data, not UTF-8 (which would need SMTPUTF8).
        let body = b"Subject: Anruf von J\xfcrgen\r\n\r\nhello\r\n";
        let message = Outgoing {
            size: body.len() as u64,
            eight_bit: true,
            ..outgoing("a@x", &rcpts)
        };
        let result = s
            .transaction(&message, &mut io::Cursor::new(&body[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![554, 554]);
        for reply in &result.per_recipient {
            assert_eq!(reply.enhanced(), Some("5.6.3"));
            assert!(reply.summary().contains("8BITMIME"), "{reply}");
            let verdict = crate::outcome::of_reply(reply);
            assert_eq!(verdict.outcome.status(), "bounced");
            assert_eq!(
                verdict.advice,
                Some(crate::outcome::Advice::EightBitUnsupported)
            );
        }
        assert_eq!(written(s), "EHLO pbx\r\n");
    }

    /// RFC 6531 §3.2: UTF-8 headers (RFC 6532) go with SMTPUTF8 where
    /// offered; as 8-bit data where only 8BITMIME is; refused with 5.6.7
    /// (judged a bounce) where neither is.
    #[test]
    fn utf8_headers_go_with_smtputf8_or_8bitmime_and_bounce_5_6_7_with_neither() {
        let body = "Subject: Anruf von Jürgen\r\n\r\nhello\r\n";
        let rcpts = ["b@y".to_string()];
        let mut offers = session(&[
            "",
            "250-mx\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
        ]);
        offers.hello("pbx").unwrap();
        let result = offers
            .transaction(
                &eight_bit(&rcpts, body),
                &mut io::Cursor::new(body.as_bytes()),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![250]);
        let out = written(offers);
        assert!(
            out.contains("MAIL FROM:<a@x> BODY=8BITMIME SMTPUTF8\r\n"),
            "{out}"
        );
        assert_eq!(data_body(&out), body);

        let mut only_8bit = session(&[
            "",
            "250-mx\r\n250 8BITMIME\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
        ]);
        only_8bit.hello("pbx").unwrap();
        let result = only_8bit
            .transaction(
                &eight_bit(&rcpts, body),
                &mut io::Cursor::new(body.as_bytes()),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![250]);
        let out = written(only_8bit);
        assert!(out.contains("MAIL FROM:<a@x> BODY=8BITMIME\r\n"), "{out}");
        assert_eq!(data_body(&out), body);

        let mut lacks = session(&["", "250 mx\r\n"]);
        lacks.hello("pbx").unwrap();
        let result = lacks
            .transaction(
                &eight_bit(&rcpts, body),
                &mut io::Cursor::new(body.as_bytes()),
            )
            .unwrap();
        assert_eq!(codes(&result), vec![553]);
        let reply = &result.per_recipient[0];
        assert_eq!(reply.enhanced(), Some("5.6.7"));
        let verdict = crate::outcome::of_reply(reply);
        assert_eq!(verdict.outcome.status(), "bounced");
        assert_eq!(
            verdict.advice,
            Some(crate::outcome::Advice::SmtpUtf8Unsupported)
        );
        assert_eq!(written(lacks), "EHLO pbx\r\n");
    }

    /// Issue 14 (8): header bytes that are not UTF-8 (Latin-1) are 8-bit
    /// data: with 8BITMIME they go exactly as they are, no SMTPUTF8 asked.
    #[test]
    fn latin1_headers_go_as_they_are_with_8bitmime() {
        let body = b"Subject: Anruf von J\xfcrgen\r\n\r\nhello\r\n";
        let rcpts = ["b@y".to_string()];
        let mut s = session(&[
            "",
            "250-mx\r\n250 8BITMIME\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
        ]);
        s.hello("pbx").unwrap();
        let message = Outgoing {
            size: body.len() as u64,
            eight_bit: true,
            ..outgoing("a@x", &rcpts)
        };
        let result = s
            .transaction(&message, &mut io::Cursor::new(&body[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![250]);
        let mut expected =
            b"EHLO pbx\r\nMAIL FROM:<a@x> BODY=8BITMIME\r\nRCPT TO:<b@y>\r\nDATA\r\n".to_vec();
        expected.extend_from_slice(body);
        expected.extend_from_slice(b".\r\n");
        assert_eq!(script(&s).written, expected);
    }

    /// A writer that breaks after the first DATA body write, with the
    /// relay's early refusal already waiting to be read.
    struct RefusesMidBody {
        inner: Script,
        body_writes: usize,
    }

    impl Read for RefusesMidBody {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl Write for RefusesMidBody {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.inner.written.ends_with(b"DATA\r\n") || self.body_writes > 0 {
                self.body_writes += 1;
                let refusal = b"550 5.7.1 content refused\r\n";
                let mut rest =
                    self.inner.input.get_ref()[self.inner.input.position() as usize..].to_vec();
                rest.extend_from_slice(refusal);
                self.inner.input = io::Cursor::new(rest);
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe"));
            }
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    impl Transport for RefusesMidBody {
        fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn early_refusal_mid_body_decides_and_closes_the_session() {
        let scripted = session(&["", "250 ok\r\n", "250 ok\r\n", "354 go\r\n"]);
        let t = Duration::from_secs(1);
        let stream = RefusesMidBody {
            inner: scripted.into_stream().unwrap(),
            body_writes: 0,
        };
        let mut s = Session::new(
            stream,
            Timeouts {
                connect: t,
                command: t,
                data: t,
            },
        );
        let rcpts = ["b@y".to_string()];
        let result = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"body"[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![550]);
        let next = s.transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"body"[..]));
        assert!(matches!(next, Err(SessionError::Io(Phase::Mail, _))));
    }

    #[test]
    fn positive_reply_to_data_other_than_354_is_not_delivery() {
        let mut s = session(&["", "250 ok\r\n", "250 ok\r\n", "250 2.0.0 Ok\r\n"]);
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"body"[..]))
            .unwrap_err();
        assert!(matches!(err, SessionError::Protocol(Phase::Data, _)));
    }

    #[test]
    fn reply_421_ends_the_session() {
        let mut s = session(&["", "250 ok\r\n", "421 4.3.2 shutting down\r\n"]);
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"x"[..]))
            .unwrap_err();
        assert!(matches!(err, SessionError::Rejected(Phase::Rcpt, r) if r.code.0 == 421));
    }

    #[test]
    fn unasked_reply_is_out_of_step() {
        let mut s = session(&["", "250 mx\r\n250 surprise\r\n"]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"x"[..]))
            .unwrap_err();
        assert!(matches!(err, SessionError::Protocol(Phase::Mail, _)));
    }

    /// Issue 14 (3): a relay that sends 354 and then an unrequested 250 had
    /// that 250 taken as the verdict on the message and its real 554 as the
    /// answer to QUIT. The body must not go out, and the session must end as
    /// a protocol error, so the message is deferred, never marked sent.
    #[test]
    fn stray_reply_after_354_defers_and_sends_no_body() {
        let mut s = session(&[
            "",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n250 2.0.0 stray\r\n",
            "554 5.7.1 refused\r\n",
        ]);
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(
                &outgoing("a@x", &rcpts),
                &mut io::Cursor::new(&b"SECRET BODY"[..]),
            )
            .unwrap_err();
        assert!(
            matches!(err, SessionError::Protocol(Phase::Data, _)),
            "{err}"
        );
        assert_eq!(written(s), "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n");
    }

    #[test]
    fn stray_reply_after_a_pipelined_354_defers_and_sends_no_body() {
        let mut s = session(&[
            "",
            "250-mx\r\n250 PIPELINING\r\n",
            "250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 stray\r\n",
            "554 5.7.1 refused\r\n",
        ]);
        s.hello("pbx").unwrap();
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(
                &outgoing("a@x", &rcpts),
                &mut io::Cursor::new(&b"SECRET BODY"[..]),
            )
            .unwrap_err();
        assert!(
            matches!(err, SessionError::Protocol(Phase::Data, _)),
            "{err}"
        );
        assert!(!written(s).contains("SECRET"));
    }

    /// Two replies to one final dot: which is the verdict is unknowable, so
    /// the message is deferred rather than called sent on the first.
    #[test]
    fn two_replies_to_the_final_dot_defer_the_message() {
        let mut s = session(&[
            "",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 2.0.0 queued\r\n554 5.7.1 refused\r\n",
        ]);
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"body"[..]))
            .unwrap_err();
        assert!(
            matches!(err, SessionError::Protocol(Phase::DataEnd, _)),
            "{err}"
        );
    }

    fn chunking_session(after_rcpt: &[&str]) -> Session<Script> {
        let mut replies = vec!["", "250-mx\r\n250 CHUNKING\r\n", "250 ok\r\n", "250 ok\r\n"];
        replies.extend_from_slice(after_rcpt);
        let mut s = session(&replies);
        s.hello("pbx").unwrap();
        s
    }

    #[test]
    fn stray_reply_after_a_bdat_chunk_stops_the_next_chunk() {
        let mut s = chunking_session(&["250 2.0.0 chunk\r\n250 stray\r\n", "250 stored\r\n"]);
        let body = "a line of the message\n".repeat(5_000);
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(
                &outgoing("a@x", &rcpts),
                &mut io::Cursor::new(body.as_bytes()),
            )
            .unwrap_err();
        assert!(
            matches!(err, SessionError::Protocol(Phase::Body, _)),
            "{err}"
        );
        assert_eq!(written(s).matches("BDAT ").count(), 1);
    }

    #[test]
    fn two_replies_to_bdat_last_defer_the_message() {
        let mut s = chunking_session(&["250 2.0.0 stored\r\n554 5.7.1 refused\r\n"]);
        let rcpts = ["b@y".to_string()];
        let err = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"body"[..]))
            .unwrap_err();
        assert!(
            matches!(err, SessionError::Protocol(Phase::DataEnd, _)),
            "{err}"
        );
    }

    /// A hostile relay, as a property: mutated versions of a real
    /// conversation never panic the session, and whatever they make it
    /// report, a recipient is only ever "sent" after its body and end of
    /// data really went out, and the verdict was the relay's only answer.
    #[test]
    fn mutated_relay_conversations_never_panic_nor_call_an_unsent_message_sent() {
        use crate::base::mutate::{cases, mutate, seed, Rng};
        let conversations: [&[&str]; 3] = [
            &[
                "220 mx ESMTP\r\n",
                "250-mx\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n",
                "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n354 go\r\n",
                "250 2.0.0 queued\r\n",
            ],
            &[
                "220 mx ESMTP\r\n",
                "250-mx\r\n250 SIZE\r\n",
                "250 2.1.0 ok\r\n",
                "250 2.1.5 ok\r\n",
                "250 2.1.5 ok\r\n",
                "354 End data with <CR><LF>.<CR><LF>\r\n",
                "250 2.0.0 queued\r\n",
            ],
            &[
                "220 mx ESMTP\r\n",
                "250-mx\r\n250 CHUNKING\r\n",
                "250 2.1.0 ok\r\n",
                "250 2.1.5 ok\r\n",
                "250 2.1.5 ok\r\n",
                "250 2.0.0 stored\r\n",
            ],
        ];
        let rcpts = ["b@y".to_string(), "c@y".to_string()];
        let mut rng = Rng::seeded(seed(0x5eed_0003));
        for _ in 0..cases(3_000) {
            let conversation = *rng.pick(&conversations);
            let mut replies: Vec<Vec<u8>> =
                conversation.iter().map(|r| r.as_bytes().to_vec()).collect();
            let at = rng.below(replies.len());
            replies[at] = mutate(&replies[at], &mut rng);
            let texts: Vec<String> = replies
                .iter()
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .collect();
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let mut s = session(&texts);
            let outcome = s.greeting().and_then(|_| s.hello("pbx")).and_then(|_| {
                s.transaction(
                    &outgoing("a@x", &rcpts),
                    &mut io::Cursor::new(&b"the body\n"[..]),
                )
            });
            let Ok(result) = outcome else { continue };
            if result.per_recipient.iter().any(|r| r.code.is_positive()) {
                let out = written(s);
                assert!(
                    out.ends_with("the body\r\n.\r\n") || out.ends_with("LAST\r\nthe body\r\n"),
                    "sent without the body: {out:?} {texts:?}"
                );
            }
        }
    }

    #[test]
    fn no_data_when_every_recipient_is_refused() {
        let mut s = session(&["", "250 ok\r\n", "450 busy\r\n", "250 reset\r\n"]);
        let rcpts = ["b@y".to_string()];
        let result = s
            .transaction(&outgoing("a@x", &rcpts), &mut io::Cursor::new(&b"body"[..]))
            .unwrap();
        assert_eq!(codes(&result), vec![450]);
        assert_eq!(written(s), "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRSET\r\n");
    }
}
