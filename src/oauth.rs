//! OAuth 2.0 for relays that want XOAUTH2 (Microsoft 365, Google): the
//! tenant's refresh token on disk (0600, replaced atomically), access tokens
//! fetched from the token endpoint (RFC 6749 §6) and cached until shortly
//! before they expire, and the two sign-ins behind `pbxmail oauth login`: the
//! device authorization grant (RFC 8628, Microsoft 365) and the authorization
//! code grant with PKCE (RFC 6749 §4.1, RFC 7636) for an installed client,
//! whose redirect the admin pastes back (Google, whose device grant does not
//! allow the mail scope). Each tenant's thread refreshes its own token, so a
//! slow or failing endpoint delays only that tenant. Tokens, codes and the
//! PKCE verifier are `Secret`s: never printed.

use crate::config::{Secret, TenantConfig};
use serde::Deserialize;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Refresh this long before the endpoint says the token expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(120);
/// One HTTP exchange with an endpoint, at most.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pasted line read (a redirect address is a few hundred bytes).
const PASTE_LIMIT: u64 = 16 * 1024;

#[derive(Debug)]
pub enum OAuthError {
    /// The endpoint is unreachable or failing: try again later.
    Temporary(String),
    /// The refresh token was refused (invalid_grant): an admin must sign in again.
    SignInNeeded(String),
    /// The tenant's OAuth settings are incomplete or unreadable.
    Config(String),
    /// Sign-in ended without a token (denied, expired, a wrong paste).
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
    pub auth_url: Option<String>,
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
            auth_url: tenant.oauth_auth_url.clone(),
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

/// The grant `pbxmail oauth login` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFlow {
    /// RFC 8628: the admin types a short code at the provider's page.
    Device,
    /// RFC 6749 §4.1 with PKCE: the admin signs in at an address we print
    /// and pastes back the address the browser was sent to.
    Code,
}

impl LoginFlow {
    pub fn parse(s: &str) -> Result<LoginFlow, String> {
        match s {
            "device" => Ok(LoginFlow::Device),
            "code" => Ok(LoginFlow::Code),
            other => Err(format!(
                "{other:?} is not a sign-in flow: use device or code"
            )),
        }
    }

    /// The tenant's own: the code grant where an authorization endpoint is
    /// set (a provider that has one needs it), else the device grant.
    pub fn for_endpoints(endpoints: &Endpoints) -> Result<LoginFlow, OAuthError> {
        match (&endpoints.auth_url, &endpoints.device_url) {
            (Some(_), _) => Ok(LoginFlow::Code),
            (None, Some(_)) => Ok(LoginFlow::Device),
            (None, None) => Err(OAuthError::Config(
                "neither oauth_auth_url nor oauth_device_url is set; set provider, or the \
                 provider's authorization (or device authorization) endpoint"
                    .into(),
            )),
        }
    }
}

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

    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.expose()),
        ("redirect_uri", redirect_uri.as_str()),
        ("client_id", endpoints.client_id.as_str()),
        ("code_verifier", verifier.expose()),
    ];
    if let Some(secret) = &endpoints.client_secret {
        form.push(("client_secret", secret.expose()));
    }
    let (status, answer) = post_form(agent, &endpoints.token_url, &form)?;
    // Text from the endpoint is shown only if it cannot be carrying our secrets back.
    let description = answer
        .error_description
        .filter(|d| !d.contains(code.expose()) && !d.contains(verifier.expose()))
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    match (answer.refresh_token, answer.error.as_deref()) {
        (Some(refresh), _) if (200..300).contains(&status) => {
            write_refresh_token(&endpoints.token_file, &Secret::new(refresh))?;
            say(&format!(
                "Signed in; refresh token stored in {}",
                endpoints.token_file.display()
            ));
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
fn read_paste(input: &mut impl BufRead) -> Result<String, OAuthError> {
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
fn code_from_paste(pasted: &str, state: &str) -> Result<Secret, OAuthError> {
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

    #[test]
    fn flow_follows_the_configured_endpoints() {
        let mut endpoints = Endpoints {
            token_url: "https://idp.example/token".into(),
            device_url: Some("https://idp.example/device".into()),
            auth_url: None,
            client_id: "id".into(),
            client_secret: None,
            scope: None,
            token_file: PathBuf::from("/tmp/t.json"),
        };
        assert_eq!(
            LoginFlow::for_endpoints(&endpoints).unwrap(),
            LoginFlow::Device
        );
        endpoints.auth_url = Some("https://idp.example/auth".into());
        assert_eq!(
            LoginFlow::for_endpoints(&endpoints).unwrap(),
            LoginFlow::Code
        );
        endpoints.device_url = None;
        assert_eq!(
            LoginFlow::for_endpoints(&endpoints).unwrap(),
            LoginFlow::Code
        );
        endpoints.auth_url = None;
        assert!(matches!(
            LoginFlow::for_endpoints(&endpoints),
            Err(OAuthError::Config(_))
        ));
        assert_eq!(LoginFlow::parse("code"), Ok(LoginFlow::Code));
        assert!(LoginFlow::parse("browser").is_err());
    }
}
