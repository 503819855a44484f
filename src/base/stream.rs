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

    #[test]
    fn tcp_timeout_applies_to_reads_and_writes_and_is_never_zero() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        tcp.set_timeout(Duration::ZERO).unwrap();
        assert_eq!(tcp.read_timeout().unwrap(), Some(Duration::from_millis(1)));
        assert_eq!(tcp.write_timeout().unwrap(), Some(Duration::from_millis(1)));
        tcp.set_timeout(Duration::from_secs(3)).unwrap();
        assert_eq!(tcp.read_timeout().unwrap(), Some(Duration::from_secs(3)));
    }
}
