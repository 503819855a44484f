//! The configuration file: reads pbxmail.ini and turns it into a validated [`Config`].
//! Two stages: INI text → raw sections (strings with line numbers) → typed values.
//! Every problem is collected and reported at once as `FILE:LINE: message`; what the
//! values mean at run time is left to the modules that use them.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_PATH: &str = "/etc/pbxmail/pbxmail.ini";

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// Everything wrong with a configuration file; the file is rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// One error or warning, located in the file where the admin has to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub tenants: Vec<TenantConfig>,
    /// Accepted but worth telling the admin (check-config prints them, the daemon logs them).
    pub warnings: Vec<Problem>,
}

impl Config {
    /// Tenant whose `domains` claim this domain: case-insensitive; an exact match wins
    /// over a `*.x` wildcard, and the longest wildcard wins among wildcards.
    /// `*.acme.example` matches `a.acme.example` and `b.a.acme.example`, not `acme.example`.
    pub fn tenant_for_domain(&self, domain: &str) -> Option<&TenantConfig> {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        let exact = self.tenants.iter().find(|t| {
            t.domains
                .iter()
                .any(|d| matches!(d, DomainPattern::Exact(e) if *e == domain))
        });
        if exact.is_some() {
            return exact;
        }
        self.tenants
            .iter()
            .flat_map(|t| t.domains.iter().map(move |d| (t, d)))
            .filter_map(|(t, d)| match d {
                DomainPattern::Wildcard(suffix) if d.matches(&domain) => Some((suffix.len(), t)),
                _ => None,
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, t)| t)
    }

    /// [`Config::tenant_for_domain`], falling back to `default_tenant`.
    pub fn tenant_for_sender_domain(&self, domain: &str) -> Option<&TenantConfig> {
        self.tenant_for_domain(domain).or_else(|| {
            self.daemon
                .default_tenant
                .as_ref()
                .and_then(|name| self.tenant(name))
        })
    }

    pub fn tenant(&self, name: &TenantName) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == *name)
    }
}

// Every interface key is parsed and validated now; some fields are read only
// by features still to come (local submission, bounces, OAuth, archive).
#[allow(dead_code)]
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

/// A tenant's name: `[a-z0-9._-]`, 1 to 64 characters, so it is safe in paths,
/// thread names and log lines.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TenantName(String);

impl TenantName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let valid_char = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-');
        if (1..=64).contains(&s.len()) && s.chars().all(valid_char) {
            return Ok(TenantName(s.to_owned()));
        }
        let hint = if s.chars().any(|c| c.is_ascii_uppercase()) {
            " (lowercase only)"
        } else {
            ""
        };
        Err(format!(
            "{s:?} is not a tenant name: use 1 to 64 of a-z, 0-9, '.', '_', '-'{hint}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TenantName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TenantName::parse(&s)
    }
}

impl From<TenantName> for String {
    fn from(name: TenantName) -> String {
        name.0
    }
}

// Every interface key is parsed and validated now; some fields are read only
// by features still to come (local submission, bounces, OAuth, archive).
#[allow(dead_code)]
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

    /// Whether this pattern claims `domain`, which must already be lowercase.
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

/// The smarthost a tenant delivers through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Host name or IP address, IPv6 without brackets.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS is required; never falls back to plaintext.
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
    None,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::StartTls => "starttls",
            TlsMode::Implicit => "implicit",
            TlsMode::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Office365,
    Gmail,
}

impl Provider {
    #[allow(dead_code)] // for status output
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Office365 => "office365",
            Provider::Gmail => "gmail",
        }
    }
}

/// What a provider fills in when the tenant's own key is empty.
struct Preset {
    relay: Relay,
    rate_limit: Option<RateLimit>,
    oauth_token_url: &'static str,
    oauth_device_url: &'static str,
    oauth_scope: &'static str,
}

impl Provider {
    fn preset(self) -> Preset {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Whatever the relay offers after TLS, if credentials are configured.
    Auto,
    Plain,
    Login,
    XOAuth2,
    None,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Auto => "auto",
            AuthMode::Plain => "plain",
            AuthMode::Login => "login",
            AuthMode::XOAuth2 => "xoauth2",
            AuthMode::None => "none",
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

/// A password or other credential. `Debug` hides it so it cannot leak into logs by accident.
/// Compared (for reload) but never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Secret(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// `$PBXMAIL_CONFIG`, else `/etc/pbxmail/pbxmail.ini` (`-c FILE` is the caller's business).
pub fn default_path() -> PathBuf {
    match std::env::var_os("PBXMAIL_CONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// Reads and validates the file; reports every problem, not just the first.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) => Err(ConfigError {
            problems: vec![Problem {
                file: path.to_owned(),
                line: None,
                message: format!("cannot read the configuration file: {e}"),
            }],
        }),
    }
}

/// Validates `text` as if read from `path`. Files the config points at
/// (`password_file`, `ca_file`) are still read from disk.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut out = Problems {
        file: path.to_owned(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let config = read_raw(text, &mut out).map(|raw| validate(path, &raw, &mut out));
    match config {
        Some(mut config) if out.errors.is_empty() => {
            out.warnings.sort_by_key(|p| p.line);
            config.warnings = out.warnings;
            Ok(config)
        }
        _ => {
            // Sorted so check-config reads top to bottom; cross-checks are found last.
            out.errors.sort_by_key(|p| p.line);
            Err(ConfigError {
                problems: out.errors,
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Value syntax (public: the CLI and tests parse the same forms)
// ---------------------------------------------------------------------------

/// `30s`, `5m`, `2h`, `5d`. The unit is required: a bare `30` is ambiguous.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let number = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = t.strip_prefix(number).unwrap_or_default();
    let number = number.trim_end();
    let hint = "write a number and a unit: 30s, 5m, 2h or 5d";
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{t:?} is not a duration; {hint}"));
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" => return Err(format!("{t:?} has no unit; {hint}")),
        _ => return Err(format!("{t:?} has an unknown unit {unit:?}; {hint}")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{t:?} is too large"))
}

/// `512K`, `25M`, `1G` (1024-based), or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let number = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = t.strip_prefix(number).unwrap_or_default();
    let number = number.trim_end();
    let hint = "write bytes or a number with K, M or G, e.g. 512K, 25M";
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{t:?} is not a size; {hint}"));
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        "t" | "tb" => 1 << 40,
        _ => return Err(format!("{t:?} has an unknown unit {unit:?}; {hint}")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{t:?} is too large"))
}

/// `yes`/`no`, `true`/`false`, `on`/`off`, in any case.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" => Ok(true),
        "no" | "false" | "off" => Ok(false),
        _ => Err(format!(
            "{:?} is not a boolean; write yes or no (true/false, on/off)",
            s.trim()
        )),
    }
}

fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{:?} must be longer than zero", s.trim())),
        d => Ok(d),
    }
}

fn parse_relay(s: &str) -> Result<Relay, String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(|| {
            format!("{s:?} has no closing ]; write [IPv6]:port, e.g. [2001:db8::25]:587")
        })?;
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{addr:?} in {s:?} is not an IPv6 address"));
        }
        let port = match after.strip_prefix(':') {
            Some(port) => port,
            None if after.is_empty() => {
                return Err(format!(
                    "{s:?} has no port; write [{addr}]:port, e.g. [{addr}]:587"
                ))
            }
            None => return Err(format!("{s:?}: expected :port after ]")),
        };
        (addr, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port; write host:port, e.g. {s}:587"))?;
        if host.contains(':') {
            return Err(format!(
                "{s:?}: write an IPv6 address in brackets with a port, e.g. [2001:db8::25]:587"
            ));
        }
        check_domain(host).map_err(|e| format!("relay host {e}"))?;
        (host, port)
    };
    let port = match port.parse::<u16>() {
        Ok(port) if port != 0 => port,
        _ => {
            return Err(format!(
                "{port:?} in {s:?} is not a port number (1-65535); the submission port is usually 587, or 465 with tls = implicit"
            ))
        }
    };
    Ok(Relay {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// A DNS name or IPv4 address, ASCII, labels of letters, digits and hyphens.
fn check_domain(d: &str) -> Result<(), String> {
    if d.is_empty() {
        return Err("is empty".to_owned());
    }
    if !d.is_ascii() {
        return Err(format!(
            "{d:?} is not ASCII; write internationalized domains in their xn-- form"
        ));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if d.len() > 253 || !d.split('.').all(label_ok) {
        return Err(format!("{d:?} is not a valid domain name"));
    }
    Ok(())
}

fn parse_domains(s: &str) -> Result<Vec<DomainPattern>, String> {
    let mut domains: Vec<DomainPattern> = Vec::new();
    // Empty items are skipped so a trailing comma is harmless.
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let pattern = DomainPattern::parse(item)?;
        if !domains.contains(&pattern) {
            domains.push(pattern);
        }
    }
    if domains.is_empty() {
        return Err("lists no domain".to_owned());
    }
    Ok(domains)
}

fn parse_address(s: &str) -> Result<String, String> {
    let s = s.trim();
    let bad =
        || format!("{s:?} is not an address; write local@domain, e.g. postmaster@pbx.example.com");
    let (local, domain) = s.rsplit_once('@').ok_or_else(bad)?;
    let local_ok = !local.is_empty()
        && !local
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ','));
    if !local_ok || check_domain(domain).is_err() {
        return Err(bad());
    }
    Ok(s.to_owned())
}

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    let s = s.trim();
    if s.starts_with('/') {
        return Ok(ListenAddr::Unix(PathBuf::from(s)));
    }
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("{s:?} is not ip:port; write 127.0.0.1:2525, [::1]:2525 or a unix socket path such as /run/pbxmail/submit.sock")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; submission is unauthenticated, so listen on 127.0.0.1, [::1] or a unix socket only"
        ));
    }
    Ok(ListenAddr::Tcp(addr))
}

fn parse_free_space(s: &str) -> Result<FreeSpace, String> {
    let s = s.trim();
    match s.strip_suffix('%') {
        Some(percent) => match percent.trim().parse::<u8>() {
            Ok(p) if p <= 99 => Ok(FreeSpace::Percent(p)),
            _ => Err(format!(
                "{s:?} is not a percentage from 0% to 99%; e.g. 5% or a size such as 100M"
            )),
        },
        None => parse_size(s)
            .map(FreeSpace::Bytes)
            .map_err(|e| format!("{e}, or a percentage such as 5%")),
    }
}

fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    use log::LevelFilter as L;
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Ok(L::Off),
        "error" => Ok(L::Error),
        "warn" => Ok(L::Warn),
        "info" => Ok(L::Info),
        "debug" => Ok(L::Debug),
        "trace" => Ok(L::Trace),
        _ => Err(format!(
            "{:?} is not a log level; write off, error, warn, info, debug or trace",
            s.trim()
        )),
    }
}

fn parse_tls(s: &str) -> Result<TlsMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "starttls" => Ok(TlsMode::StartTls),
        "implicit" => Ok(TlsMode::Implicit),
        "none" => Ok(TlsMode::None),
        _ => Err(format!(
            "{:?} is not a TLS mode; write starttls (port 587), implicit (port 465) or none",
            s.trim()
        )),
    }
}

fn parse_provider(s: &str) -> Result<Provider, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "office365" => Ok(Provider::Office365),
        "gmail" => Ok(Provider::Gmail),
        _ => Err(format!(
            "{:?} is not a known provider; write office365, gmail, or leave it empty and set relay",
            s.trim()
        )),
    }
}

fn parse_auth(s: &str) -> Result<AuthMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(AuthMode::Auto),
        "plain" => Ok(AuthMode::Plain),
        "login" => Ok(AuthMode::Login),
        "xoauth2" => Ok(AuthMode::XOAuth2),
        "none" => Ok(AuthMode::None),
        _ => Err(format!(
            "{:?} is not an auth mode; write auto, plain, login, xoauth2 or none",
            s.trim()
        )),
    }
}

/// `30/min`, `100/h`, `5/s`, `1000/day`, or `N/DURATION` (`10/5m`); `none` = unlimited,
/// which also overrides a provider's preset.
fn parse_rate_limit(s: &str) -> Result<Option<RateLimit>, String> {
    let s = s.trim();
    if matches!(s.to_ascii_lowercase().as_str(), "none" | "unlimited") {
        return Ok(None);
    }
    let hint = "write messages/interval, e.g. 30/min, 100/h, 5/s, 1000/day, or none";
    let (count, interval) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a rate; {hint}"))?;
    let messages = match count.trim().parse::<u32>() {
        Ok(n) if n >= 1 => n,
        _ => {
            return Err(format!(
                "{:?} in {s:?} is not a count of 1 or more; {hint}",
                count.trim()
            ))
        }
    };
    let per = match interval.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_nonzero_duration(other)
            .map_err(|_| format!("{:?} in {s:?} is not an interval; {hint}", interval.trim()))?,
    };
    Ok(Some(RateLimit { messages, per }))
}

/// A count of 1 or more (messages_per_session, listen limits).
fn parse_messages_per_session(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{:?} is not a whole number of 1 or more", s.trim())),
    }
}

fn parse_archive_users(s: &str) -> Result<ArchiveUsers, String> {
    if s.trim() == "*" {
        return Ok(ArchiveUsers::All);
    }
    let mut users: Vec<String> = Vec::new();
    for user in s.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        if user == "*" || user.contains('@') || user.chars().any(char::is_whitespace) {
            return Err(format!(
                "{user:?} is not a sender local part; write * or a list such as 101, 102"
            ));
        }
        if !users.iter().any(|u| u == user) {
            users.push(user.to_owned());
        }
    }
    if users.is_empty() {
        return Err("lists nobody; write * or a list such as 101, 102".to_owned());
    }
    Ok(ArchiveUsers::List(users))
}

fn parse_group(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.chars()
        .any(|c| c.is_whitespace() || c == ':' || c.is_control())
    {
        return Err(format!("{s:?} is not a group name"));
    }
    Ok(s.to_owned())
}

fn parse_absolute_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s.trim());
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!(
            "{:?} is a relative path; write an absolute one (the daemon runs from /)",
            s.trim()
        ))
    }
}

/// OAuth endpoints carry secrets, so plain http is only accepted on loopback (tests).
fn parse_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let loopback_http = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|prefix| {
            s.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
        });
    if (s.starts_with("https://") && s.len() > "https://".len()) || loopback_http {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not an https:// URL"))
    }
}

fn parse_string(s: &str) -> Result<String, String> {
    Ok(s.trim().to_owned())
}

fn check_readable_file(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) => Err(format!(
            "cannot read {}: {e}; check the path and that pbxmail's user may read it",
            path.display()
        )),
    }
}

fn read_password_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        // A path is named; anything else is not shown: admins sometimes type
        // the password itself here.
        let what = if path.is_absolute() {
            path.display().to_string()
        } else {
            "the file it names (not an absolute path; not shown)".to_string()
        };
        format!("cannot read {what}: {e}; check the path and that pbxmail's user may read it")
    })?;
    // Editors add a final newline that is not part of the password.
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(password.to_owned()))
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

// ---------------------------------------------------------------------------
// Stage 1: text → raw sections with line numbers
// ---------------------------------------------------------------------------

struct RawEntry {
    key: String,
    value: String,
    line: Option<usize>,
}

struct RawSection {
    /// `None` for keys before the first header (rust-ini's general section).
    name: Option<String>,
    line: Option<usize>,
    entries: Vec<RawEntry>,
}

/// Where things are, from a line scan; rust-ini reports no positions for keys.
struct ScannedSection {
    name: Option<String>,
    line: Option<usize>,
    keys: Vec<ScannedKey>,
}

struct ScannedKey {
    key: String,
    line: usize,
    /// `key =   ; comment`: rust-ini would return "; comment" as the value.
    comment_only: bool,
}

fn read_raw(text: &str, out: &mut Problems) -> Option<Vec<RawSection>> {
    let (normalized, layout) = scan(text, out)?;
    let options = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    let parsed = match ini::Ini::load_from_str_opt(&normalized, options) {
        Ok(parsed) => parsed,
        Err(e) => {
            out.error(Some(e.line), format!("syntax error: {}", e.msg));
            return None;
        }
    };

    // Pair rust-ini's sections and keys with the scan by occurrence: the n-th
    // `[x]` is the n-th scanned `[x]`, the n-th `k` in it the n-th scanned `k`.
    let mut section_seen: HashMap<Option<&str>, usize> = HashMap::new();
    let mut sections = Vec::new();
    for (name, props) in parsed.iter() {
        let nth = section_seen.entry(name).or_default();
        let scanned = layout
            .iter()
            .filter(|s| s.name.as_deref() == name)
            .nth(*nth);
        *nth += 1;
        let mut key_seen: HashMap<&str, usize> = HashMap::new();
        let entries: Vec<RawEntry> = props
            .iter()
            .map(|(key, value)| {
                let nth = key_seen.entry(key).or_default();
                let at = scanned.and_then(|s| s.keys.iter().filter(|k| k.key == key).nth(*nth));
                *nth += 1;
                let comment_only = at.is_some_and(|k| k.comment_only);
                RawEntry {
                    key: key.to_owned(),
                    value: if comment_only {
                        String::new()
                    } else {
                        value.trim().to_owned()
                    },
                    line: at.map(|k| k.line),
                }
            })
            .collect();
        if name.is_none() && entries.is_empty() {
            continue;
        }
        sections.push(RawSection {
            name: name.map(str::to_owned),
            line: scanned.and_then(|s| s.line),
            entries,
        });
    }
    Some(sections)
}

/// Checks the line structure and returns the text rust-ini should parse: comment
/// lines blanked and lines trimmed (rust-ini reads an indented `; comment` as part
/// of the next key), same line count, so its error lines stay right.
fn scan(text: &str, out: &mut Problems) -> Option<(String, Vec<ScannedSection>)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut normalized = String::with_capacity(text.len());
    let mut layout = vec![ScannedSection {
        name: None,
        line: None,
        keys: Vec::new(),
    }];
    let mut ok = true;
    for (index, raw) in text.split('\n').enumerate() {
        let n = index + 1;
        let line = raw.trim();
        if index > 0 {
            normalized.push('\n');
        }
        if line.is_empty() || line.starts_with([';', '#']) {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            match rest.split_once(']') {
                None => {
                    out.error(Some(n), "section header has no closing ]".to_owned());
                    ok = false;
                }
                Some((_, after))
                    if !(after.trim().is_empty() || after.trim_start().starts_with([';', '#'])) =>
                {
                    out.error(
                        Some(n),
                        "unexpected text after the section header's ]".to_owned(),
                    );
                    ok = false;
                }
                Some((name, _)) => layout.push(ScannedSection {
                    name: Some(name.trim().to_owned()),
                    line: Some(n),
                    keys: Vec::new(),
                }),
            }
        } else if let Some((key, value)) = line.split_once(['=', ':']) {
            if key.trim().is_empty() {
                out.error(
                    Some(n),
                    "a line starts with = but has no key before it".to_owned(),
                );
                ok = false;
            } else if line.ends_with('\\') {
                // rust-ini would join the next line to this one; nobody expects that here.
                out.error(
                    Some(n),
                    format!(
                        "{}: a value may not end with \\ (it would continue on the next line); \
                         put such a password in password_file",
                        key.trim()
                    ),
                );
                ok = false;
            } else if let Some(current) = layout.last_mut() {
                current.keys.push(ScannedKey {
                    key: key.trim().to_owned(),
                    line: n,
                    comment_only: value.starts_with([' ', '\t'])
                        && value.trim_start().starts_with([';', '#']),
                });
            }
        } else {
            // The line's text is not echoed: it may be a password written without a key.
            out.error(
                Some(n),
                "expected key = value, a [section] header or a ; comment".to_owned(),
            );
            ok = false;
        }
        normalized.push_str(line);
    }
    ok.then_some((normalized, layout))
}

// ---------------------------------------------------------------------------
// Stage 2: raw sections → validated Config
// ---------------------------------------------------------------------------

const DAEMON_KEYS: &[&str] = &[
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
];

const TENANT_KEYS: &[&str] = &[
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

struct Problems {
    file: PathBuf,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Problems {
    fn error(&mut self, line: Option<usize>, message: String) {
        self.errors.push(Problem {
            file: self.file.clone(),
            line,
            message,
        });
    }

    fn warning(&mut self, line: Option<usize>, message: String) {
        self.warnings.push(Problem {
            file: self.file.clone(),
            line,
            message,
        });
    }
}

/// One section's keys after checking names; values are read by key name.
struct Section<'a> {
    /// `[daemon]` or `[tenant:acme]`, the prefix of every message.
    label: String,
    line: Option<usize>,
    values: HashMap<&'static str, &'a RawEntry>,
}

impl<'a> Section<'a> {
    fn new(
        raw: &'a RawSection,
        label: String,
        known: &'static [&'static str],
        elsewhere: (&str, &[&str]),
        out: &mut Problems,
    ) -> Self {
        let mut values: HashMap<&'static str, &'a RawEntry> = HashMap::new();
        for entry in &raw.entries {
            let Some(key) = known.iter().copied().find(|k| *k == entry.key) else {
                let hint = if elsewhere.1.contains(&entry.key.as_str()) {
                    format!("; it belongs in {}", elsewhere.0)
                } else {
                    closest(&entry.key, known)
                        .map(|k| format!("; did you mean {k}?"))
                        .unwrap_or_default()
                };
                // Only a word that looks like a key is quoted back: a line such
                // as "S3cret:pw" is a password pasted without its key.
                let looks_like_key = !entry.key.is_empty()
                    && entry.key.len() <= 40
                    && entry
                        .key
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                let message = if looks_like_key {
                    format!("{label} unknown key {:?}{hint}", entry.key)
                } else {
                    format!(
                        "{label} this line is not a known key (not shown: it may be a password \
                         pasted without \"password =\"); write key = value"
                    )
                };
                out.error(entry.line, message);
                continue;
            };
            if let Some(first) = values.get(key) {
                let at = first
                    .line
                    .map(|l| format!(" (first at line {l})"))
                    .unwrap_or_default();
                out.error(
                    entry.line,
                    format!("{label} {key}: given twice{at}; keep one"),
                );
                continue;
            }
            values.insert(key, entry);
        }
        Section {
            label,
            line: raw.line,
            values,
        }
    }

    /// An absent section: every key takes its default.
    fn empty(label: &str) -> Self {
        Section {
            label: label.to_owned(),
            line: None,
            values: HashMap::new(),
        }
    }

    /// The non-empty value of `key`; an empty value means "default".
    fn get(&self, key: &str) -> Option<&'a str> {
        self.values
            .get(key)
            .map(|e| e.value.as_str())
            .filter(|v| !v.is_empty())
    }

    fn is_set(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The key's line, else the section header's (where a missing key belongs).
    fn line(&self, key: &str) -> Option<usize> {
        self.values.get(key).and_then(|e| e.line).or(self.line)
    }

    /// Parses `key` if set; a bad value becomes an error at its line and `None`.
    fn value<T>(
        &self,
        out: &mut Problems,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self.get(key)?;
        match parse(raw) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(out, key, &e);
                None
            }
        }
    }

    fn error(&self, out: &mut Problems, key: &str, message: &str) {
        out.error(self.line(key), format!("{} {key}: {message}", self.label));
    }

    fn warning(&self, out: &mut Problems, key: &str, message: &str) {
        out.warning(self.line(key), format!("{} {key}: {message}", self.label));
    }
}

/// The known key nearest to a misspelt one, if it is close enough to be a typo.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        // Walks the previous row as (diagonal, above) pairs; the left cell is cur's last.
        for (cb, (&diagonal, &above)) in b.iter().zip(prev.iter().zip(prev.iter().skip(1))) {
            let left = cur.last().copied().unwrap_or_default();
            let substitute = diagonal + usize::from(ca != *cb);
            cur.push(substitute.min(above + 1).min(left + 1));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or_default()
}

fn validate(path: &Path, raw: &[RawSection], out: &mut Problems) -> Config {
    let mut daemon: Option<Section> = None;
    let mut tenant_sections: Vec<(TenantName, usize, Section)> = Vec::new();
    let tenant_label = "[tenant:NAME]";
    for section in raw {
        let Some(name) = section.name.as_deref() else {
            for entry in &section.entries {
                out.error(
                    entry.line,
                    format!(
                        "{} is outside any section; put it under [daemon] or [tenant:NAME]",
                        entry.key
                    ),
                );
            }
            continue;
        };
        if name == "daemon" {
            if let Some(first) = &daemon {
                let at = first
                    .line
                    .map(|l| format!(" (first at line {l})"))
                    .unwrap_or_default();
                out.error(
                    section.line,
                    format!("[daemon] given twice{at}; merge the two"),
                );
            } else {
                let label = "[daemon]".to_owned();
                daemon = Some(Section::new(
                    section,
                    label,
                    DAEMON_KEYS,
                    (tenant_label, TENANT_KEYS),
                    out,
                ));
            }
        } else if let Some(tenant) = name.strip_prefix("tenant:") {
            let tenant = match TenantName::parse(tenant.trim()) {
                Ok(t) => t,
                Err(e) => {
                    out.error(section.line, format!("[{name}]: {e}"));
                    continue;
                }
            };
            if let Some((_, first, _)) = tenant_sections.iter().find(|(t, _, _)| *t == tenant) {
                out.error(
                    section.line,
                    format!("[tenant:{tenant}] given twice (first at line {first}); merge the two or rename one"),
                );
                continue;
            }
            let label = format!("[tenant:{tenant}]");
            let parsed = Section::new(section, label, TENANT_KEYS, ("[daemon]", DAEMON_KEYS), out);
            tenant_sections.push((tenant, section.line.unwrap_or_default(), parsed));
        } else {
            let hint = if name == "tenant" {
                "; name the tenant: [tenant:NAME]".to_owned()
            } else {
                closest(name, &["daemon"])
                    .map(|k| format!("; did you mean [{k}]?"))
                    .unwrap_or_else(|| "; the sections are [daemon] and [tenant:NAME]".to_owned())
            };
            out.error(section.line, format!("unknown section [{name}]{hint}"));
        }
    }

    let daemon_section = daemon.unwrap_or_else(|| Section::empty("[daemon]"));
    let mut daemon = daemon_config(&daemon_section, out);

    let mut tenants: Vec<TenantConfig> = Vec::new();
    let mut claimed: HashMap<DomainPattern, (TenantName, usize)> = HashMap::new();
    for (name, line, section) in &tenant_sections {
        let tenant = tenant_config(section, name.clone(), *line, out);
        for domain in &tenant.domains {
            if let Some((owner, owner_line)) = claimed.get(domain) {
                section.error(
                    out,
                    "domains",
                    &format!(
                        "{:?} is already claimed by [tenant:{owner}] (line {owner_line}); a domain belongs to exactly one tenant",
                        domain.to_string()
                    ),
                );
            } else {
                claimed.insert(domain.clone(), (name.clone(), *line));
            }
        }
        tenants.push(tenant);
    }

    if let Some(default) = &daemon.default_tenant {
        if !tenants.iter().any(|t| t.name == *default) {
            let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
            let choice = if names.is_empty() {
                "there are no tenants".to_owned()
            } else {
                format!("configured tenants: {}", names.join(", "))
            };
            daemon_section.error(
                out,
                "default_tenant",
                &format!("there is no [tenant:{default}] section; {choice}"),
            );
            daemon.default_tenant = None;
        }
    }
    if tenant_sections.is_empty() {
        out.warning(
            None,
            "no [tenant:NAME] section: mail is accepted into the spool but cannot be delivered"
                .to_owned(),
        );
    }

    Config {
        path: path.to_owned(),
        daemon,
        tenants,
        warnings: Vec::new(),
    }
}

fn daemon_config(sec: &Section, out: &mut Problems) -> DaemonConfig {
    let d = DaemonConfig::default();
    let listen = sec.value(out, "listen", parse_listen);
    let limits = d.listen_limits;
    let listen_limits = ListenLimits {
        max_message_size: sec
            .value(out, "listen_max_message_size", parse_size)
            .unwrap_or(limits.max_message_size),
        max_recipients: sec
            .value(out, "listen_max_recipients", parse_messages_per_session)
            .unwrap_or(limits.max_recipients),
        idle_timeout: sec
            .value(out, "listen_idle_timeout", parse_nonzero_duration)
            .unwrap_or(limits.idle_timeout),
        max_connections: sec
            .value(out, "listen_max_connections", parse_messages_per_session)
            .unwrap_or(limits.max_connections),
    };
    let retry_min = sec
        .value(out, "retry_min", parse_nonzero_duration)
        .unwrap_or(d.retry_min);
    let retry_max = sec
        .value(out, "retry_max", parse_nonzero_duration)
        .unwrap_or(d.retry_max);
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
        spool_dir: sec
            .value(out, "spool_dir", parse_absolute_path)
            .unwrap_or(d.spool_dir),
        archive_dir: sec
            .value(out, "archive_dir", parse_absolute_path)
            .unwrap_or(d.archive_dir),
        control_socket: sec
            .value(out, "control_socket", parse_absolute_path)
            .unwrap_or(d.control_socket),
        listen,
        hostname,
        postmaster: sec.value(out, "postmaster", parse_address),
        default_tenant: sec.value(out, "default_tenant", |s| TenantName::parse(s.trim())),
        max_queue_lifetime: sec
            .value(out, "max_queue_lifetime", parse_nonzero_duration)
            .unwrap_or(d.max_queue_lifetime),
        retry_min,
        retry_max,
        min_free_space: sec
            .value(out, "min_free_space", parse_free_space)
            .unwrap_or(d.min_free_space),
        log_level: sec
            .value(out, "log_level", parse_log_level)
            .unwrap_or(d.log_level),
        listen_limits,
    }
}

fn tenant_config(sec: &Section, name: TenantName, line: usize, out: &mut Problems) -> TenantConfig {
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

    let tls = sec
        .value(out, "tls", parse_tls)
        .unwrap_or(TlsMode::StartTls);
    let tls_verify = sec.value(out, "tls_verify", parse_bool).unwrap_or(true);
    if !tls_verify {
        sec.warning(
            out,
            "tls_verify",
            "certificates of the relay are not verified; anyone on the path can read the password and the mail",
        );
    }
    let ca_file = sec.value(out, "ca_file", |s| {
        let path = PathBuf::from(s.trim());
        check_readable_file(&path).map(|()| path)
    });

    let auth = sec.value(out, "auth", parse_auth).unwrap_or(AuthMode::Auto);
    let allow_plaintext_auth = sec
        .value(out, "allow_plaintext_auth", parse_bool)
        .unwrap_or(false);
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

    let oauth_token_url = sec
        .value(out, "oauth_token_url", parse_url)
        .or_else(|| preset.as_ref().map(|p| p.oauth_token_url.to_owned()));
    let oauth_device_url = sec
        .value(out, "oauth_device_url", parse_url)
        .or_else(|| preset.as_ref().map(|p| p.oauth_device_url.to_owned()));
    let oauth_scope = sec
        .value(out, "oauth_scope", parse_string)
        .or_else(|| preset.as_ref().map(|p| p.oauth_scope.to_owned()));

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
        preset.as_ref().and_then(|p| p.rate_limit)
    };

    let archive = sec.value(out, "archive", parse_bool).unwrap_or(false);

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
        oauth_client_id,
        oauth_client_secret_file: sec.value(out, "oauth_client_secret_file", parse_absolute_path),
        oauth_scope,
        oauth_token_file,
        envelope_from: sec.value(out, "envelope_from", parse_address),
        rate_limit,
        messages_per_session: sec
            .value(out, "messages_per_session", parse_messages_per_session)
            .unwrap_or(20),
        connect_timeout: sec
            .value(out, "connect_timeout", parse_nonzero_duration)
            .unwrap_or(Duration::from_secs(30)),
        command_timeout: sec
            .value(out, "command_timeout", parse_nonzero_duration)
            .unwrap_or(Duration::from_secs(5 * 60)),
        data_timeout: sec
            .value(out, "data_timeout", parse_nonzero_duration)
            .unwrap_or(Duration::from_secs(10 * 60)),
        archive,
        archive_users: sec
            .value(out, "archive_users", parse_archive_users)
            .unwrap_or(ArchiveUsers::All),
        archive_group: sec.value(out, "archive_group", parse_group),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> PathBuf {
        PathBuf::from("pbxmail.ini")
    }

    /// A fresh directory per test (tests run in parallel).
    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pbxmail-config-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ok(text: &str) -> Config {
        match parse(&path(), text) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(&path(), text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.problems,
        }
    }

    /// The one error the text has: its line and message.
    fn one_error(text: &str) -> (Option<usize>, String) {
        let p = problems(text);
        assert_eq!(p.len(), 1, "expected exactly one problem, got {p:#?}");
        (p[0].line, p[0].message.clone())
    }

    const MINIMAL: &str = "[tenant:acme]\ndomains = acme.example\nrelay = smtp.acme.example:587\n";

    #[test]
    fn full_config_with_every_key() {
        let dir = temp_dir("full");
        let secret = dir.join("acme.secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let text = format!(
            "[daemon]
spool_dir = /srv/spool
archive_dir = /srv/archive
control_socket = /srv/control.sock
listen = 127.0.0.1:2525        ; local submission
hostname = pbx.example.com
postmaster = postmaster@pbx.example.com
default_tenant = acme
max_queue_lifetime = 3d
retry_min = 30s
retry_max = 2h
min_free_space = 100M
log_level = debug

[tenant:acme]
domains = Acme.Example, *.acme.example
relay = [2001:db8::25]:465
tls = implicit
tls_verify = no
ca_file = {ca}
provider = office365
auth = xoauth2
allow_plaintext_auth = yes
username = pbx@acme.example
password_file = {secret}
oauth_token_url = https://login.example/token
oauth_device_url = https://login.example/device
oauth_client_id = abc-123
oauth_client_secret_file = /etc/pbxmail/acme.client
oauth_scope = https://outlook.office.com/SMTP.Send offline_access
oauth_token_file = /var/lib/pbxmail/oauth/acme.json
envelope_from = pbx@acme.example
rate_limit = 100/h
messages_per_session = 5
connect_timeout = 10s
command_timeout = 2m
data_timeout = 20m
archive = yes
archive_users = 101, 102
archive_group = acme-admins
",
            ca = ca.display(),
            secret = secret.display()
        );
        let c = ok(&text);
        let d = &c.daemon;
        assert_eq!(d.spool_dir, PathBuf::from("/srv/spool"));
        assert_eq!(d.archive_dir, PathBuf::from("/srv/archive"));
        assert_eq!(d.control_socket, PathBuf::from("/srv/control.sock"));
        assert_eq!(
            d.listen,
            Some(ListenAddr::Tcp("127.0.0.1:2525".parse().unwrap()))
        );
        assert_eq!(d.hostname, "pbx.example.com");
        assert_eq!(d.postmaster.as_deref(), Some("postmaster@pbx.example.com"));
        assert_eq!(d.default_tenant, Some(TenantName::parse("acme").unwrap()));
        assert_eq!(d.max_queue_lifetime, Duration::from_secs(3 * 86_400));
        assert_eq!(d.retry_min, Duration::from_secs(30));
        assert_eq!(d.retry_max, Duration::from_secs(7200));
        assert_eq!(d.min_free_space, FreeSpace::Bytes(100 << 20));
        assert_eq!(d.log_level, log::LevelFilter::Debug);

        let t = &c.tenants[0];
        assert_eq!(t.name.as_str(), "acme");
        assert_eq!(t.line, 15);
        assert_eq!(
            t.domains,
            vec![
                DomainPattern::Exact("acme.example".into()),
                DomainPattern::Wildcard("acme.example".into())
            ]
        );
        assert_eq!(
            t.relay,
            Relay {
                host: "2001:db8::25".into(),
                port: 465
            }
        );
        assert_eq!(t.relay.to_string(), "[2001:db8::25]:465");
        assert_eq!(t.tls, TlsMode::Implicit);
        assert!(!t.tls_verify);
        assert_eq!(t.ca_file.as_deref(), Some(ca.as_path()));
        assert_eq!(t.provider, Some(Provider::Office365));
        assert_eq!(t.auth, AuthMode::XOAuth2);
        assert!(t.allow_plaintext_auth);
        assert_eq!(t.username.as_deref(), Some("pbx@acme.example"));
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("s3cret"));
        assert_eq!(
            t.oauth_token_url.as_deref(),
            Some("https://login.example/token")
        );
        assert_eq!(
            t.oauth_device_url.as_deref(),
            Some("https://login.example/device")
        );
        assert_eq!(t.oauth_client_id.as_deref(), Some("abc-123"));
        assert_eq!(
            t.oauth_client_secret_file.as_deref(),
            Some(Path::new("/etc/pbxmail/acme.client"))
        );
        assert_eq!(
            t.oauth_scope.as_deref(),
            Some("https://outlook.office.com/SMTP.Send offline_access")
        );
        assert_eq!(
            t.oauth_token_file.as_deref(),
            Some(Path::new("/var/lib/pbxmail/oauth/acme.json"))
        );
        assert_eq!(t.envelope_from.as_deref(), Some("pbx@acme.example"));
        assert_eq!(
            t.rate_limit,
            Some(RateLimit {
                messages: 100,
                per: Duration::from_secs(3600)
            })
        );
        assert_eq!(t.messages_per_session, 5);
        assert_eq!(t.connect_timeout, Duration::from_secs(10));
        assert_eq!(t.command_timeout, Duration::from_secs(120));
        assert_eq!(t.data_timeout, Duration::from_secs(1200));
        assert!(t.archive);
        assert_eq!(
            t.archive_users,
            ArchiveUsers::List(vec!["101".into(), "102".into()])
        );
        assert_eq!(t.archive_group.as_deref(), Some("acme-admins"));

        // Accepted, but the admin is told: unverified certificates and features still to come.
        let warnings: Vec<(Option<usize>, &str)> = c
            .warnings
            .iter()
            .map(|w| (w.line, w.message.as_str()))
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert_eq!(warnings[0].0, Some(19));
        assert!(warnings[0]
            .1
            .contains("certificates of the relay are not verified"));
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let c = ok(MINIMAL);
        assert_eq!(c.path, path());
        let d = &c.daemon;
        assert_eq!(d.spool_dir, PathBuf::from("/var/spool/pbxmail"));
        assert_eq!(d.archive_dir, PathBuf::from("/var/lib/pbxmail/archive"));
        assert_eq!(d.control_socket, PathBuf::from("/run/pbxmail/control.sock"));
        assert_eq!(d.listen, None);
        assert!(!d.hostname.is_empty());
        assert_eq!(d.postmaster, None);
        assert_eq!(d.default_tenant, None);
        assert_eq!(d.max_queue_lifetime, Duration::from_secs(5 * 86_400));
        assert_eq!(d.retry_min, Duration::from_secs(60));
        assert_eq!(d.retry_max, Duration::from_secs(3600));
        assert_eq!(d.min_free_space, FreeSpace::Percent(5));
        assert_eq!(d.log_level, log::LevelFilter::Info);

        let t = &c.tenants[0];
        assert_eq!(t.line, 1);
        assert_eq!(
            t.relay,
            Relay {
                host: "smtp.acme.example".into(),
                port: 587
            }
        );
        assert_eq!(t.relay.to_string(), "smtp.acme.example:587");
        assert_eq!(t.tls, TlsMode::StartTls);
        assert!(t.tls_verify);
        assert_eq!(t.ca_file, None);
        assert_eq!(t.provider, None);
        assert_eq!(t.auth, AuthMode::Auto);
        assert!(!t.allow_plaintext_auth);
        assert!(t.username.is_none() && t.password.is_none());
        assert!(t.oauth_token_url.is_none() && t.oauth_scope.is_none());
        assert_eq!(t.rate_limit, None);
        assert_eq!(t.messages_per_session, 20);
        assert_eq!(t.connect_timeout, Duration::from_secs(30));
        assert_eq!(t.command_timeout, Duration::from_secs(300));
        assert_eq!(t.data_timeout, Duration::from_secs(600));
        assert!(!t.archive);
        assert_eq!(t.archive_users, ArchiveUsers::All);
        assert_eq!(t.archive_group, None);
        assert!(c.warnings.is_empty(), "{:#?}", c.warnings);
    }

    #[test]
    fn empty_values_and_comment_only_values_mean_default() {
        let c = ok("[daemon]\nlisten =\ndefault_tenant =      ; empty = refuse\n  ; an indented comment\nlog_level = warn\n[tenant:acme]\ndomains = acme.example\nrelay = smtp.acme.example:587\nrate_limit =\n");
        assert_eq!(c.daemon.listen, None);
        assert_eq!(c.daemon.default_tenant, None);
        assert_eq!(c.daemon.log_level, log::LevelFilter::Warn);
        assert_eq!(c.tenants[0].rate_limit, None);
    }

    #[test]
    fn no_tenant_is_valid_but_warned() {
        let c = ok("[daemon]\nlog_level = info\n");
        assert!(c.tenants.is_empty());
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].message.contains("no [tenant:NAME]"));
    }

    #[test]
    fn unknown_key_is_reported_at_its_line_with_a_suggestion() {
        let p = problems(&format!("{MINIMAL}\nrelay_host = x\nconect_timeout = 5s\n"));
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].line, Some(5));
        assert!(
            p[0].message.contains("unknown key \"relay_host\""),
            "{}",
            p[0].message
        );
        assert_eq!(p[1].line, Some(6));
        assert!(
            p[1].message.contains("did you mean connect_timeout?"),
            "{}",
            p[1].message
        );
        assert_eq!(p[1].to_string(), format!("pbxmail.ini:6: {}", p[1].message));
    }

    #[test]
    fn key_of_the_other_section_says_where_it_belongs() {
        let (line, msg) = one_error(&format!("[daemon]\nrelay = a.example:25\n{MINIMAL}"));
        assert_eq!(line, Some(2));
        assert!(msg.contains("it belongs in [tenant:NAME]"), "{msg}");
    }

    #[test]
    fn unknown_section_is_reported_at_its_header() {
        let (line, msg) = one_error(&format!("{MINIMAL}\n[deamon]\nlog_level = info\n"));
        assert_eq!(line, Some(5));
        assert!(
            msg.contains("unknown section [deamon]; did you mean [daemon]?"),
            "{msg}"
        );
    }

    #[test]
    fn key_outside_any_section_is_an_error() {
        let (line, msg) = one_error(&format!("log_level = info\n{MINIMAL}"));
        assert_eq!(line, Some(1));
        assert!(msg.contains("outside any section"), "{msg}");
    }

    #[test]
    fn bad_duration_names_key_and_value() {
        let (line, msg) = one_error("[daemon]\nretry_min = 1m\nretry_max = 30\n");
        assert_eq!(line, Some(3));
        assert_eq!(
            msg,
            "[daemon] retry_max: \"30\" has no unit; write a number and a unit: 30s, 5m, 2h or 5d"
        );
        let (line, msg) = one_error(&format!("{MINIMAL}data_timeout = 10 minutes\n"));
        assert_eq!(line, Some(4));
        assert!(msg.starts_with("[tenant:acme] data_timeout:"), "{msg}");
    }

    #[test]
    fn relay_without_port_tells_how_to_write_it() {
        let (line, msg) =
            one_error("[tenant:acme]\ndomains = acme.example\nrelay = smtp.example.com\n");
        assert_eq!(line, Some(3));
        assert_eq!(
            msg,
            "[tenant:acme] relay: \"smtp.example.com\" has no port; write host:port, e.g. smtp.example.com:587"
        );
    }

    #[test]
    fn relay_with_bad_port_is_an_error() {
        for relay in [
            "smtp.example.com:smtp",
            "smtp.example.com:0",
            "smtp.example.com:70000",
            "[::1]:x",
        ] {
            let (line, msg) = one_error(&format!(
                "[tenant:acme]\ndomains = acme.example\nrelay = {relay}\n"
            ));
            assert_eq!(line, Some(3), "{relay}");
            assert!(msg.contains("is not a port number"), "{relay}: {msg}");
        }
        let (_, msg) =
            one_error("[tenant:acme]\ndomains = acme.example\nrelay = 2001:db8::1:587\n");
        assert!(msg.contains("in brackets"), "{msg}");
    }

    #[test]
    fn empty_or_missing_relay_is_an_error() {
        let (line, msg) = one_error("[tenant:acme]\ndomains = acme.example\nrelay =\n");
        assert_eq!(line, Some(3));
        assert!(msg.starts_with("[tenant:acme] relay: missing"), "{msg}");
        let (line, _) = one_error("\n[tenant:acme]\ndomains = acme.example\n");
        assert_eq!(
            line,
            Some(2),
            "a missing key is reported at the section header"
        );
    }

    #[test]
    fn provider_presets_fill_relay_and_rate_but_explicit_keys_win() {
        let c = ok("[tenant:a]\ndomains = a.example\nprovider = office365\n[tenant:b]\ndomains = b.example\nprovider = office365\nrelay = smtp.b.example:25\nrate_limit = none\n[tenant:g]\ndomains = g.example\nprovider = gmail\n");
        let a = &c.tenants[0];
        assert_eq!(a.relay.to_string(), "smtp.office365.com:587");
        assert_eq!(a.tls, TlsMode::StartTls);
        assert_eq!(
            a.rate_limit,
            Some(RateLimit {
                messages: 30,
                per: Duration::from_secs(60)
            })
        );
        assert!(a.oauth_token_url.is_some());
        let b = &c.tenants[1];
        assert_eq!(b.relay.to_string(), "smtp.b.example:25");
        assert_eq!(b.rate_limit, None);
        let g = &c.tenants[2];
        assert_eq!(g.relay.to_string(), "smtp.gmail.com:587");
        assert_eq!(g.rate_limit, None);
    }

    #[test]
    fn duplicate_domain_across_tenants_names_both() {
        let p = problems("[tenant:a]\ndomains = a.example, *.shared.example\nrelay = r.example:587\n\n[tenant:b]\nrelay = r.example:587\ndomains = b.example, *.SHARED.example\n");
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(p[0].line, Some(7));
        assert_eq!(
            p[0].message,
            "[tenant:b] domains: \"*.shared.example\" is already claimed by [tenant:a] (line 1); a domain belongs to exactly one tenant"
        );
    }

    #[test]
    fn bad_tenant_name_is_reported_at_its_header() {
        let (line, msg) = one_error(&format!(
            "{MINIMAL}\n[tenant:Big Corp]\ndomains = big.example\nrelay = r.example:587\n"
        ));
        assert_eq!(line, Some(5));
        assert!(msg.contains("\"Big Corp\" is not a tenant name"), "{msg}");
        assert!(TenantName::parse(&"a".repeat(64)).is_ok());
        assert!(TenantName::parse(&"a".repeat(65)).is_err());
        assert!(TenantName::parse("").is_err());
        assert!(TenantName::parse("a.b_c-9").is_ok());
    }

    #[test]
    fn tenant_given_twice_is_an_error() {
        let (line, msg) = one_error(&format!("{MINIMAL}{MINIMAL}"));
        assert_eq!(line, Some(4));
        assert!(msg.contains("given twice (first at line 1)"), "{msg}");
    }

    #[test]
    fn bad_bool_is_reported_at_its_line() {
        let (line, msg) = one_error(&format!("{MINIMAL}tls_verify = maybe\n"));
        assert_eq!(line, Some(4));
        assert_eq!(
            msg,
            "[tenant:acme] tls_verify: \"maybe\" is not a boolean; write yes or no (true/false, on/off)"
        );
    }

    #[test]
    fn duplicate_key_is_reported_at_the_second_line() {
        let (line, msg) = one_error(&format!("{MINIMAL}tls = starttls\ntls = none\n"));
        assert_eq!(line, Some(5));
        assert_eq!(
            msg,
            "[tenant:acme] tls: given twice (first at line 4); keep one"
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let p = problems("[daemon]\nretry_min = soon\nlog_level = loud\n[tenant:acme]\ndomains = acme.example\nrelay = nowhere\ntls = maybe\n[x]\n");
        let lines: Vec<Option<usize>> = p.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(2), Some(3), Some(6), Some(7), Some(8)]);
        let err = ConfigError { problems: p };
        assert_eq!(err.to_string().lines().count(), 5);
    }

    #[test]
    fn syntax_errors_carry_their_line() {
        let (line, msg) = one_error("[daemon]\nlog_level = info\njust some words\n");
        assert_eq!(line, Some(3));
        assert!(msg.contains("expected key = value"), "{msg}");
        let (line, _) = one_error("[daemon\nlog_level = info\n");
        assert_eq!(line, Some(1));
    }

    #[test]
    fn listen_must_be_loopback_or_a_unix_path() {
        let (line, msg) = one_error("[daemon]\nlisten = 0.0.0.0:25\n");
        assert_eq!(line, Some(2));
        assert!(msg.contains("not a loopback address"), "{msg}");
        assert_eq!(
            parse_listen("[::1]:2525"),
            Ok(ListenAddr::Tcp("[::1]:2525".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("127.1.2.3:25"),
            Ok(ListenAddr::Tcp("127.1.2.3:25".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("/run/pbxmail/submit.sock"),
            Ok(ListenAddr::Unix("/run/pbxmail/submit.sock".into()))
        );
        assert!(parse_listen("localhost:25").is_err());
    }

    #[test]
    fn retry_max_below_retry_min_is_an_error() {
        let (line, msg) = one_error("[daemon]\nretry_min = 2h\nretry_max = 1h\n");
        assert_eq!(line, Some(3));
        assert!(msg.contains("shorter than retry_min"), "{msg}");
    }

    #[test]
    fn credentials_must_be_complete_and_single() {
        let dir = temp_dir("creds");
        let secret = dir.join("pw");
        std::fs::write(&secret, "pw\n").unwrap();
        let (line, msg) = one_error(&format!(
            "{MINIMAL}username = u\npassword = a\npassword_file = {}\n",
            secret.display()
        ));
        assert_eq!(line, Some(6));
        assert!(msg.contains("both set"), "{msg}");
        let (line, msg) = one_error(&format!("{MINIMAL}username = u\n"));
        assert_eq!(line, Some(4));
        assert!(msg.contains("no password"), "{msg}");
        // auth = none: a username alone is fine.
        ok(&format!("{MINIMAL}username = u\nauth = none\n"));
        let (line, msg) = one_error(&format!("{MINIMAL}auth = plain\n"));
        assert_eq!(line, Some(4));
        assert!(msg.contains("needs username"), "{msg}");
    }

    #[test]
    fn auth_over_plaintext_is_refused_with_a_warning() {
        let c = ok(&format!(
            "{MINIMAL}tls = none\nusername = u\npassword = p\n"
        ));
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.warnings[0].line, Some(4));
        assert!(c.warnings[0]
            .message
            .contains("deferred until that changes"));
        let c = ok(&format!(
            "{MINIMAL}tls = none\nusername = u\npassword = p\nallow_plaintext_auth = yes\n"
        ));
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn password_file_is_read_and_secret_debug_hides_it() {
        let dir = temp_dir("pwfile");
        let secret = dir.join("acme.secret");
        std::fs::write(&secret, "hunter2 with spaces\r\n").unwrap();
        let c = ok(&format!(
            "{MINIMAL}username = u\npassword_file = {}\n",
            secret.display()
        ));
        let t = &c.tenants[0];
        let password = t.password.as_ref().unwrap();
        assert_eq!(password.expose(), "hunter2 with spaces");
        assert_eq!(format!("{password:?}"), "Secret(<redacted>)");
        assert!(!format!("{t:?}").contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn unreadable_password_file_names_the_path() {
        let missing = temp_dir("pwmissing").join("nope.secret");
        let (line, msg) = one_error(&format!(
            "{MINIMAL}username = u\npassword_file = {}\n",
            missing.display()
        ));
        assert_eq!(line, Some(5));
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        let (line, msg) = one_error(&format!("{MINIMAL}ca_file = {}\n", missing.display()));
        assert_eq!(line, Some(4));
        assert!(
            msg.starts_with("[tenant:acme] ca_file: cannot read"),
            "{msg}"
        );
    }

    #[test]
    fn default_tenant_must_name_a_tenant() {
        let (line, msg) = one_error(&format!(
            "[daemon]\nlog_level = info\ndefault_tenant = other\n{MINIMAL}"
        ));
        assert_eq!(line, Some(3));
        assert_eq!(
            msg,
            "[daemon] default_tenant: there is no [tenant:other] section; configured tenants: acme"
        );
    }

    fn routing_config() -> Config {
        ok("[daemon]\ndefault_tenant = fallback\n\
            [tenant:apex]\ndomains = acme.example\nrelay = r.example:587\n\
            [tenant:wide]\ndomains = *.acme.example\nrelay = r.example:587\n\
            [tenant:deep]\ndomains = *.eu.acme.example, sales.acme.example\nrelay = r.example:587\n\
            [tenant:fallback]\ndomains = fallback.example\nrelay = r.example:587\n")
    }

    fn owner<'c>(c: &'c Config, domain: &str) -> Option<&'c str> {
        c.tenant_for_domain(domain).map(|t| t.name.as_str())
    }

    #[test]
    fn exact_domain_beats_wildcard_and_longest_wildcard_wins() {
        let c = routing_config();
        assert_eq!(owner(&c, "acme.example"), Some("apex"));
        assert_eq!(owner(&c, "a.acme.example"), Some("wide"));
        assert_eq!(owner(&c, "b.a.acme.example"), Some("wide"));
        assert_eq!(owner(&c, "sales.acme.example"), Some("deep"));
        assert_eq!(owner(&c, "paris.eu.acme.example"), Some("deep"));
    }

    #[test]
    fn domain_matching_ignores_case() {
        let c = routing_config();
        assert_eq!(owner(&c, "ACME.Example"), Some("apex"));
        assert_eq!(owner(&c, "X.Acme.EXAMPLE"), Some("wide"));
    }

    #[test]
    fn wildcard_does_not_match_its_apex() {
        let c = ok("[tenant:w]\ndomains = *.acme.example\nrelay = r.example:587\n");
        assert_eq!(owner(&c, "acme.example"), None);
        assert_eq!(owner(&c, "notacme.example"), None);
        assert_eq!(owner(&c, "x.acme.example"), Some("w"));
    }

    #[test]
    fn sender_domain_falls_back_to_default_tenant() {
        let c = routing_config();
        let name = |d: &str| c.tenant_for_sender_domain(d).map(|t| t.name.as_str());
        assert_eq!(name("other.example"), Some("fallback"));
        assert_eq!(name("acme.example"), Some("apex"));
        assert_eq!(
            c.tenant(&TenantName::parse("deep").unwrap())
                .map(|t| t.line),
            Some(9)
        );
    }

    #[test]
    fn value_syntax() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(432_000)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(parse_size("512K"), Ok(512 * 1024));
        assert_eq!(parse_size("25M"), Ok(25 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("1X").is_err());
        for (s, b) in [
            ("yes", true),
            ("No", false),
            ("TRUE", true),
            ("false", false),
            ("on", true),
            ("off", false),
        ] {
            assert_eq!(parse_bool(s), Ok(b), "{s}");
        }
        assert!(parse_bool("1").is_err());
        assert_eq!(parse_free_space("5%"), Ok(FreeSpace::Percent(5)));
        assert!(parse_free_space("100%").is_err());
        let rate = |messages, secs| {
            Ok(Some(RateLimit {
                messages,
                per: Duration::from_secs(secs),
            }))
        };
        assert_eq!(parse_rate_limit("30/min"), rate(30, 60));
        assert_eq!(parse_rate_limit("100/h"), rate(100, 3600));
        assert_eq!(parse_rate_limit("5/s"), rate(5, 1));
        assert_eq!(parse_rate_limit("1000/day"), rate(1000, 86_400));
        assert_eq!(parse_rate_limit("10/5m"), rate(10, 300));
        assert_eq!(parse_rate_limit("none"), Ok(None));
        assert!(parse_rate_limit("0/min").is_err());
        assert!(parse_rate_limit("30").is_err());
        assert_eq!(
            parse_rate_limit("30/min").unwrap().unwrap().to_string(),
            "30/min"
        );
        assert_eq!(parse_archive_users("*"), Ok(ArchiveUsers::All));
        assert!(DomainPattern::parse("*").is_err());
        assert!(DomainPattern::parse("a.*.example").is_err());
    }

    #[test]
    fn as_str_gives_back_the_ini_value() {
        for tls in [TlsMode::StartTls, TlsMode::Implicit, TlsMode::None] {
            assert_eq!(parse_tls(tls.as_str()), Ok(tls));
        }
        for provider in [Provider::Office365, Provider::Gmail] {
            assert_eq!(parse_provider(provider.as_str()), Ok(provider));
        }
        for auth in [
            AuthMode::Auto,
            AuthMode::Plain,
            AuthMode::Login,
            AuthMode::XOAuth2,
            AuthMode::None,
        ] {
            assert_eq!(parse_auth(auth.as_str()), Ok(auth));
        }
    }

    #[test]
    fn default_path_follows_the_environment() {
        // Reads the environment only: setting it would race with other tests.
        let expected = match std::env::var_os("PBXMAIL_CONFIG") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_PATH),
        };
        assert_eq!(default_path(), expected);
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("relay", "relay"), 0);
        assert_eq!(edit_distance("conect_timeout", "connect_timeout"), 1);
        assert_eq!(edit_distance("tsl", "tls"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn config_error_display_is_one_problem_per_line() {
        let p = |line| Problem {
            file: PathBuf::from("/etc/pbxmail/pbxmail.ini"),
            line,
            message: "m".into(),
        };
        let e = ConfigError {
            problems: vec![p(Some(3)), p(None)],
        };
        assert_eq!(
            e.to_string(),
            "/etc/pbxmail/pbxmail.ini:3: m\n/etc/pbxmail/pbxmail.ini: m"
        );
    }

    #[test]
    fn load_reports_a_missing_file() {
        let missing = temp_dir("load").join("absent.ini");
        let e = load(&missing).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert_eq!(e.problems[0].line, None);
        assert!(e.to_string().starts_with(&missing.display().to_string()));
    }

    const SAMPLE: &str = include_str!("../etc/pbxmail.ini");

    #[test]
    fn sample_config_is_accepted_apart_from_its_password_files() {
        // The sample points at secret files that only exist on a real appliance.
        let p = problems(SAMPLE);
        assert_eq!(p.len(), 2, "{p:#?}");
        for problem in &p {
            assert!(
                problem
                    .message
                    .contains("password_file: cannot read /etc/pbxmail/"),
                "{problem}"
            );
        }
        // With the secret files present, the sample is valid as it stands.
        let dir = temp_dir("sample");
        let mut text = SAMPLE.to_owned();
        for name in ["acme.secret", "hoster.secret"] {
            let secret = dir.join(name);
            std::fs::write(&secret, "pw\n").unwrap();
            text = text.replace(
                &format!("/etc/pbxmail/{name}"),
                &secret.display().to_string(),
            );
        }
        let c = ok(&text);
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].relay.to_string(), "smtp.office365.com:587");
        assert_eq!(c.tenants[1].relay.to_string(), "mail.hoster.example:587");
        assert!(c.warnings.is_empty(), "{:#?}", c.warnings);
    }

    #[test]
    fn tenant_name_round_trips_through_serde() {
        let name = TenantName::parse("acme").unwrap();
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"acme\"");
        assert!(serde_json::from_str::<TenantName>("\"Bad Name\"").is_err());
    }
}
