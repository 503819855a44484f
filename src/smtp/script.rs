//! Test support: a scripted relay for sessions, so tests feed scripted
//! bytes and assert the exact bytes written; and a plain message to send.

use super::session::{Session, Timeouts};
use super::transaction::Outgoing;
use crate::base::stream::Transport;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

/// A scripted server: the first reply is there at once, each further one
/// only after the client flushes (as a real server answers what it got).
/// Records everything the client wrote.
pub struct Script {
    pub input: io::Cursor<Vec<u8>>,
    replies: VecDeque<Vec<u8>>,
    pub written: Vec<u8>,
    /// How many writes the client made: a pipelined group is one.
    pub writes: usize,
    /// Every timeout the client set, in order.
    pub timeouts: Vec<Duration>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        self.writes += 1;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if let Some(next) = self.replies.pop_front() {
            let mut rest = self.input.get_ref()[self.input.position() as usize..].to_vec();
            rest.extend_from_slice(&next);
            self.input = io::Cursor::new(rest);
        }
        Ok(())
    }
}

impl Transport for Script {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.timeouts.push(timeout);
        Ok(())
    }
}

/// `replies[0]` is sent unasked (a greeting, or ""), the rest one per flush.
pub fn session(replies: &[&str]) -> Session<Script> {
    let t = Duration::from_secs(1);
    session_with(
        replies,
        Timeouts {
            connect: t,
            command: t,
            data: t,
        },
    )
}

pub fn session_with(replies: &[&str], timeouts: Timeouts) -> Session<Script> {
    let mut replies: VecDeque<Vec<u8>> = replies.iter().map(|r| r.as_bytes().to_vec()).collect();
    let first = replies.pop_front().unwrap_or_default();
    Session::new(
        Script {
            input: io::Cursor::new(first),
            replies,
            written: Vec::new(),
            writes: 0,
            timeouts: Vec::new(),
        },
        timeouts,
    )
}

/// Everything the client wrote, as text.
pub fn written(s: Session<Script>) -> String {
    String::from_utf8(s.stream().written.clone()).unwrap()
}

pub fn script(s: &Session<Script>) -> &Script {
    s.stream()
}

/// A 7-bit message of 100 octets from `from` to `rcpts`.
pub fn outgoing<'a>(from: &'a str, rcpts: &'a [String]) -> Outgoing<'a> {
    Outgoing {
        mail_from: from,
        recipients: rcpts,
        size: 100,
        eight_bit: false,
    }
}
