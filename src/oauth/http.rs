//! HTTPS to the provider's endpoints: an agent with the system's trust
//! store plus the tenant's `ca_file`, and the form POST every grant makes,
//! with its JSON answer (RFC 6749 §5.1, §5.2). What an answer means is left
//! to the grant that asked.

use super::{Endpoints, OAuthError};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One HTTP exchange with an endpoint, at most.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTPS client trusting the system store plus the tenant's `ca_file`.
pub fn http_agent(ca_file: Option<&Path>) -> Result<ureq::Agent, OAuthError> {
    let mut roots: Vec<ureq::tls::Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        let fail = |e: &dyn std::fmt::Display| {
            OAuthError::Config(format!("ca_file {}: {e}", path.display()))
        };
        let pem = crate::base::fs::read_small_file(path, crate::base::fs::MAX_CA_FILE)
            .map_err(|e| fail(&e))?;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(&e))?;
        roots.extend(
            certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned()),
        );
    }
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(HTTP_TIMEOUT))
        .https_only(false)
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

#[derive(Deserialize)]
pub(super) struct TokenResponse {
    pub(super) access_token: Option<String>,
    /// A number; some older endpoints send it as a string. Clamp before use
    /// (`seconds_within`): it comes from the network.
    #[serde(default, deserialize_with = "number_or_string")]
    pub(super) expires_in: Option<u64>,
    pub(super) refresh_token: Option<String>,
    pub(super) error: Option<String>,
    pub(super) error_description: Option<String>,
}

/// A count of seconds sent as a JSON number or a string. Whatever the peer
/// sends never fails the parse: a value too big for `u64` (or fractional)
/// saturates, a negative one is 0, text that is no number is absent.
pub(super) fn number_or_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Whole(u64),
        Real(f64),
        Text(String),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        Some(Either::Whole(n)) => Some(n),
        Some(Either::Real(x)) => saturating_secs(x),
        Some(Either::Text(t)) => {
            let t = t.trim();
            t.parse().ok().or_else(|| saturating_secs(t.parse().ok()?))
        }
        None => None,
    })
}

/// `x` seconds as a whole `u64`, saturating; NaN is no value.
fn saturating_secs(x: f64) -> Option<u64> {
    // `as` saturates float to int conversions (and maps negatives to 0).
    (!x.is_nan()).then_some(x as u64)
}

/// A duration the network gave in seconds, `default` when it gave none,
/// never more than `max`: every such value is clamped before it meets an
/// `Instant` or a sleep.
pub(super) fn seconds_within(value: Option<u64>, default: u64, max: Duration) -> Duration {
    Duration::from_secs(value.unwrap_or(default)).min(max)
}

/// POSTs a grant to the tenant's token endpoint: the grant's own fields
/// (`client_id` among them), then the client's secret where it has one
/// (RFC 6749 §2.3.1), then `after`; reads the JSON answer.
pub(super) fn post_token<'a>(
    agent: &ureq::Agent,
    endpoints: &'a Endpoints,
    grant: &[(&'a str, &'a str)],
    after: &[(&'a str, &'a str)],
) -> Result<(u16, TokenResponse), OAuthError> {
    let mut form = grant.to_vec();
    if let Some(secret) = &endpoints.client_secret {
        form.push(("client_secret", secret.expose()));
    }
    form.extend_from_slice(after);
    post_form(agent, &endpoints.token_url, &form)
}

/// POSTs a form to a token endpoint and reads its JSON answer.
fn post_form(
    agent: &ureq::Agent,
    url: &str,
    form: &[(&str, &str)],
) -> Result<(u16, TokenResponse), OAuthError> {
    let mut response = agent
        .post(url)
        .send_form(form.iter().copied())
        .map_err(|e| OAuthError::Temporary(format!("{url}: {e}")))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| OAuthError::Temporary(format!("{url}: {e}")))?;
    let parsed: TokenResponse = serde_json::from_str(&body).map_err(|_| {
        OAuthError::Temporary(format!(
            "{url} answered HTTP {status} without a JSON token response"
        ))
    })?;
    Ok((status, parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_may_be_a_string() {
        let parsed: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":"3599"}"#).unwrap();
        assert_eq!(parsed.expires_in, Some(3599));
        let parsed: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(parsed.expires_in, None);
    }

    #[test]
    fn huge_expires_in_parses_saturated_as_number_or_string() {
        for body in [
            r#"{"access_token":"a","expires_in":18446744073709551615}"#,
            r#"{"access_token":"a","expires_in":"18446744073709551615"}"#,
            r#"{"access_token":"a","expires_in":1e300}"#,
            r#"{"access_token":"a","expires_in":"99999999999999999999999999"}"#,
        ] {
            let parsed: TokenResponse = serde_json::from_str(body).unwrap();
            assert_eq!(parsed.expires_in, Some(u64::MAX), "{body}");
        }
        let parsed: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":-5}"#).unwrap();
        assert_eq!(parsed.expires_in, Some(0));
    }

    #[test]
    fn network_seconds_are_clamped_to_their_maximum() {
        let day = Duration::from_secs(86_400);
        assert_eq!(seconds_within(Some(u64::MAX), 3600, day), day);
        assert_eq!(seconds_within(Some(60), 3600, day), Duration::from_secs(60));
        assert_eq!(seconds_within(None, 3600, day), Duration::from_secs(3600));
    }
}
