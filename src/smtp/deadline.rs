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

    /// Bounds the reads from now on to `limit` in total, until `clear`. A
    /// limit past what the clock can hold (a configured timeout of years) is
    /// no whole-reply bound at all: `Instant + Duration` would panic there.
    pub fn start(&mut self, limit: Duration) {
        self.deadline = Instant::now().checked_add(limit);
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

    /// A stream that has a reply ready and records the timeouts it is given.
    struct Ready {
        reply: io::Cursor<Vec<u8>>,
        timeouts: Vec<Duration>,
    }

    impl Read for Ready {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reply.read(buf)
        }
    }

    impl Write for Ready {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Ready {
        fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
            self.timeouts.push(timeout);
            Ok(())
        }
    }

    fn ready() -> Deadlined<Ready> {
        Deadlined::new(Ready {
            reply: io::Cursor::new(b"250 ok\r\n".to_vec()),
            timeouts: Vec::new(),
        })
    }

    #[test]
    fn a_read_past_the_deadline_times_out_without_reading() {
        let mut stream = ready();
        stream.start(Duration::ZERO);
        let mut buf = [0u8; 16];
        let error = stream.read(&mut buf).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(stream.get_ref().reply.position(), 0);
    }

    #[test]
    fn each_read_under_a_deadline_gets_only_the_time_left() {
        let mut stream = ready();
        let limit = Duration::from_secs(10);
        stream.start(limit);
        let mut buf = [0u8; 3];
        assert_eq!(stream.read(&mut buf).unwrap(), 3);
        assert_eq!(stream.read(&mut buf).unwrap(), 3);
        let given = &stream.get_ref().timeouts;
        assert_eq!(given.len(), 2, "{given:?}");
        assert!(
            given.iter().all(|&t| t <= limit && !t.is_zero()),
            "{given:?}"
        );
        assert!(given.windows(2).all(|w| w[1] <= w[0]), "{given:?}");
    }

    #[test]
    fn a_cleared_deadline_leaves_the_per_call_timeout_alone() {
        let mut stream = ready();
        stream.start(Duration::ZERO);
        stream.clear();
        let mut buf = [0u8; 16];
        assert_eq!(stream.read(&mut buf).unwrap(), 8);
        assert!(stream.get_ref().timeouts.is_empty());
    }

    #[test]
    fn a_limit_past_the_clock_does_not_panic_and_bounds_nothing() {
        let mut stream = ready();
        stream.start(Duration::MAX);
        let mut buf = [0u8; 16];
        assert_eq!(stream.read(&mut buf).unwrap(), 8);
        assert!(stream.get_ref().timeouts.is_empty());
    }
}
