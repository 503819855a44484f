//! The real `Delivery`: SMTP sessions to the tenant's relay with its own
//! settings (client::open, `Session::transaction`), and for `auth = xoauth2`
//! the access tokens, refreshed on this tenant's thread so a slow token
//! endpoint delays only this tenant.

use super::delivery::{Delivery, OpenError, Opened};
use super::settings::SmtpSettings;
use crate::base::names::TenantName;
use crate::base::secret::Secret;
use crate::oauth::{OAuthError, TokenSource};
use crate::outcome;
use crate::smtp::client::{self, Connected};
use crate::smtp::reply::Reply;
use crate::smtp::session::Outgoing;
use crate::smtp::SessionError;
use std::io::Read;

pub struct SmtpDelivery {
    tenant: TenantName,
    settings: SmtpSettings,
    /// Access tokens for `auth = xoauth2`, made on first use.
    tokens: Option<TokenSource>,
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
        if self.tokens.is_none() {
            let endpoints = match &self.settings.oauth {
                Some(Ok(endpoints)) => endpoints.clone(),
                Some(Err(why)) => return Err((why.clone(), false)),
                None => return Err(("auth = xoauth2 without OAuth settings".into(), false)),
            };
            let agent = crate::oauth::http_agent(self.settings.ca_file.as_deref())
                .map_err(|e| (e.to_string(), false))?;
            self.tokens = Some(TokenSource::new(endpoints, agent));
        }
        let Some(tokens) = self.tokens.as_mut() else {
            return Err(("no token source".into(), false));
        };
        match tokens.access_token() {
            Ok(token) => {
                self.sign_in_logged = false;
                Ok(token)
            }
            Err(e) => {
                let why = e.to_string().replace("TENANT", self.tenant.as_str());
                let sign_in = matches!(e, OAuthError::SignInNeeded(_));
                if !(sign_in && self.sign_in_logged) {
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
                        // The relay refused the token: fetch a fresh one next time.
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
        mut body: &mut dyn Read,
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
