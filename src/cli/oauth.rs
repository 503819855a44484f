//! `pbxmail oauth login --tenant T`: the OAuth 2.0 device authorization grant
//! (RFC 8628) for a tenant's mailbox. Prints where to sign in and the code,
//! waits as the server says, and stores the refresh token (0600, atomically)
//! where `oauth_token_file` says. The running daemon picks it up at its next try.

use super::{load_config, take_config_flag, Exit};
use crate::config::AuthMode;
use crate::oauth::{self, Endpoints, OAuthError};

pub fn run(args: &[String]) -> Exit {
    let (path, rest) = match take_config_flag(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pbxmail oauth: {e}");
            return Exit::Usage;
        }
    };
    let tenant_name = match rest.as_slice() {
        [login, flag, tenant] if login == "login" && flag == "--tenant" => tenant.clone(),
        _ => {
            eprintln!("usage: pbxmail oauth login --tenant T");
            return Exit::Usage;
        }
    };
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let tenant = match super::find_tenant(&config, &tenant_name, "oauth") {
        Ok(tenant) => tenant,
        Err(code) => return code,
    };
    if tenant.auth != AuthMode::XOAuth2 {
        eprintln!("pbxmail oauth: tenant {tenant_name} does not use auth = xoauth2");
        return Exit::Config;
    }
    let result = Endpoints::for_tenant(tenant).and_then(|endpoints| {
        let agent = oauth::http_agent(tenant.ca_file.as_deref())?;
        oauth::device_login(&endpoints, &agent, |line| println!("{line}"))
    });
    match result {
        Ok(()) => Exit::Ok,
        Err(e) => {
            eprintln!("pbxmail oauth: {e}");
            match e {
                OAuthError::Config(_) => Exit::Config,
                OAuthError::Temporary(_) => Exit::TempFail,
                OAuthError::SignInNeeded(_) | OAuthError::Denied(_) => Exit::DataErr,
            }
        }
    }
}
