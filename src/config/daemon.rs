//! `[daemon]`: the daemon-wide settings, their defaults and their checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::section::{Problems, Section};
use super::values::*;
use crate::base::names::TenantName;

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub spool_dir: PathBuf,
    pub archive_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Local SMTP submission; `None` = off.
    pub listen: Option<ListenAddr>,
    /// EHLO name.
    pub hostname: String,
    pub postmaster: Option<String>,
    pub default_tenant: Option<TenantName>,
    pub max_queue_lifetime: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub min_free_space: FreeSpace,
    pub log_level: log::LevelFilter,
    /// Local submission limits (`listen`).
    pub listen_limits: ListenLimits,
    /// How many relay sessions may be open at once.
    pub sessions: SessionLimits,
}

/// Simultaneous relay sessions: all tenants together, and to one relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `max_sessions`
    pub total: u32,
    /// `max_connections_per_relay`: per relay host:port, across tenants.
    pub per_relay: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            total: 500,
            per_relay: 20,
        }
    }
}

/// What one local SMTP client may do; past these it gets a 4xx or 5xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenLimits {
    pub max_message_size: u64,
    pub max_recipients: u32,
    pub idle_timeout: Duration,
    pub max_connections: u32,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            max_message_size: 50 << 20,
            max_recipients: 100,
            idle_timeout: Duration::from_secs(300),
            max_connections: 32,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            spool_dir: PathBuf::from("/var/spool/pbxmail"),
            archive_dir: PathBuf::from("/var/lib/pbxmail/archive"),
            control_socket: PathBuf::from("/run/pbxmail/control.sock"),
            listen: None,
            hostname: system_hostname(),
            postmaster: None,
            default_tenant: None,
            max_queue_lifetime: Duration::from_secs(5 * 86_400),
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            min_free_space: FreeSpace::Percent(5),
            log_level: log::LevelFilter::Info,
            listen_limits: ListenLimits::default(),
            sessions: SessionLimits::default(),
        }
    }
}

/// Where the loopback submission server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// Always a loopback address: the port takes unauthenticated mail.
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Below this much free space in the spool, new mail is refused with a temporary error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeSpace {
    Percent(u8),
    Bytes(u64),
}

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
/// How long mail may wait in the queue at most (README "Configuration").
pub(super) const QUEUE_LIFETIME: (Duration, Duration) = (SECOND, Duration::from_secs(30 * 86_400));
/// retry_min and retry_max.
pub(super) const RETRY: (Duration, Duration) = (SECOND, Duration::from_secs(7 * 86_400));
/// listen_idle_timeout, like the relay timeouts.
pub(super) const LISTEN_IDLE: (Duration, Duration) = (SECOND, HOUR);
/// listen_max_connections: each holds buffers allocated at start.
pub(super) const LISTEN_CONNECTIONS: (u32, u32) = (1, 10_000);
pub(super) const LISTEN_RECIPIENTS: (u32, u32) = (1, 10_000);
/// listen_max_message_size: 1 byte to 4 GiB.
pub(super) const LISTEN_MESSAGE_SIZE: (u64, u64) = (1, 4 << 30);
/// max_sessions and max_connections_per_relay: each session holds a socket
/// and spool files, and the daemon lowers the cap further to fit its open
/// file limit.
pub(super) const SESSIONS: (u32, u32) = (1, 100_000);

pub(super) const DAEMON_KEYS: &[&str] = &[
    "spool_dir",
    "archive_dir",
    "control_socket",
    "listen",
    "hostname",
    "postmaster",
    "default_tenant",
    "max_queue_lifetime",
    "retry_min",
    "retry_max",
    "min_free_space",
    "log_level",
    "listen_max_message_size",
    "listen_max_recipients",
    "listen_idle_timeout",
    "listen_max_connections",
    "max_sessions",
    "max_connections_per_relay",
];

pub(super) fn daemon_config(sec: &Section, out: &mut Problems) -> DaemonConfig {
    let d = DaemonConfig::default();
    let listen = sec.value(out, "listen", parse_listen);
    let limits = d.listen_limits;
    let listen_limits = ListenLimits {
        max_message_size: sec.value_or(
            out,
            "listen_max_message_size",
            size_within(LISTEN_MESSAGE_SIZE.0, LISTEN_MESSAGE_SIZE.1),
            limits.max_message_size,
        ),
        max_recipients: sec.value_or(
            out,
            "listen_max_recipients",
            count_within(LISTEN_RECIPIENTS.0, LISTEN_RECIPIENTS.1),
            limits.max_recipients,
        ),
        idle_timeout: sec.value_or(
            out,
            "listen_idle_timeout",
            duration_within(LISTEN_IDLE.0, LISTEN_IDLE.1),
            limits.idle_timeout,
        ),
        max_connections: sec.value_or(
            out,
            "listen_max_connections",
            count_within(LISTEN_CONNECTIONS.0, LISTEN_CONNECTIONS.1),
            limits.max_connections,
        ),
    };
    let sessions = SessionLimits {
        total: sec.value_or(
            out,
            "max_sessions",
            count_within(SESSIONS.0, SESSIONS.1),
            d.sessions.total,
        ),
        per_relay: sec.value_or(
            out,
            "max_connections_per_relay",
            count_within(SESSIONS.0, SESSIONS.1),
            d.sessions.per_relay,
        ),
    };
    let retry = duration_within(RETRY.0, RETRY.1);
    let retry_min = sec.value_or(out, "retry_min", &retry, d.retry_min);
    let retry_max = sec.value_or(out, "retry_max", &retry, d.retry_max);
    if retry_max < retry_min {
        let key = if sec.is_set("retry_max") {
            "retry_max"
        } else {
            "retry_min"
        };
        sec.error(
            out,
            key,
            &format!(
                "retry_max ({}s) is shorter than retry_min ({}s); raise retry_max or lower retry_min",
                retry_max.as_secs(),
                retry_min.as_secs()
            ),
        );
    }
    let hostname = sec
        .value(out, "hostname", |s| {
            check_domain(s.trim())
                .map(|()| s.trim().to_owned())
                .map_err(|e| format!("{e}; write this machine's DNS name, e.g. pbx.example.com"))
        })
        .unwrap_or(d.hostname);
    DaemonConfig {
        spool_dir: sec.value_or(out, "spool_dir", parse_absolute_path, d.spool_dir),
        archive_dir: sec.value_or(out, "archive_dir", parse_absolute_path, d.archive_dir),
        control_socket: sec.value_or(out, "control_socket", parse_absolute_path, d.control_socket),
        listen,
        hostname,
        postmaster: sec.value(out, "postmaster", parse_address),
        default_tenant: sec.value(out, "default_tenant", |s| TenantName::parse(s.trim())),
        max_queue_lifetime: sec.value_or(
            out,
            "max_queue_lifetime",
            duration_within(QUEUE_LIFETIME.0, QUEUE_LIFETIME.1),
            d.max_queue_lifetime,
        ),
        retry_min,
        retry_max,
        min_free_space: sec.value_or(out, "min_free_space", parse_free_space, d.min_free_space),
        log_level: sec.value_or(out, "log_level", parse_log_level, d.log_level),
        listen_limits,
        sessions,
    }
}

/// The EHLO name when `hostname` is not set.
fn system_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
