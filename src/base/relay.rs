//! How a tenant reaches its relay: the smarthost's address, the TLS mode and
//! the way it signs in. The config parses them; smtp and tls act on them.

use std::fmt;

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
