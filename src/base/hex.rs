//! Lowercase hex, how digests are written in envelopes, journals and logs.

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_become_two_lowercase_digits_each() {
        assert_eq!(super::hex(&[0x00, 0xab, 0x0f, 0xff]), "00ab0fff");
        assert_eq!(super::hex(&[]), "");
    }
}
