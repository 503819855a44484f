//! `provider = office365 | gmail`: what a provider fills in when the tenant leaves a key empty.

use std::time::Duration;

use super::tenant::{RateLimit, Relay};

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
    pub(super) oauth_device_url: &'static str,
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
                oauth_device_url:
                    "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode",
                oauth_scope: "https://outlook.office.com/SMTP.Send offline_access",
            },
            Provider::Gmail => Preset {
                relay: Relay {
                    host: "smtp.gmail.com".to_owned(),
                    port: 587,
                },
                rate_limit: None,
                oauth_token_url: "https://oauth2.googleapis.com/token",
                oauth_device_url: "https://oauth2.googleapis.com/device/code",
                oauth_scope: "https://mail.google.com/",
            },
        }
    }
}
