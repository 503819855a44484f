//! The configuration file: reads pbxmail.ini and turns it into a validated [`Config`].
//! Two stages: INI text → raw sections (strings with line numbers) → typed values.
//! Every problem is collected and reported at once as `FILE:LINE: message`; what the
//! values mean at run time is left to the modules that use them.

mod daemon;
mod ini;
mod provider;
mod routes;
mod section;
mod tenant;
#[cfg(test)]
mod tests;
mod values;

use crate::base::names::TenantName;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use daemon::{DaemonConfig, FreeSpace, ListenAddr, ListenLimits, SessionLimits};
pub use tenant::{ArchiveUsers, DomainPattern, RateLimit, TenantConfig};

use daemon::{daemon_config, DAEMON_KEYS};
use ini::{read_raw, RawSection};
use routes::Routes;
use section::{closest, Problems, Section};
use tenant::{tenant_config, TENANT_KEYS};

const DEFAULT_PATH: &str = "/etc/pbxmail/pbxmail.ini";

/// The most `[tenant:NAME]` sections one daemon serves (README "Limits",
/// pbxmail.ini(5)); a file with more is refused at start and by check-config.
pub const MAX_TENANTS: usize = 50_000;

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
    /// As loaded: the lookups below index it, so it is read, never changed.
    pub tenants: Vec<TenantConfig>,
    /// Accepted but worth telling the admin (check-config prints them, the daemon logs them).
    pub warnings: Vec<Problem>,
    routes: Routes,
}

impl Config {
    /// Tenant whose `domains` claim this domain: case-insensitive; an exact match wins
    /// over a `*.x` wildcard, and the longest wildcard wins among wildcards.
    /// `*.acme.example` matches `a.acme.example` and `b.a.acme.example`, not `acme.example`.
    /// A map lookup, whatever the number of tenants (see `routes.rs`).
    pub fn tenant_for_domain(&self, domain: &str) -> Option<&TenantConfig> {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        self.routes
            .by_domain(&domain)
            .and_then(|i| self.tenants.get(i))
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
        self.routes.by_name(name).and_then(|i| self.tenants.get(i))
    }
}

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

/// Stage 2: raw sections → validated Config, with the checks that span sections.
fn validate(path: &Path, raw: &[RawSection], out: &mut Problems) -> Config {
    let mut daemon: Option<Section> = None;
    let mut tenant_sections: Vec<(TenantName, usize, Section)> = Vec::new();
    // Each tenant's header line, to find a duplicate without a scan.
    let mut tenant_lines: HashMap<TenantName, usize> = HashMap::new();
    let mut too_many = false;
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
                let at = section::first_at(first.line);
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
            let line = section.line.unwrap_or_default();
            if let Some(first) = tenant_lines.get(&tenant) {
                out.error(
                    section.line,
                    format!("[tenant:{tenant}] given twice (first at line {first}); merge the two or rename one"),
                );
                continue;
            }
            if tenant_lines.len() >= MAX_TENANTS {
                // Said once, at the first section past the limit; the
                // tenants past it are not checked further.
                if !too_many {
                    too_many = true;
                    out.error(
                    section.line,
                    format!(
                        "[tenant:{tenant}]: more than {MAX_TENANTS} tenants; one pbxmail serves at most \
                         {MAX_TENANTS} (see Limits in pbxmail.ini(5)): split the tenants across hosts"
                        ),
                    );
                }
                continue;
            }
            tenant_lines.insert(tenant.clone(), line);
            let label = format!("[tenant:{tenant}]");
            let parsed = Section::new(section, label, TENANT_KEYS, ("[daemon]", DAEMON_KEYS), out);
            tenant_sections.push((tenant, line, parsed));
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
        if !tenant_lines.contains_key(default) {
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

    let routes = Routes::new(&tenants);
    Config {
        path: path.to_owned(),
        daemon,
        tenants,
        warnings: Vec::new(),
        routes,
    }
}
