//! The real `Delivery`: SMTP sessions to the tenant's relay with its own
//! settings (client::open, `Session::transaction`), and for `auth = xoauth2`
//! the access tokens, refreshed on this tenant's thread so a slow token
//! endpoint delays only this tenant.

use super::delivery::{Delivery, OpenError, Opened};
use super::settings::SmtpSettings;
use super::tokens::{TokenError, Tokens};
use crate::base::names::TenantName;
use crate::base::secret::Secret;
use crate::outcome;
use crate::smtp::client::{self, Connected};
use crate::smtp::reply::Reply;
use crate::smtp::transaction::Body;
use crate::smtp::transaction::Outgoing;
use crate::smtp::SessionError;

pub struct SmtpDelivery {
    tenant: TenantName,
    settings: SmtpSettings,
    /// Access tokens for `auth = xoauth2`, made on first use.
    tokens: Option<Tokens>,
    /// "Sign in again" has been logged since the last good token (say it once).
    sign_in_logged: bool,
    connected: Option<Connected>,
}

impl SmtpDelivery {
    pub fn new(tenant: TenantName, settings: SmtpSettings) -> SmtpDelivery {
        SmtpDelivery {
            tenant,
            settings,
            tokens: None,
            sign_in_logged: false,
            connected: None,
        }
    }

    /// An access token for this session. Err: why the mail waits, and
    /// whether that was logged before.
    fn access_token(&mut self) -> Result<Secret, (String, bool)> {
        let tokens = self.tokens.get_or_insert_with(|| {
            let endpoints = match &self.settings.oauth {
                Some(endpoints) => endpoints.clone(),
                None => Err("auth = xoauth2 without OAuth settings".into()),
            };
            Tokens::new(
                self.tenant.clone(),
                endpoints,
                self.settings.ca_file.clone(),
            )
        });
        match tokens.access_token() {
            Ok(token) => {
                self.sign_in_logged = false;
                Ok(token)
            }
            Err(TokenError {
                why,
                sign_in,
                asked,
            }) => {
                // Unusable settings are told by the deferral lines; what
                // the endpoint said is logged, "sign in again" once.
                if asked && !(sign_in && self.sign_in_logged) {
                    log::error!("tenant {}: {why}", self.tenant);
                }
                self.sign_in_logged |= sign_in;
                Err((why, sign_in))
            }
        }
    }
}

impl Delivery for SmtpDelivery {
    fn open(&mut self) -> Result<Opened, OpenError> {
        self.connected = None;
        let mut settings = match &self.settings.client {
            Ok(settings) => settings.clone(),
            Err(why) => {
                return Err(OpenError::Unavailable {
                    relay: "-".into(),
                    reason: format!("tenant TLS settings unusable: {why}"),
                    repeat: false,
                })
            }
        };
        if self.settings.oauth.is_some() {
            match self.access_token() {
                Ok(token) => settings.bearer = Some(token),
                Err((reason, repeat)) => {
                    return Err(OpenError::Unavailable {
                        relay: settings.relay.to_string(),
                        reason,
                        repeat,
                    })
                }
            }
        }
        match client::open(&settings) {
            Ok(connected) => {
                let peer = connected.peer.clone();
                self.connected = Some(connected);
                Ok(Opened { peer })
            }
            Err(failure) => {
                if outcome::forgets_token(&failure.error) {
                    if let Some(tokens) = self.tokens.as_mut() {
                        tokens.forget();
                    }
                }
                Err(OpenError::Failed {
                    peer: failure.peer,
                    error: failure.error,
                })
            }
        }
    }

    fn send(
        &mut self,
        message: &Outgoing<'_>,
        mut body: &mut dyn Body,
    ) -> Result<Vec<Reply>, SessionError> {
        let Some(connected) = self.connected.as_mut() else {
            return Err(SessionError::Local("no open session".into()));
        };
        let result = connected.session.transaction(message, &mut body)?;
        Ok(result.per_recipient)
    }

    fn close(&mut self) {
        if let Some(connected) = self.connected.take() {
            connected.session.quit();
        }
    }

    fn abandon(&mut self) {
        self.connected = None;
    }
}
