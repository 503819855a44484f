//! Fuzzes the SMTP reply parser: any bytes a relay may send, read reply after
//! reply until it refuses; every accepted reply must stay within the parser's
//! bounds, and nothing may panic (arithmetic overflow included: cargo-fuzz
//! builds with debug assertions).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The parser's own file, as the daemon compiles it: the main crate is a
// binary only, so there is no library to depend on.
#[path = "../../src/smtp/reply.rs"]
#[allow(dead_code)]
mod reply;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    while let Ok(reply) = reply::read_reply(&mut input) {
        assert!((200..=559).contains(&reply.code.0), "{reply:?}");
        assert!(!reply.lines.is_empty() && reply.lines.len() <= 100);
        assert!(reply.lines.iter().all(|l| l.len() <= 3 * 2048));
        if let Some(code) = reply.enhanced() {
            assert_eq!(
                code.bytes().next().and_then(|c| c.checked_sub(b'0')).map(u16::from),
                Some(reply.code.0 / 100)
            );
        }
        let _ = reply.summary();
    }
});
