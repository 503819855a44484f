//! `provider = office365 | gmail`: what a provider fills in when the tenant leaves a key empty.

use std::time::Duration;

use super::tenant::RateLimit;
use crate::base::relay::Relay;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Office365,
    Gmail,
}

/// What a provider fills in when the tenant's own key is empty.
pub(super) struct Preset {
    pub(super) relay: Relay,
    pub(super) rate_limit: Option<RateLimit>,
    pub(super) oauth_token_url: &'static str,
    /// RFC 8628 device authorization endpoint, where the provider's device
    /// grant allows `oauth_scope`.
    pub(super) oauth_device_url: Option<&'static str>,
    /// RFC 6749 §4.1 authorization endpoint, for providers whose device grant
    /// does not allow the mail scope; its query is kept in the sign-in address.
    pub(super) oauth_auth_url: Option<&'static str>,
    pub(super) oauth_scope: &'static str,
}

impl Provider {
    pub(super) fn preset(self) -> Preset {
        match self {
            // Exchange Online's documented SMTP AUTH client submission limit is 30 messages a minute.
            Provider::Office365 => Preset {
                relay: Relay {
                    host: "smtp.office365.com".to_owned(),
                    port: 587,
                },
                rate_limit: Some(RateLimit {
                    messages: 30,
                    per: Duration::from_secs(60),
                }),
                oauth_token_url:
                    "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
                oauth_device_url: Some(
                    "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode",
                ),
                oauth_auth_url: None,
                oauth_scope: "https://outlook.office.com/SMTP.Send offline_access",
            },
            Provider::Gmail => Preset {
                relay: Relay {
                    host: "smtp.gmail.com".to_owned(),
                    port: 587,
                },
                // Google Workspace's published limit is 2,000 messages a day per
                // user (free accounts: 500, set rate_limit = 500/day). Past it,
                // Google refuses with 5.4.5 for up to a day; pacing keeps the
                // mail flowing instead.
                rate_limit: Some(RateLimit {
                    messages: 2000,
                    per: Duration::from_secs(86_400),
                }),
                oauth_token_url: "https://oauth2.googleapis.com/token",
                // Google's device grant allows only a few scopes, and
                // https://mail.google.com/ is not one of them (invalid_scope):
                // Gmail signs in with the code grant and a Desktop app client.
                // access_type=offline asks for a refresh token; prompt=consent
                // makes Google send one again when the account already consented.
                oauth_device_url: None,
                oauth_auth_url: Some(
                    "https://accounts.google.com/o/oauth2/v2/auth?access_type=offline&prompt=consent",
                ),
                oauth_scope: "https://mail.google.com/",
            },
        }
    }
}
