//! A tenant's runtime settings, built in one place from its validated
//! configuration (ripgrep's two stages: config.rs validates, this builds).
//! Building reads files (ca_file, oauth_client_secret_file), so it runs on
//! the tenant's own thread, never on the dispatcher's. What cannot be built
//! is kept as the reason the tenant's mail waits, not as a failed start.

use super::pacing::Backoff;
use crate::base::names::TenantName;
use crate::config::{DaemonConfig, RateLimit, TenantConfig};
use crate::smtp::client::ClientSettings;
use crate::smtp::session::Timeouts;
use crate::tls;
use rustls::RootCertStore;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything a tenant worker needs that comes from the configuration.
#[derive(Clone)]
pub struct Settings {
    pub name: TenantName,
    pub policy: Policy,
    pub pacing: Pacing,
    pub smtp: SmtpSettings,
}

/// What settling mail needs: whom to bounce to, how long mail may wait, the archive.
#[derive(Debug, Clone)]
pub struct Policy {
    pub envelope_from: Option<String>,
    pub max_queue_lifetime: Duration,
    pub postmaster: Option<String>,
    pub hostname: String,
    /// The relay's host name as bounces name it ("unknown" when unusable).
    pub relay_host: String,
    /// `archive = yes`: where and for whom to journal sent mail.
    pub archive: Option<crate::archive::Policy>,
}

/// How often the tenant may try.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub backoff: Backoff,
    pub rate_limit: Option<RateLimit>,
    pub messages_per_session: usize,
}

/// What the SMTP side needs to open sessions.
#[derive(Clone)]
pub struct SmtpSettings {
    /// Err when the tenant's TLS settings are unusable: mail waits, with this reason.
    pub client: Result<ClientSettings, String>,
    /// `auth = xoauth2`: where tokens come from (Err: why they cannot).
    pub oauth: Option<Result<crate::oauth::Endpoints, String>>,
    pub ca_file: Option<PathBuf>,
}

impl Settings {
    /// Builds a tenant's settings; reads its ca_file and OAuth secret file.
    /// A part that cannot be built is logged once here and kept as the
    /// reason its mail stays queued.
    pub fn from_config(
        tenant: &TenantConfig,
        daemon: &DaemonConfig,
        roots: &Arc<RootCertStore>,
    ) -> Settings {
        let client = client_settings(tenant, daemon, roots);
        if let Err(e) = &client {
            log::error!(
                "tenant {}: {e}; its mail stays queued until the configuration is fixed",
                tenant.name
            );
        }
        let relay_host = match &client {
            Ok(client) => client.relay.host.clone(),
            Err(_) => "unknown".to_string(),
        };
        Settings {
            name: tenant.name.clone(),
            policy: Policy {
                envelope_from: tenant.envelope_from.clone(),
                max_queue_lifetime: daemon.max_queue_lifetime,
                postmaster: daemon.postmaster.clone(),
                hostname: daemon.hostname.clone(),
                relay_host,
                archive: tenant.archive.then(|| crate::archive::Policy {
                    root: daemon.archive_dir.clone(),
                    users: match &tenant.archive_users {
                        crate::config::ArchiveUsers::All => None,
                        crate::config::ArchiveUsers::List(users) => Some(users.clone()),
                    },
                    group: tenant.archive_group.clone(),
                    hostname: daemon.hostname.clone(),
                }),
            },
            pacing: Pacing {
                backoff: Backoff::new(daemon.retry_min, daemon.retry_max),
                rate_limit: tenant.rate_limit,
                messages_per_session: usize::try_from(tenant.messages_per_session.max(1))
                    .unwrap_or(usize::MAX),
            },
            smtp: SmtpSettings {
                client: client.map_err(|e| e.to_string()),
                oauth: (tenant.auth == crate::base::relay::AuthMode::XOAuth2).then(|| {
                    crate::oauth::Endpoints::for_tenant(tenant).map_err(|e| e.to_string())
                }),
                ca_file: tenant.ca_file.clone(),
            },
        }
    }
}

/// A tenant's SMTP client settings, as its worker and `pbxmail test` both
/// use them. Reads ca_file (through the TLS config).
pub fn client_settings(
    tenant: &TenantConfig,
    daemon: &DaemonConfig,
    roots: &Arc<RootCertStore>,
) -> Result<ClientSettings, tls::TlsError> {
    Ok(ClientSettings {
        hostname: daemon.hostname.clone(),
        relay: tenant.relay.clone(),
        tls_mode: tenant.tls,
        tls: tls::client_config(tenant.tls_verify, tenant.ca_file.as_deref(), roots)?,
        auth: tenant.auth,
        username: tenant.username.clone(),
        password: tenant.password.clone(),
        allow_plaintext_auth: tenant.allow_plaintext_auth,
        timeouts: Timeouts {
            connect: tenant.connect_timeout,
            command: tenant.command_timeout,
            data: tenant.data_timeout,
        },
        bearer: None,
    })
}
