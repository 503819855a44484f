//! A limit on the whole of one reply over a stream whose timeouts are per
//! call. A socket timeout restarts with every byte, so a relay trickling one
//! byte at a time could hold a session for hours under a 5-minute timeout;
//! here the phase's timeout bounds the reply as a whole. Writes keep their
//! per-call timeout (RFC 5321 §4.5.3.2 times each data block, not the body).

use crate::base::stream::Transport;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

pub struct Deadlined<S> {
    inner: S,
    /// While set, every read must finish by then.
    deadline: Option<Instant>,
}

impl<S: Transport> Deadlined<S> {
    pub fn new(inner: S) -> Self {
        Deadlined {
            inner,
            deadline: None,
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// For tests that look at what a scripted stream saw.
    #[cfg(test)]
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    #[cfg(test)]
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The per-call timeout for reads and writes outside a deadline.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.inner.set_timeout(timeout)
    }

    /// Bounds the reads from now on to `limit` in total, until `clear`.
    pub fn start(&mut self, limit: Duration) {
        self.deadline = Some(Instant::now() + limit);
    }

    pub fn clear(&mut self) {
        self.deadline = None;
    }
}

impl<S: Transport> Read for Deadlined<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the reply did not complete within the timeout",
                ));
            }
            self.inner.set_timeout(left)?;
        }
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Deadlined<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::session::{Session, Timeouts};
    use crate::smtp::{Phase, SessionError};
    use std::thread::sleep;

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
