//! `[tenant:NAME]`: one tenant's relay, TLS, login, pacing and archive settings.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::provider::{Preset, Provider};
use super::section::{Problems, Section};
use super::values::*;

use crate::base::names::TenantName;
use crate::base::relay::{AuthMode, Relay, TlsMode};
use crate::base::secret::Secret;

#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    pub name: TenantName,
    /// Line of the `[tenant:NAME]` header.
    pub line: usize,
    pub domains: Vec<DomainPattern>,
    pub relay: Relay,
    pub tls: TlsMode,
    pub tls_verify: bool,
    pub ca_file: Option<PathBuf>,
    pub provider: Option<Provider>,
    pub auth: AuthMode,
    pub allow_plaintext_auth: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub oauth_token_url: Option<String>,
    pub oauth_device_url: Option<String>,
    /// Authorization endpoint for the code grant with PKCE (`oauth login`);
    /// may carry query parameters of its own, which are kept.
    pub oauth_auth_url: Option<String>,
    pub oauth_client_id: Option<String>,
    pub oauth_client_secret_file: Option<PathBuf>,
    pub oauth_scope: Option<String>,
    pub oauth_token_file: Option<PathBuf>,
    pub envelope_from: Option<String>,
    pub rate_limit: Option<RateLimit>,
    pub messages_per_session: u32,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub archive: bool,
    pub archive_users: ArchiveUsers,
    pub archive_group: Option<String>,
}

/// One entry of `domains`, lowercased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    Exact(String),
    /// `*.acme.example`, stored as the suffix `acme.example`.
    Wildcard(String),
}

impl DomainPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(suffix) = s.strip_prefix("*.") {
            check_domain(suffix)?;
            Ok(DomainPattern::Wildcard(suffix.to_owned()))
        } else if s.contains('*') {
            Err(format!(
                "{s:?}: a wildcard is written *.domain, e.g. *.acme.example \
                 (for senders no tenant claims, use default_tenant in [daemon])"
            ))
        } else {
            check_domain(&s)?;
            Ok(DomainPattern::Exact(s))
        }
    }

    /// Whether this pattern claims `domain`, which must already be lowercase:
    /// the plain rule the routing index (routes.rs) is tested against.
    #[cfg(test)]
    pub fn matches(&self, domain: &str) -> bool {
        match self {
            DomainPattern::Exact(exact) => exact == domain,
            DomainPattern::Wildcard(suffix) => domain
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// At most `messages` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub messages: u32,
    pub per: Duration,
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            1 => write!(f, "{}/s", self.messages),
            60 => write!(f, "{}/min", self.messages),
            3600 => write!(f, "{}/h", self.messages),
            86_400 => write!(f, "{}/day", self.messages),
            secs => write!(f, "{}/{}s", self.messages, secs),
        }
    }
}

/// Whose mail a tenant archives: every sender, or these local parts (extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveUsers {
    All,
    List(Vec<String>),
}

/// connect_timeout, command_timeout and data_timeout: 1 s to 1 h.
pub(super) const RELAY_TIMEOUT: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
pub(super) const MESSAGES_PER_SESSION: (u32, u32) = (1, 10_000);

pub(super) const TENANT_KEYS: &[&str] = &[
    "domains",
    "relay",
    "tls",
    "tls_verify",
    "ca_file",
    "provider",
    "auth",
    "allow_plaintext_auth",
    "username",
    "password",
    "password_file",
    "oauth_token_url",
    "oauth_device_url",
    "oauth_auth_url",
    "oauth_client_id",
    "oauth_client_secret_file",
    "oauth_scope",
    "oauth_token_file",
    "envelope_from",
    "rate_limit",
    "messages_per_session",
    "connect_timeout",
    "command_timeout",
    "data_timeout",
    "archive",
    "archive_users",
    "archive_group",
];

/// An authorization endpoint: an https URL (http only on loopback) whose own
/// query is kept, so nothing may follow it but the parameters `oauth login` adds.
fn parse_auth_url(s: &str) -> Result<String, String> {
    let url = parse_url(s)?;
    if url.contains('#') {
        return Err(format!(
            "{url:?} has a #fragment; an authorization endpoint has none (query parameters are kept)"
        ));
    }
    Ok(url)
}

/// A text the provider's preset fills in for a key the tenant left empty.
fn from_preset(
    preset: Option<&Preset>,
    field: impl FnOnce(&Preset) -> Option<&'static str>,
) -> Option<String> {
    preset.and_then(field).map(str::to_owned)
}

pub(super) fn tenant_config(
    sec: &Section,
    name: TenantName,
    line: usize,
    out: &mut Problems,
) -> TenantConfig {
    let provider = sec.value(out, "provider", parse_provider);
    let preset = provider.map(Provider::preset);

    let domains = sec.value(out, "domains", parse_domains).unwrap_or_default();
    if !sec.is_set("domains") {
        sec.error(
            out,
            "domains",
            "missing; list the sender domains of this tenant, e.g. domains = acme.example, *.acme.example",
        );
    }

    let relay = sec
        .value(out, "relay", parse_relay)
        .or_else(|| preset.as_ref().map(|p| p.relay.clone()));
    if !sec.is_set("relay") && preset.is_none() {
        sec.error(
            out,
            "relay",
            "missing; write the smarthost as host:port, e.g. relay = smtp.example.com:587, or set provider = office365 | gmail",
        );
    }
    // Only reached when an error has been recorded, so it never leaves this module.
    let relay = relay.unwrap_or(Relay {
        host: String::new(),
        port: 0,
    });

    let tls = sec.value_or(out, "tls", parse_tls, TlsMode::StartTls);
    let tls_verify = sec.value_or(out, "tls_verify", parse_bool, true);
    if !tls_verify {
        sec.warning(
            out,
            "tls_verify",
            "certificates of the relay are not verified; anyone on the path can read the password and the mail",
        );
    }
    let ca_file = sec.value(out, "ca_file", |s| {
        let path = PathBuf::from(s.trim());
        check_readable_file(&path, crate::base::fs::MAX_CA_FILE).map(|()| path)
    });

    let auth = sec.value_or(out, "auth", parse_auth, AuthMode::Auto);
    let allow_plaintext_auth = sec.value_or(out, "allow_plaintext_auth", parse_bool, false);
    let username = sec.value(out, "username", parse_string);

    let password = match (sec.is_set("password"), sec.is_set("password_file")) {
        (true, true) => {
            let later = if sec.line("password") > sec.line("password_file") {
                "password"
            } else {
                "password_file"
            };
            sec.error(
                out,
                later,
                "password and password_file are both set; keep one (password_file keeps the secret out of this file)",
            );
            None
        }
        (true, false) => sec.get("password").map(|p| Secret::new(p.to_owned())),
        (false, true) => sec.value(out, "password_file", |s| {
            read_password_file(Path::new(s.trim()))
        }),
        (false, false) => None,
    };
    let password_key = if sec.is_set("password_file") {
        "password_file"
    } else {
        "password"
    };
    let has_password = sec.is_set("password") || sec.is_set("password_file");
    match (&username, has_password, auth) {
        (Some(_), false, AuthMode::Auto | AuthMode::Plain | AuthMode::Login) => sec.error(
            out,
            "username",
            "is set but there is no password; add password_file = PATH (or password = ...), or set auth = none",
        ),
        (None, _, AuthMode::Plain | AuthMode::Login) => sec.error(
            out,
            "auth",
            &format!("{} needs username and password_file (or password)", auth.as_str()),
        ),
        (None, true, _) => sec.error(
            out,
            password_key,
            "is set but username is not; add username = the relay login",
        ),
        _ => {}
    }
    if tls == TlsMode::None && username.is_some() && !allow_plaintext_auth && auth != AuthMode::None
    {
        sec.warning(
            out,
            "tls",
            "none with allow_plaintext_auth = no: the password is never sent in plaintext, so this tenant's \
             mail is deferred until that changes; use tls = starttls, or allow_plaintext_auth = yes \
             for a trusted LAN relay (or auth = none if the relay needs no login)",
        );
    }

    // Each is the tenant's own value, else what its provider fills in.
    let preset = preset.as_ref();
    let oauth_token_url = sec
        .value(out, "oauth_token_url", parse_url)
        .or_else(|| from_preset(preset, |p| Some(p.oauth_token_url)));
    let oauth_device_url = sec
        .value(out, "oauth_device_url", parse_url)
        .or_else(|| from_preset(preset, |p| p.oauth_device_url));
    let oauth_auth_url = sec
        .value(out, "oauth_auth_url", parse_auth_url)
        .or_else(|| from_preset(preset, |p| p.oauth_auth_url));
    let oauth_scope = sec
        .value(out, "oauth_scope", parse_string)
        .or_else(|| from_preset(preset, |p| Some(p.oauth_scope)));

    let oauth_client_id = sec.value(out, "oauth_client_id", parse_string);
    let oauth_token_file = sec.value(out, "oauth_token_file", parse_absolute_path);
    if auth == AuthMode::XOAuth2 {
        let needed = [
            ("username", username.is_some(), "the mailbox's address"),
            (
                "oauth_token_url",
                oauth_token_url.is_some(),
                "or set provider",
            ),
            (
                "oauth_client_id",
                oauth_client_id.is_some(),
                "from the app registration",
            ),
            (
                "oauth_token_file",
                oauth_token_file.is_some(),
                "e.g. /var/lib/pbxmail/oauth/NAME.json",
            ),
        ];
        for (key, present, hint) in needed {
            if !present {
                sec.error(out, "auth", &format!("xoauth2 needs {key} ({hint})"));
            }
        }
    }

    let rate_limit = if sec.is_set("rate_limit") {
        sec.value(out, "rate_limit", parse_rate_limit).flatten()
    } else {
        preset.and_then(|p| p.rate_limit)
    };

    let archive = sec.value_or(out, "archive", parse_bool, false);
    let archive_group = sec.value(out, "archive_group", parse_group);
    if let (true, Some(group)) = (archive, &archive_group) {
        // Accepted (the group may be created later), but every archive
        // attempt fails until it exists: say so now, not at the first mail.
        if let Err(e) = crate::accounts::group_id(group) {
            sec.warning(
                out,
                "archive_group",
                &format!("{e}; archiving for this tenant fails (mail stays in the spool) until the group exists"),
            );
        }
    }

    TenantConfig {
        name,
        line,
        domains,
        relay,
        tls,
        tls_verify,
        ca_file,
        provider,
        auth,
        allow_plaintext_auth,
        username,
        password,
        oauth_token_url,
        oauth_device_url,
        oauth_auth_url,
        oauth_client_id,
        oauth_client_secret_file: sec.value(out, "oauth_client_secret_file", parse_absolute_path),
        oauth_scope,
        oauth_token_file,
        envelope_from: sec.value(out, "envelope_from", parse_address),
        rate_limit,
        messages_per_session: sec.value_or(
            out,
            "messages_per_session",
            count_within(MESSAGES_PER_SESSION.0, MESSAGES_PER_SESSION.1),
            20,
        ),
        connect_timeout: sec.value_or(
            out,
            "connect_timeout",
            duration_within(RELAY_TIMEOUT.0, RELAY_TIMEOUT.1),
            Duration::from_secs(30),
        ),
        command_timeout: sec.value_or(
            out,
            "command_timeout",
            duration_within(RELAY_TIMEOUT.0, RELAY_TIMEOUT.1),
            Duration::from_secs(5 * 60),
        ),
        data_timeout: sec.value_or(
            out,
            "data_timeout",
            duration_within(RELAY_TIMEOUT.0, RELAY_TIMEOUT.1),
            Duration::from_secs(10 * 60),
        ),
        archive,
        archive_users: sec.value_or(out, "archive_users", parse_archive_users, ArchiveUsers::All),
        archive_group,
    }
}
