//! Mail addresses: pulling them out of header fields (RFC 5322 §3.4 address
//! lists with display names, quotes, comments and groups) and checking that
//! an envelope address is safe to put on an SMTP command line.

/// Splits an address-list header value into bare addresses (`local@domain`).
/// Pieces that hold no address (an empty group, a lone name) are skipped.
pub fn parse_list(value: &str) -> Vec<String> {
    let mut addresses = Vec::new();
    let mut piece = String::new();
    let mut in_quotes = false;
    let mut comment_depth = 0usize;
    let mut in_angle = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            escaped = false;
            if comment_depth == 0 {
                piece.push(c);
            }
            continue;
        }
        match c {
            '\\' if in_quotes || comment_depth > 0 => escaped = true,
            '"' if comment_depth == 0 => {
                in_quotes = !in_quotes;
                piece.push(c);
            }
            '(' if !in_quotes => comment_depth += 1,
            ')' if !in_quotes && comment_depth > 0 => comment_depth -= 1,
            _ if comment_depth > 0 => {}
            '<' if !in_quotes => {
                in_angle = true;
                piece.push(c);
            }
            '>' if !in_quotes => {
                in_angle = false;
                piece.push(c);
            }
            // "group-name:" starts a group; what came before is only its name.
            ':' if !in_quotes && !in_angle => piece.clear(),
            ',' | ';' if !in_quotes && !in_angle => {
                addresses.extend(address_in(&piece));
                piece.clear();
            }
            _ => piece.push(c),
        }
    }
    addresses.extend(address_in(&piece));
    addresses
}

/// The address in one list element: inside `<...>` if present, else the bare text.
fn address_in(piece: &str) -> Option<String> {
    let candidate = match (piece.rfind('<'), piece.rfind('>')) {
        (Some(open), Some(close)) if open < close => piece.get(open + 1..close)?,
        _ => piece,
    };
    let candidate = candidate.trim();
    // A source route "@a,@b:user@host" is obsolete; keep the mailbox.
    let candidate = candidate.rsplit(':').next().unwrap_or(candidate).trim();
    is_valid(candidate).then(|| candidate.to_string())
}

/// Local part, `@`, domain; nothing that could break an SMTP command line.
pub fn is_valid(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && address.len() <= 254
        && !address
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ','))
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
}

pub fn domain_of(address: &str) -> Option<&str> {
    address.rsplit_once('@').map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_quotes_and_comments() {
        assert_eq!(
            parse_list(
                r#""Doe, John" <john@a.example>, mary@b.example (Mary), Bob <bob@c.example>"#
            ),
            vec!["john@a.example", "mary@b.example", "bob@c.example"]
        );
    }

    #[test]
    fn groups() {
        assert_eq!(
            parse_list("Team: a@x.example, b@x.example;, c@y.example"),
            vec!["a@x.example", "b@x.example", "c@y.example"]
        );
        assert!(parse_list("undisclosed-recipients:;").is_empty());
    }

    #[test]
    fn rejects_what_would_break_a_command() {
        assert!(!is_valid("a b@x.example"));
        assert!(!is_valid("a@x.example>\r\nRCPT TO:<evil@y"));
        assert!(!is_valid("nodomain"));
        assert!(!is_valid("@x.example"));
        assert!(is_valid("101@pbx.acme.example"));
    }

    #[test]
    fn domain() {
        assert_eq!(domain_of("a@B.example"), Some("B.example"));
        assert_eq!(domain_of("nobody"), None);
    }
}
