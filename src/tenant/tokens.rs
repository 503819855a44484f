//! A tenant's OAuth access tokens for `auth = xoauth2`: the token source is
//! made on first use (its HTTP agent trusts the tenant's ca_file) and then
//! refreshes as needed. Shared by the tenant's worker (smtp_delivery.rs) and
//! `pbxmail test`, so both get tokens, and word failures, the same way.

use crate::base::names::TenantName;
use crate::base::secret::Secret;
use crate::config::TenantConfig;
use crate::oauth::{Endpoints, OAuthError, TokenSource};
use std::path::PathBuf;

pub struct Tokens {
    tenant: TenantName,
    /// Err: why this tenant can get no token (its OAuth settings are unusable).
    endpoints: Result<Endpoints, String>,
    ca_file: Option<PathBuf>,
    source: Option<TokenSource>,
}

/// Why no access token could be had, worded for the admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub why: String,
    /// The refresh token was refused: an admin must sign in again.
    pub sign_in: bool,
    /// The token endpoint was asked (not: the settings could not make a source).
    pub asked: bool,
}

impl Tokens {
    pub fn new(
        tenant: TenantName,
        endpoints: Result<Endpoints, String>,
        ca_file: Option<PathBuf>,
    ) -> Tokens {
        Tokens {
            tenant,
            endpoints,
            ca_file,
            source: None,
        }
    }

    /// From the tenant's configuration; reads its oauth_client_secret_file.
    pub fn for_tenant(tenant: &TenantConfig) -> Tokens {
        Tokens::new(
            tenant.name.clone(),
            Endpoints::for_tenant(tenant).map_err(|e| e.to_string()),
            tenant.ca_file.clone(),
        )
    }

    /// A valid access token, fetched or refreshed if need be.
    pub fn access_token(&mut self) -> Result<Secret, TokenError> {
        let source = match self.source.take() {
            Some(source) => source,
            None => {
                let endpoints = self.endpoints.clone().map_err(|why| TokenError {
                    why,
                    sign_in: false,
                    asked: false,
                })?;
                let agent = crate::oauth::http_agent(self.ca_file.as_deref())
                    .map_err(|e| self.error(&e, false))?;
                TokenSource::new(endpoints, agent)
            }
        };
        let source = self.source.insert(source);
        match source.access_token() {
            Ok(token) => Ok(token),
            Err(e) => Err(self.error(&e, true)),
        }
    }

    /// The relay refused the token: fetch a fresh one next time.
    pub fn forget(&mut self) {
        if let Some(source) = self.source.as_mut() {
            source.forget();
        }
    }

    /// The error's words, naming this tenant where they say what to run.
    fn error(&self, e: &OAuthError, asked: bool) -> TokenError {
        TokenError {
            why: e.to_string().replace("TENANT", self.tenant.as_str()),
            sign_in: matches!(e, OAuthError::SignInNeeded(_)),
            asked,
        }
    }
}
