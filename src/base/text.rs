//! Text that came from a peer (a relay's reply, a file name on disk) made
//! safe for a terminal or a log line: every control character is shown as
//! an escape, so a hostile relay cannot move the cursor, recolour, or
//! overwrite a line (a bare CR) to draw a fake success.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with each control character escaped: `\r`, `\n`, `\t`, else
/// `\x1b` (C0, DEL) or `\u{9b}` (C1). Borrowed when nothing needs escaping.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `printable` line by line: for messages whose own lines are meant (a list
/// of config problems), while a CR or ESC inside a line is still escaped.
pub fn printable_lines(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n') {
        return Cow::Borrowed(text);
    }
    let lines: Vec<Cow<'_, str>> = text.split('\n').map(printable).collect();
    Cow::Owned(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_borrowed() {
        assert!(matches!(printable("550 5.7.1 no"), Cow::Borrowed(_)));
        assert_eq!(
            printable("250 ok\r\x1b[2K\x1b[32mstatus=sent\x7f\u{9b}\t\n"),
            "250 ok\\r\\x1b[2K\\x1b[32mstatus=sent\\x7f\\u{9b}\\t\\n"
        );
        assert_eq!(printable("caf\u{e9} \\ ok"), "caf\u{e9} \\ ok");
    }

    #[test]
    fn lines_keep_their_breaks_but_not_their_escapes() {
        assert!(matches!(printable_lines("a\nb"), Cow::Borrowed(_)));
        assert_eq!(printable_lines("a\r\x1b\nb"), "a\\r\\x1b\nb");
    }
}
