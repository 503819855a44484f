//! The stream type the SMTP session and TLS both speak over: a blocking
//! `Read + Write` whose operations can be bounded in time. Imports nothing
//! above it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A stream whose blocking operations can be bounded in time.
pub trait Transport: Read + Write {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()>;
}

impl Transport for TcpStream {
    /// Reads and writes alike. The socket refuses a zero timeout, so a
    /// deadline already reached becomes the smallest one it takes.
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        let t = Some(timeout.max(Duration::from_millis(1)));
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The kernel rounds socket timeouts up to its clock tick, so bounds,
    /// not exact values.
    #[test]
    fn tcp_timeout_applies_to_reads_and_writes_and_is_never_zero() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let tiny =
            |t: Option<Duration>| t.is_some_and(|t| !t.is_zero() && t < Duration::from_millis(50));
        tcp.set_timeout(Duration::ZERO).unwrap();
        assert!(
            tiny(tcp.read_timeout().unwrap()),
            "{:?}",
            tcp.read_timeout()
        );
        assert!(
            tiny(tcp.write_timeout().unwrap()),
            "{:?}",
            tcp.write_timeout()
        );
        let three = Duration::from_secs(3);
        tcp.set_timeout(three).unwrap();
        for t in [tcp.read_timeout().unwrap(), tcp.write_timeout().unwrap()] {
            assert!(
                t.is_some_and(|t| t >= three && t < three + Duration::from_millis(50)),
                "{t:?}"
            );
        }
    }
}
