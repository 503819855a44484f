//! One streamed read of a message file: its SHA-256 (checked before sending
//! and by fsck) and whether it has 8-bit content (BODY=8BITMIME).

use crate::base::hex::hex;
use std::fs::File;
use std::io;

/// What one streamed read of a message file learns.
pub struct MessageScan {
    pub sha256: String,
    pub eight_bit: bool,
}

/// SHA-256 of a message file (the check before sending) and whether it has
/// 8-bit content (BODY=8BITMIME), in one pass.
pub fn scan_message(file: &mut File) -> io::Result<MessageScan> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut eight_bit = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = io::Read::read(file, &mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(chunk) = buf.get(..n) {
            ctx.update(chunk);
            eight_bit = eight_bit || !chunk.is_ascii();
        }
    }
    Ok(MessageScan {
        sha256: hex(ctx.finish().as_ref()),
        eight_bit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_of(name: &str, content: &[u8]) -> MessageScan {
        let path = std::env::temp_dir().join(format!("pbxmail-scan-{name}-{}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        let scan = scan_message(&mut File::open(&path).unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        scan
    }

    #[test]
    fn the_digest_is_sha256_in_lowercase_hex() {
        let scan = scan_of("abc", b"abc");
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            scan.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!scan.eight_bit);
    }

    #[test]
    fn one_byte_past_ascii_makes_the_message_8bit() {
        assert!(scan_of("8bit", "Subject: caf\u{e9}\r\n\r\n".as_bytes()).eight_bit);
        // Beyond the first 64 KiB read, too.
        let mut long = vec![b'a'; 70 * 1024];
        long.push(0xff);
        assert!(scan_of("8bit-late", &long).eight_bit);
    }
}
