//! What the admin pastes back after the code sign-in: one bounded line, and
//! the code in it, taken only from a redirect whose state is this run's.

use super::OAuthError;
use crate::base::secret::Secret;
use std::io::{BufRead, Read};

/// Longest pasted line read (a redirect address is a few hundred bytes).
const PASTE_LIMIT: u64 = 16 * 1024;

/// %XX escapes (and `+` as a space in a query); None if one is malformed
/// or the result is not UTF-8.
fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' if plus_is_space => out.push(b' '),
            other => out.push(other),
        }
    }
    String::from_utf8(out).ok()
}

/// One non-blank line from the admin, bounded.
pub(super) fn read_paste(input: &mut impl BufRead) -> Result<String, OAuthError> {
    loop {
        let mut line = Vec::new();
        let n = input
            .by_ref()
            .take(PASTE_LIMIT)
            .read_until(b'\n', &mut line)
            .map_err(|e| OAuthError::Denied(format!("reading the pasted address: {e}")))?;
        if n == 0 {
            return Err(OAuthError::Denied(
                "nothing was pasted; run the command again and paste the address".into(),
            ));
        }
        if line.last() != Some(&b'\n') && n as u64 >= PASTE_LIMIT {
            return Err(OAuthError::Denied("the pasted line is too long".into()));
        }
        let text = String::from_utf8(line)
            .map_err(|_| OAuthError::Denied("the pasted text is not UTF-8".into()))?;
        if !text.trim().is_empty() {
            return Ok(text.trim().to_string());
        }
    }
}

/// The code in what the admin pasted: the redirect address (or its query),
/// whose state must be ours (RFC 6749 §10.12), or the bare code. A bare code
/// cannot be checked that way, but PKCE still binds it: a code issued to
/// another sign-in is refused at the exchange without its verifier.
/// Nothing pasted is ever quoted back: it carries the code.
pub(super) fn code_from_paste(pasted: &str, state: &str) -> Result<Secret, OAuthError> {
    let is_address = pasted.contains(['?', '=', '&']) || pasted.contains("://");
    if !is_address {
        return match percent_decode(pasted, false) {
            Some(code) if !code.is_empty() && code.chars().all(|c| c.is_ascii_graphic()) => {
                Ok(Secret::new(code))
            }
            _ => Err(OAuthError::Denied(
                "what was pasted is neither the browser's address nor a code".into(),
            )),
        };
    }
    let query = pasted.split_once('?').map_or(pasted, |(_, q)| q);
    let query = query.split('#').next().unwrap_or_default();
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (percent_decode(key, true), percent_decode(value, true)) {
            (Some(key), Some(value)) => params.push((key, value)),
            _ => {
                return Err(OAuthError::Denied(
                    "the pasted address is not a valid URL; copy it again from the address bar"
                        .into(),
                ))
            }
        }
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // RFC 6749 §4.1.2.1: the provider's refusal, a code from a fixed list.
    if let Some(error) = param("error") {
        return Err(OAuthError::Denied(match error {
            "access_denied" => "sign-in was declined".to_string(),
            e if e.len() <= 64 && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => {
                format!("the provider answered {e}")
            }
            _ => "the provider answered with an error".to_string(),
        }));
    }
    match (param("state"), param("code")) {
        (Some(got), _) if got != state => Err(OAuthError::Denied(
            "the pasted address belongs to another sign-in (its state does not match this \
             run's); nothing was stored. Open the address printed above and paste where it \
             leads"
                .into(),
        )),
        (None, _) => Err(OAuthError::Denied(
            "the pasted address has no state; paste the whole address from the address bar, \
             or only the code"
                .into(),
        )),
        (Some(_), Some(code)) if !code.is_empty() => Ok(Secret::new(code.to_string())),
        (Some(_), _) => Err(OAuthError::Denied(
            "the pasted address has no code; paste the address the browser was sent to after \
             sign-in, not the one printed above"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasted_address_gives_its_code_when_the_state_is_ours() {
        let pasted = "http://127.0.0.1:50000/?state=S1&code=4%2F0Ab-c0de&scope=https%3A%2F%2Fmail.google.com%2F";
        assert_eq!(
            code_from_paste(pasted, "S1").unwrap().expose(),
            "4/0Ab-c0de"
        );
        // Only the query, or the address without its scheme, are as good.
        assert_eq!(
            code_from_paste("code=4%2F0Ab&state=S1", "S1")
                .unwrap()
                .expose(),
            "4/0Ab"
        );
        assert_eq!(
            code_from_paste("127.0.0.1:50000/?code=c&state=S1#", "S1")
                .unwrap()
                .expose(),
            "c"
        );
    }

    #[test]
    fn pasted_address_of_another_sign_in_is_refused_without_quoting_it() {
        for pasted in [
            "http://127.0.0.1:50000/?state=other&code=s3cret-code",
            "http://127.0.0.1:50000/?code=s3cret-code",
        ] {
            let err = code_from_paste(pasted, "S1").unwrap_err();
            assert!(matches!(err, OAuthError::Denied(_)), "{err:?}");
            assert!(err.to_string().contains("state"), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn pasted_error_or_printed_address_is_refused() {
        let declined = code_from_paste("http://127.0.0.1:1/?error=access_denied&state=S1", "S1");
        assert!(declined.unwrap_err().to_string().contains("declined"));
        // The sign-in address itself (pasted by mistake) carries our state but no code.
        let printed = "https://idp.example/auth?response_type=code&state=S1&code_challenge=x";
        assert!(code_from_paste(printed, "S1")
            .unwrap_err()
            .to_string()
            .contains("no code"));
        assert!(code_from_paste("code=%zz&state=S1", "S1").is_err());
    }

    #[test]
    fn bare_code_is_taken_as_copied_from_the_address_bar_or_decoded() {
        assert_eq!(
            code_from_paste("4%2F0Ab-c0de", "S1").unwrap().expose(),
            "4/0Ab-c0de"
        );
        assert_eq!(
            code_from_paste("4/0Ab-c0de", "S1").unwrap().expose(),
            "4/0Ab-c0de"
        );
        assert!(code_from_paste("two words", "S1").is_err());
        // The redirect address without its query is not a code.
        let bare_address = code_from_paste("http://127.0.0.1:50000/", "S1").unwrap_err();
        assert!(
            bare_address.to_string().contains("no state"),
            "{bare_address}"
        );
    }

    #[test]
    fn paste_skips_blank_lines_and_needs_one() {
        let mut input = &b"\n  \n code \n"[..];
        assert_eq!(read_paste(&mut input).unwrap(), "code");
        let mut empty = &b"\n"[..];
        assert!(matches!(read_paste(&mut empty), Err(OAuthError::Denied(_))));
        let long = vec![b'a'; PASTE_LIMIT as usize + 10];
        assert!(read_paste(&mut &long[..]).is_err());
    }
}
