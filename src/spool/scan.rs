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
