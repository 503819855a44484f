//! The authorization code grant with PKCE (RFC 6749 §4.1, RFC 7636) for an
//! installed client (Google's sign-in, whose device grant does not allow the
//! mail scope): the sign-in address with its verifier's challenge and state,
//! and the exchange of the code the admin pastes back (see `paste`).

use super::http::post_token;
use super::paste::{code_from_paste, read_paste};
use super::token_file::store_sign_in;
use super::{Endpoints, OAuthError};
use crate::base::secret::Secret;
use std::io::BufRead;

/// RFC 6749 §4.1 with PKCE (RFC 7636, S256) for an installed client whose
/// redirect URI is a loopback address nothing listens on (RFC 8252 §7.3):
/// the browser may be on any computer, so the admin pastes the address it
/// was sent to (or only its code) into `input`. The state is checked, the code
/// exchanged with the verifier, and the refresh token stored as the device
/// grant stores it. `login_hint` preselects the mailbox's account.
pub fn code_login(
    endpoints: &Endpoints,
    agent: &ureq::Agent,
    login_hint: Option<&str>,
    input: &mut impl BufRead,
    mut say: impl FnMut(&str),
) -> Result<(), OAuthError> {
    let auth_url = endpoints.auth_url.as_deref().ok_or_else(|| {
        OAuthError::Config(
            "oauth_auth_url is required for the code sign-in (provider = gmail sets it)".into(),
        )
    })?;
    let rng = ring::rand::SystemRandom::new();
    // 32 bytes: a 43-character verifier, the least RFC 7636 §4.1 allows and
    // 256 bits of entropy, as it recommends.
    let verifier = Secret::new(random_text::<32>(&rng)?);
    let state = random_text::<16>(&rng)?;
    // A port from the dynamic range, fresh each run: on the admin's computer
    // it is most likely closed, so the browser shows the address and stops.
    // Whatever does listen there gets a code useless without our verifier.
    let port = 49152 + u16::from_be_bytes(random_bytes::<2>(&rng)?) % 16384;
    let redirect_uri = format!("http://127.0.0.1:{port}/");
    let mut params = vec![
        ("response_type", "code"),
        ("client_id", endpoints.client_id.as_str()),
        ("redirect_uri", redirect_uri.as_str()),
    ];
    if let Some(scope) = &endpoints.scope {
        params.push(("scope", scope.as_str()));
    }
    let challenge = pkce_challenge(&verifier);
    params.extend([
        ("state", state.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ]);
    if let Some(hint) = login_hint {
        params.push(("login_hint", hint));
    }
    let account = login_hint.map(|h| format!(" as {h}")).unwrap_or_default();
    say(&format!(
        "Open this address in a browser on any computer and sign in{account}:\n\n{}\n",
        with_query(auth_url, &params)
    ));
    say(&format!(
        "After you allow access, the browser goes to {redirect_uri} and reports that the page \
         cannot be reached: that is expected. Copy the whole address from the address bar \
         (or only the value after code=), paste it here and press Enter:"
    ));
    let code = code_from_paste(&read_paste(input)?, &state)?;

    let grant = [
        ("grant_type", "authorization_code"),
        ("code", code.expose()),
        ("redirect_uri", redirect_uri.as_str()),
        ("client_id", endpoints.client_id.as_str()),
        ("code_verifier", verifier.expose()),
    ];
    let (status, answer) = post_token(agent, endpoints, &grant, &[])?;
    // Text from the endpoint is shown only if it cannot be carrying our secrets back.
    let description = answer
        .error_description
        .filter(|d| !d.contains(code.expose()) && !d.contains(verifier.expose()))
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    match (answer.refresh_token, answer.error.as_deref()) {
        (Some(refresh), _) if (200..300).contains(&status) => {
            store_sign_in(&endpoints.token_file, refresh, &mut say)?;
            Ok(())
        }
        (_, Some("invalid_grant")) => Err(OAuthError::Denied(format!(
            "the token endpoint refused the code (invalid_grant{description}); a code works \
             once, for a few minutes, and only from the address this run printed: run the \
             command again"
        ))),
        (_, Some("invalid_client" | "unauthorized_client")) => Err(OAuthError::Config(format!(
            "the token endpoint refused the client ({}{description}): check oauth_client_id \
             and oauth_client_secret_file, and that the client is of the Desktop app type",
            answer.error.unwrap_or_default()
        ))),
        (_, Some(error)) => {
            let hint = if endpoints.client_secret.is_none() {
                "; Google's Desktop app clients need oauth_client_secret_file"
            } else {
                ""
            };
            Err(OAuthError::Denied(format!(
                "the token endpoint answered {error}{description}{hint}"
            )))
        }
        (None, None) if (200..300).contains(&status) => Err(OAuthError::Denied(
            "the token endpoint answered without a refresh token; for Google keep \
             access_type=offline&prompt=consent in oauth_auth_url, for Microsoft put \
             offline_access in oauth_scope"
                .into(),
        )),
        _ => Err(OAuthError::Temporary(format!(
            "{} answered HTTP {status}",
            endpoints.token_url
        ))),
    }
}

fn random_bytes<const N: usize>(rng: &ring::rand::SystemRandom) -> Result<[u8; N], OAuthError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; N];
    rng.fill(&mut bytes)
        .map_err(|_| OAuthError::Temporary("the system's random number source failed".into()))?;
    Ok(bytes)
}

/// `N` random bytes as base64url without padding: only unreserved characters
/// (RFC 3986 §2.3), as a verifier and a state need.
fn random_text<const N: usize>(rng: &ring::rand::SystemRandom) -> Result<String, OAuthError> {
    use base64::Engine as _;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<N>(rng)?))
}

/// RFC 7636 §4.2, S256: BASE64URL(SHA256(ASCII(code_verifier))), unpadded.
fn pkce_challenge(verifier: &Secret) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.expose().as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// `url` with `params` appended to whatever query it already has.
fn with_query(url: &str, params: &[(&str, &str)]) -> String {
    let mut out = url.to_string();
    let mut separator = match url.find('?') {
        None => "?",
        Some(_) if url.ends_with(['?', '&']) => "",
        Some(_) => "&",
    };
    for (key, value) in params {
        out.push_str(separator);
        out.push_str(&percent_encode(key));
        out.push('=');
        out.push_str(&percent_encode(value));
        separator = "&";
    }
    out
}

/// Everything but the unreserved characters (RFC 3986 §2.3) as %XX.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_is_rfc_7636_appendix_b() {
        let verifier = Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(
            pkce_challenge(&verifier),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn verifier_and_state_are_fresh_unreserved_text() {
        let rng = ring::rand::SystemRandom::new();
        let a = random_text::<32>(&rng).unwrap();
        let b = random_text::<32>(&rng).unwrap();
        assert_ne!(a, b);
        // RFC 7636 §4.1: 43 to 128 unreserved characters.
        assert_eq!(a.len(), 43);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_')));
        assert_eq!(random_text::<16>(&rng).unwrap().len(), 22);
    }

    #[test]
    fn query_is_appended_to_the_endpoints_own() {
        let params = [
            ("redirect_uri", "http://127.0.0.1:50000/"),
            ("scope", "a b"),
        ];
        assert_eq!(
            with_query("https://idp.example/auth", &params),
            "https://idp.example/auth?redirect_uri=http%3A%2F%2F127.0.0.1%3A50000%2F&scope=a%20b"
        );
        assert_eq!(
            with_query("https://idp.example/auth?access_type=offline", &params[1..]),
            "https://idp.example/auth?access_type=offline&scope=a%20b"
        );
        assert_eq!(
            with_query("https://idp.example/auth?", &params[1..]),
            "https://idp.example/auth?scope=a%20b"
        );
    }
}
