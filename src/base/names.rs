//! Names that become file names, thread names and log fields: a tenant's
//! name and a message's queue ID. Each accepts only what is safe in a path.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

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

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(String);

impl MessageId {
    /// Unique across processes: time, pid and a per-process counter.
    pub fn generate() -> MessageId {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let count = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xfff;
        MessageId(format!(
            "{:09X}{:05X}{:06X}{:03X}",
            now.as_secs() & 0xf_ffff_ffff,
            now.subsec_micros(),
            std::process::id() & 0xff_ffff,
            count
        ))
    }

    /// Accepts only what `generate` can produce, so an ID is always a safe file name.
    pub fn parse(s: &str) -> Option<MessageId> {
        let ok = !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| MessageId(s.to_ascii_uppercase()))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_unique_and_safe() {
        let a = MessageId::generate();
        let b = MessageId::generate();
        assert_ne!(a, b);
        assert!(MessageId::parse(&a.to_string()).is_some());
        assert!(MessageId::parse("../etc").is_none());
    }

    #[test]
    fn tenant_names_are_lowercase_path_safe_and_short() {
        assert_eq!(TenantName::parse("acme-eu").unwrap().as_str(), "acme-eu");
        assert!(TenantName::parse("../x").is_err());
        assert!(TenantName::parse("Acme").unwrap_err().contains("lowercase"));
    }
}
