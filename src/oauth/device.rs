//! The device authorization grant (RFC 8628, Microsoft 365's sign-in): the
//! admin types a short code at the provider's page on any computer while
//! pbxmail polls the token endpoint.

use super::http::{number_or_string, post_token, seconds_within};
use super::token_file::store_sign_in;
use super::{Endpoints, OAuthError};

use serde::Deserialize;
use std::time::{Duration, Instant};

#[derive(Deserialize)]
struct DeviceResponse {
    device_code: Option<String>,
    user_code: Option<String>,
    verification_uri: Option<String>,
    /// Google's older name for it.
    verification_url: Option<String>,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<u64>,
    #[serde(default, deserialize_with = "number_or_string")]
    interval: Option<u64>,
    error: Option<String>,
}

/// How long a device code is polled for at most, whatever the server says
/// (RFC 8628 suggests minutes; this bounds a hostile answer).
const MAX_CODE_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest wait between two polls, `slow_down` included.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// RFC 8628 §3.5: `slow_down` adds 5 seconds to the interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// The first wait between polls: the server's `interval` (default 5 s),
/// at least a second, at most `MAX_POLL_INTERVAL`.
fn first_interval(interval: Option<u64>) -> Duration {
    seconds_within(interval, 5, MAX_POLL_INTERVAL).max(Duration::from_secs(1))
}

/// The wait after a `slow_down`, still at most `MAX_POLL_INTERVAL`.
fn slowed_down(interval: Duration) -> Duration {
    interval
        .saturating_add(SLOW_DOWN_STEP)
        .min(MAX_POLL_INTERVAL)
}

/// When polling gives up: the code's lifetime (default 15 min), clamped.
fn code_deadline(now: Instant, expires_in: Option<u64>) -> Instant {
    let lifetime = seconds_within(expires_in, 900, MAX_CODE_LIFETIME);
    now.checked_add(lifetime).unwrap_or(now)
}

/// RFC 8628: asks for a device code, tells the admin where to sign in, polls
/// as the server says, and stores the refresh token. `say` prints to the admin.
pub fn device_login(
    endpoints: &Endpoints,
    agent: &ureq::Agent,
    mut say: impl FnMut(&str),
) -> Result<(), OAuthError> {
    let device_url = endpoints.device_url.as_deref().ok_or_else(|| {
        OAuthError::Config("oauth_device_url is required for the device sign-in".into())
    })?;
    let mut form = vec![("client_id", endpoints.client_id.as_str())];
    if let Some(scope) = &endpoints.scope {
        form.push(("scope", scope.as_str()));
    }
    let mut response = agent
        .post(device_url)
        .send_form(form.iter().copied())
        .map_err(|e| OAuthError::Temporary(format!("{device_url}: {e}")))?;
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| OAuthError::Temporary(format!("{device_url}: {e}")))?;
    let device: DeviceResponse = serde_json::from_str(&body).map_err(|_| {
        OAuthError::Temporary(format!("{device_url} did not answer with a device code"))
    })?;
    let (Some(device_code), Some(user_code)) = (device.device_code, device.user_code) else {
        return Err(OAuthError::Denied(
            device.error.unwrap_or_else(|| "no device code".into()),
        ));
    };
    let uri = device
        .verification_uri
        .or(device.verification_url)
        .unwrap_or_default();
    say(&format!(
        "To sign in, open {uri} and enter the code {user_code}"
    ));
    let deadline = code_deadline(Instant::now(), device.expires_in);
    let mut interval = first_interval(device.interval);
    loop {
        if Instant::now() >= deadline {
            return Err(OAuthError::Denied(
                "the code expired before sign-in; run the command again".into(),
            ));
        }
        // RFC 8628 §3.5: wait the interval between polls; this is the protocol's pacing.
        std::thread::sleep(interval);
        let grant = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code.as_str()),
            ("client_id", endpoints.client_id.as_str()),
        ];
        let (_, answer) = post_token(agent, endpoints, &grant, &[])?;
        match (answer.refresh_token, answer.error.as_deref()) {
            (Some(refresh), _) => {
                store_sign_in(&endpoints.token_file, refresh, &mut say)?;
                return Ok(());
            }
            (None, Some("authorization_pending")) => {}
            (None, Some("slow_down")) => interval = slowed_down(interval),
            (None, Some("expired_token")) => {
                return Err(OAuthError::Denied(
                    "the code expired before sign-in; run the command again".into(),
                ))
            }
            (None, Some("access_denied")) => {
                return Err(OAuthError::Denied("sign-in was declined".into()))
            }
            (None, other) => {
                return Err(OAuthError::Denied(format!(
                    "the token endpoint answered {}",
                    other.unwrap_or("without a refresh token (is offline_access in oauth_scope?)")
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_device_interval_and_slow_down_are_clamped_not_slept() {
        let device: DeviceResponse = serde_json::from_str(
            r#"{"device_code":"d","user_code":"u","interval":18446744073709551615,
                "expires_in":"18446744073709551615"}"#,
        )
        .unwrap();
        assert_eq!(first_interval(device.interval), MAX_POLL_INTERVAL);
        let now = Instant::now();
        assert_eq!(
            code_deadline(now, device.expires_in),
            now + MAX_CODE_LIFETIME
        );

        let mut interval = first_interval(Some(0));
        assert_eq!(interval, Duration::from_secs(1));
        for _ in 0..1000 {
            interval = slowed_down(interval);
        }
        assert_eq!(interval, MAX_POLL_INTERVAL);
        assert_eq!(slowed_down(Duration::MAX), MAX_POLL_INTERVAL);
        assert_eq!(first_interval(None), Duration::from_secs(5));
        assert_eq!(slowed_down(Duration::from_secs(5)), Duration::from_secs(10));
    }
}
