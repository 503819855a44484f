//! The device authorization grant (RFC 8628, Microsoft 365's sign-in): the
//! admin types a short code at the provider's page on any computer while
//! pbxmail polls the token endpoint.

use super::http::post_token;
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
    expires_in: Option<u64>,
    interval: Option<u64>,
    error: Option<String>,
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
    let deadline = Instant::now() + Duration::from_secs(device.expires_in.unwrap_or(900));
    let mut interval = Duration::from_secs(device.interval.unwrap_or(5).max(1));
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
            (None, Some("slow_down")) => interval += Duration::from_secs(5),
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
