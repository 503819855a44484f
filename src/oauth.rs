//! OAuth 2.0 for relays that want XOAUTH2 (Microsoft 365, Google): the
//! tenant's refresh token on disk (0600, replaced atomically), access tokens
//! fetched from the token endpoint (RFC 6749 §6) and cached until shortly
//! before they expire, and the device authorization grant (RFC 8628) behind
//! `pbxmail oauth login`. Each tenant's thread refreshes its own token, so a
//! slow or failing endpoint delays only that tenant. Tokens are `Secret`s:
//! never printed.

use crate::config::{Secret, TenantConfig};
use serde::Deserialize;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Refresh this long before the endpoint says the token expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(120);
/// One HTTP exchange with an endpoint, at most.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub enum OAuthError {
    /// The endpoint is unreachable or failing: try again later.
    Temporary(String),
    /// The refresh token was refused (invalid_grant): an admin must sign in again.
    SignInNeeded(String),
    /// The tenant's OAuth settings are incomplete or unreadable.
    Config(String),
    /// Device login ended without a token (denied, expired).
    Denied(String),
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OAuthError::Temporary(why) => write!(f, "OAuth token endpoint: {why}; will retry"),
            OAuthError::SignInNeeded(why) => write!(
                f,
                "OAuth sign-in needed ({why}); run `pbxmail oauth login --tenant TENANT`"
            ),
            OAuthError::Config(why) => write!(f, "OAuth configuration: {why}"),
            OAuthError::Denied(why) => write!(f, "OAuth sign-in did not complete: {why}"),
        }
    }
}

impl std::error::Error for OAuthError {}

/// What a tenant's OAuth needs to talk to its provider.
#[derive(Clone)]
pub struct Endpoints {
    pub token_url: String,
    pub device_url: Option<String>,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub scope: Option<String>,
    pub token_file: PathBuf,
}

impl Endpoints {
    pub fn for_tenant(tenant: &TenantConfig) -> Result<Endpoints, OAuthError> {
        let missing = |key: &str| {
            OAuthError::Config(format!(
                "tenant {}: {key} is required for auth = xoauth2",
                tenant.name
            ))
        };
        let client_secret = match &tenant.oauth_client_secret_file {
            Some(path) => Some(Secret::new(
                fs::read_to_string(path)
                    .map_err(|e| {
                        OAuthError::Config(format!(
                            "oauth_client_secret_file {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_string(),
            )),
            None => None,
        };
        Ok(Endpoints {
            token_url: tenant
                .oauth_token_url
                .clone()
                .ok_or_else(|| missing("oauth_token_url"))?,
            device_url: tenant.oauth_device_url.clone(),
            client_id: tenant
                .oauth_client_id
                .clone()
                .ok_or_else(|| missing("oauth_client_id"))?,
            client_secret,
            scope: tenant.oauth_scope.clone(),
            token_file: tenant
                .oauth_token_file
                .clone()
                .ok_or_else(|| missing("oauth_token_file"))?,
        })
    }
}

/// An HTTPS client trusting the system store plus the tenant's `ca_file`.
pub fn http_agent(ca_file: Option<&Path>) -> Result<ureq::Agent, OAuthError> {
    let mut roots: Vec<ureq::tls::Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| OAuthError::Config(format!("ca_file {}: {e}", path.display())))?;
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
struct TokenResponse {
    access_token: Option<String>,
    /// A number; some older endpoints send it as a string.
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<u64>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        Some(Either::Number(n)) => Some(n),
        Some(Either::Text(t)) => t.trim().parse().ok(),
        None => None,
    })
}

/// The refresh token as stored in `oauth_token_file`.
#[derive(serde::Serialize, Deserialize)]
struct TokenFileContent {
    refresh_token: String,
}

pub fn read_refresh_token(path: &Path) -> Result<Secret, OAuthError> {
    let text = fs::read_to_string(path).map_err(|e| {
        OAuthError::SignInNeeded(format!("no refresh token stored: {}: {e}", path.display()))
    })?;
    let content: TokenFileContent = serde_json::from_str(&text).map_err(|e| {
        OAuthError::SignInNeeded(format!("{} is not a token file: {e}", path.display()))
    })?;
    Ok(Secret::new(content.refresh_token))
}

/// Replaces the token file atomically (temp, fsync, rename, fsync folder),
/// readable by its owner only, so a crash leaves either the old or the new token.
pub fn write_refresh_token(path: &Path, token: &Secret) -> Result<(), OAuthError> {
    let fail =
        |e: std::io::Error| OAuthError::Config(format!("cannot write {}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(fail)?;
    // Unique, so the daemon rotating a token and `oauth login` never share one.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.tmp",
        crate::spool::MessageId::generate()
    ));
    let content = serde_json::to_vec(&TokenFileContent {
        refresh_token: token.expose().to_string(),
    })
    .map_err(|e| OAuthError::Config(e.to_string()))?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    file.write_all(&content)
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    fs::rename(&tmp, path).map_err(fail)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(fail)
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

/// A tenant's access tokens: cached, refreshed when near expiry.
pub struct TokenSource {
    endpoints: Endpoints,
    agent: ureq::Agent,
    cached: Option<(Secret, Instant)>,
}

impl TokenSource {
    pub fn new(endpoints: Endpoints, agent: ureq::Agent) -> TokenSource {
        TokenSource {
            endpoints,
            agent,
            cached: None,
        }
    }

    /// A valid access token, from the cache or the token endpoint. A rotated
    /// refresh token in the answer replaces the stored one before it is used.
    pub fn access_token(&mut self) -> Result<Secret, OAuthError> {
        if let Some((token, valid_until)) = &self.cached {
            if Instant::now() < *valid_until {
                return Ok(token.clone());
            }
        }
        let refresh = read_refresh_token(&self.endpoints.token_file)?;
        let e = &self.endpoints;
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.expose()),
            ("client_id", e.client_id.as_str()),
        ];
        if let Some(secret) = &e.client_secret {
            form.push(("client_secret", secret.expose()));
        }
        if let Some(scope) = &e.scope {
            form.push(("scope", scope.as_str()));
        }
        let (status, answer) = post_form(&self.agent, &e.token_url, &form)?;
        match (answer.access_token, answer.error.as_deref()) {
            (Some(access), _) if (200..300).contains(&status) => {
                if let Some(rotated) = answer.refresh_token.filter(|r| r != refresh.expose()) {
                    write_refresh_token(&e.token_file, &Secret::new(rotated))?;
                }
                let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
                let valid_until = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
                let token = Secret::new(access);
                self.cached = Some((token.clone(), valid_until));
                Ok(token)
            }
            (_, Some("invalid_grant")) => {
                self.cached = None;
                Err(OAuthError::SignInNeeded(format!(
                    "the refresh token was refused: {}",
                    answer.error_description.unwrap_or_else(|| "invalid_grant".into())
                )))
            }
            (_, Some("invalid_client" | "unauthorized_client")) => Err(OAuthError::Config(format!(
                "the token endpoint refused the client ({}): check oauth_client_id and the client secret",
                answer.error.unwrap_or_default()
            ))),
            _ => Err(OAuthError::Temporary(format!(
                "{} answered HTTP {status}{}",
                e.token_url,
                answer.error.map(|e| format!(" ({e})")).unwrap_or_default()
            ))),
        }
    }

    /// Forgets the cached token (the relay refused it).
    pub fn forget(&mut self) {
        self.cached = None;
    }
}

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
    let device_url = endpoints
        .device_url
        .as_deref()
        .ok_or_else(|| OAuthError::Config("oauth_device_url is required for oauth login".into()))?;
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
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code.as_str()),
            ("client_id", endpoints.client_id.as_str()),
        ];
        if let Some(secret) = &endpoints.client_secret {
            form.push(("client_secret", secret.expose()));
        }
        let (_, answer) = post_form(agent, &endpoints.token_url, &form)?;
        match (answer.refresh_token, answer.error.as_deref()) {
            (Some(refresh), _) => {
                write_refresh_token(&endpoints.token_file, &Secret::new(refresh))?;
                say(&format!(
                    "Signed in; refresh token stored in {}",
                    endpoints.token_file.display()
                ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn token_file_is_private_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("pbxmail-oauth-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("acme.json");
        write_refresh_token(&path, &Secret::new("first".into())).unwrap();
        write_refresh_token(&path, &Secret::new("second".into())).unwrap();
        assert_eq!(read_refresh_token(&path).unwrap().expose(), "second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers = fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn expires_in_may_be_a_string() {
        let parsed: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":"3599"}"#).unwrap();
        assert_eq!(parsed.expires_in, Some(3599));
        let parsed: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(parsed.expires_in, None);
    }

    #[test]
    fn missing_token_file_means_sign_in() {
        let err = read_refresh_token(Path::new("/nonexistent/pbxmail/token.json")).unwrap_err();
        assert!(matches!(err, OAuthError::SignInNeeded(_)));
    }
}
