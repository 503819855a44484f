//! OAuth 2.0 for relays that want XOAUTH2 (Microsoft 365, Google): what a
//! tenant's OAuth is (its endpoints, the sign-in flow it uses) and what can
//! go wrong with it. The parts: `http` talks to the endpoints, `token_file`
//! keeps the refresh token on disk, `source` hands each tenant's thread its
//! access tokens, and `device` and `code` are the two sign-ins behind
//! `pbxmail oauth login`. Tokens, codes and the PKCE verifier are `Secret`s:
//! never printed.

mod code;
mod device;
mod http;
mod paste;
mod source;
mod token_file;

pub use code::code_login;
pub use device::device_login;
pub use http::http_agent;
pub use source::TokenSource;

use crate::base::secret::Secret;
use crate::config::TenantConfig;
use std::fmt;
use std::path::PathBuf;

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
    /// The tenant's name, for what is logged about its tokens.
    pub tenant: String,
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
            Some(path) => {
                let fail = |why: String| {
                    OAuthError::Config(format!(
                        "oauth_client_secret_file {}: {why}",
                        path.display()
                    ))
                };
                let bytes =
                    crate::base::fs::read_small_file(path, crate::base::fs::MAX_SECRET_FILE)
                        .map_err(|e| fail(e.to_string()))?;
                let text =
                    String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".to_string()))?;
                Some(Secret::new(text.trim().to_string()))
            }
            None => None,
        };
        Ok(Endpoints {
            tenant: tenant.name.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_follows_the_configured_endpoints() {
        let mut endpoints = Endpoints {
            tenant: "acme".into(),
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

    /// The secret file is read on the tenant thread: a device or FIFO there
    /// is refused at once, with the key and the file named.
    #[test]
    fn a_client_secret_file_that_is_not_a_regular_file_is_refused() {
        let text = "[tenant:acme]\ndomains = acme.example\nrelay = smtp.acme.example:587\n";
        let config = crate::config::parse(std::path::Path::new("pbxmail.ini"), text).unwrap();
        let mut tenant = config.tenants[0].clone();
        tenant.oauth_client_secret_file = Some(PathBuf::from("/dev/zero"));
        match Endpoints::for_tenant(&tenant) {
            Err(OAuthError::Config(why)) => assert!(
                why.starts_with(
                    "oauth_client_secret_file /dev/zero: a character device, not a regular file"
                ),
                "{why}"
            ),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("/dev/zero read as a secret"),
        }
    }
}
