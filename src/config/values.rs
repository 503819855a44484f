//! Value syntax: one parser per kind of value, each returning a message an
//! admin can act on. Public where the CLI and tests parse the same forms.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::daemon::{FreeSpace, ListenAddr};
use super::provider::Provider;
use super::tenant::{ArchiveUsers, DomainPattern, RateLimit};
use crate::base::relay::{AuthMode, Relay, TlsMode};
use crate::base::secret::Secret;

/// `30s`, `5m`, `2h`, `5d`. The unit is required: a bare `30` is ambiguous.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let units = [("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)];
    let hint = "write a number and a unit: 30s, 5m, 2h or 5d";
    scaled(s, "a duration", hint, &units).map(Duration::from_secs)
}

/// `512K`, `25M`, `1G` (1024-based), or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let units = [
        ("", 1),
        ("b", 1),
        ("k", 1 << 10),
        ("kb", 1 << 10),
        ("m", 1 << 20),
        ("mb", 1 << 20),
        ("g", 1 << 30),
        ("gb", 1 << 30),
        ("t", 1 << 40),
        ("tb", 1 << 40),
    ];
    let hint = "write bytes or a number with K, M or G, e.g. 512K, 25M";
    scaled(s, "a size", hint, &units)
}

/// A whole number followed by one of `units` (any case), times that unit's
/// multiple. An empty unit is allowed only where `units` lists it.
fn scaled(s: &str, what: &str, hint: &str, units: &[(&str, u64)]) -> Result<u64, String> {
    let t = s.trim();
    let number = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = t.strip_prefix(number).unwrap_or_default();
    let number = number.trim_end();
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{t:?} is not {what}; {hint}"));
    }
    let lower = unit.to_ascii_lowercase();
    let scale = match units.iter().find(|(u, _)| *u == lower) {
        Some(&(_, scale)) => scale,
        None if unit.is_empty() => return Err(format!("{t:?} has no unit; {hint}")),
        None => return Err(format!("{t:?} has an unknown unit {unit:?}; {hint}")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{t:?} is too large"))
}

/// One of `words` (trimmed, any case), else `"VALUE" is not EXPECTED`.
fn keyword<T: Copy>(s: &str, words: &[(&str, T)], expected: &str) -> Result<T, String> {
    let lower = s.trim().to_ascii_lowercase();
    words
        .iter()
        .find(|(w, _)| *w == lower)
        .map(|&(_, value)| value)
        .ok_or_else(|| format!("{:?} is not {expected}", s.trim()))
}

/// `yes`/`no`, `true`/`false`, `on`/`off`, in any case.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    let words = [
        ("yes", true),
        ("true", true),
        ("on", true),
        ("no", false),
        ("false", false),
        ("off", false),
    ];
    keyword(s, &words, "a boolean; write yes or no (true/false, on/off)")
}

pub(super) fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{:?} must be longer than zero", s.trim())),
        d => Ok(d),
    }
}

/// A duration within `min..=max`: anything outside would not run (an
/// `Instant` overflows, a retry never comes), so check-config refuses it.
pub(super) fn duration_within(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> {
    move |s| {
        let d = parse_nonzero_duration(s)?;
        if (min..=max).contains(&d) {
            Ok(d)
        } else {
            Err(format!(
                "{:?} is out of range; write {} to {}",
                s.trim(),
                human_duration(min),
                human_duration(max)
            ))
        }
    }
}

/// A whole count within `min..=max` (at least 1).
pub(super) fn count_within(min: u32, max: u32) -> impl Fn(&str) -> Result<u32, String> {
    move |s| match parse_messages_per_session(s)? {
        n if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{:?} is out of range; write {min} to {max}",
            s.trim()
        )),
    }
}

/// A size within `min..=max` bytes.
pub(super) fn size_within(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> {
    move |s| match parse_size(s)? {
        n if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{:?} is out of range; write {} to {}",
            s.trim(),
            human_size(min),
            human_size(max)
        )),
    }
}

/// A duration as the config writes it: the largest unit that divides it.
pub(super) fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    [(86_400, "d"), (3600, "h"), (60, "m")]
        .iter()
        .find(|(unit, _)| secs >= *unit && secs.is_multiple_of(*unit))
        .map(|(unit, name)| format!("{}{name}", secs / unit))
        .unwrap_or_else(|| format!("{secs}s"))
}

/// A size as the config writes it: the largest 1024-based unit that divides it.
fn human_size(n: u64) -> String {
    [(1u64 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")]
        .iter()
        .find(|(unit, _)| n >= *unit && n.is_multiple_of(*unit))
        .map(|(unit, name)| format!("{}{name}", n / unit))
        .unwrap_or_else(|| n.to_string())
}

pub(super) fn parse_relay(s: &str) -> Result<Relay, String> {
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
pub(super) fn check_domain(d: &str) -> Result<(), String> {
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

pub(super) fn parse_domains(s: &str) -> Result<Vec<DomainPattern>, String> {
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

pub(super) fn parse_address(s: &str) -> Result<String, String> {
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

pub(super) fn parse_listen(s: &str) -> Result<ListenAddr, String> {
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

pub(super) fn parse_free_space(s: &str) -> Result<FreeSpace, String> {
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

pub(super) fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    use log::LevelFilter as L;
    let words = [
        ("off", L::Off),
        ("error", L::Error),
        ("warn", L::Warn),
        ("info", L::Info),
        ("debug", L::Debug),
        ("trace", L::Trace),
    ];
    keyword(
        s,
        &words,
        "a log level; write off, error, warn, info, debug or trace",
    )
}

pub(super) fn parse_tls(s: &str) -> Result<TlsMode, String> {
    let words = [
        ("starttls", TlsMode::StartTls),
        ("implicit", TlsMode::Implicit),
        ("none", TlsMode::None),
    ];
    keyword(
        s,
        &words,
        "a TLS mode; write starttls (port 587), implicit (port 465) or none",
    )
}

pub(super) fn parse_provider(s: &str) -> Result<Provider, String> {
    let words = [
        ("office365", Provider::Office365),
        ("gmail", Provider::Gmail),
    ];
    keyword(
        s,
        &words,
        "a known provider; write office365, gmail, or leave it empty and set relay",
    )
}

pub(super) fn parse_auth(s: &str) -> Result<AuthMode, String> {
    let words = [
        ("auto", AuthMode::Auto),
        ("plain", AuthMode::Plain),
        ("login", AuthMode::Login),
        ("xoauth2", AuthMode::XOAuth2),
        ("none", AuthMode::None),
    ];
    keyword(
        s,
        &words,
        "an auth mode; write auto, plain, login, xoauth2 or none",
    )
}

/// The most messages a `rate_limit` may allow per interval.
pub(super) const RATE_MAX_MESSAGES: u32 = 1_000_000;
/// The longest `rate_limit` interval.
pub(super) const RATE_MAX_INTERVAL: Duration = Duration::from_secs(7 * 86_400);

/// `30/min`, `100/h`, `5/s`, `1000/day`, or `N/DURATION` (`10/5m`); `none` = unlimited,
/// which also overrides a provider's preset.
pub(super) fn parse_rate_limit(s: &str) -> Result<Option<RateLimit>, String> {
    let s = s.trim();
    if matches!(s.to_ascii_lowercase().as_str(), "none" | "unlimited") {
        return Ok(None);
    }
    let hint = "write messages/interval, e.g. 30/min, 100/h, 5/s, 1000/day, or none";
    let (count, interval) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a rate; {hint}"))?;
    let messages = match count.trim().parse::<u32>() {
        Ok(n) if (1..=RATE_MAX_MESSAGES).contains(&n) => n,
        _ => {
            return Err(format!(
                "{:?} in {s:?} is not a count from 1 to {RATE_MAX_MESSAGES}; {hint}",
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
    if per > RATE_MAX_INTERVAL {
        return Err(format!(
            "{:?} in {s:?} is longer than {}; {hint}",
            interval.trim(),
            human_duration(RATE_MAX_INTERVAL)
        ));
    }
    Ok(Some(RateLimit { messages, per }))
}

/// A count of 1 or more (messages_per_session, listen limits).
pub(super) fn parse_messages_per_session(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{:?} is not a whole number of 1 or more", s.trim())),
    }
}

pub(super) fn parse_archive_users(s: &str) -> Result<ArchiveUsers, String> {
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

pub(super) fn parse_group(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.chars()
        .any(|c| c.is_whitespace() || c == ':' || c.is_control())
    {
        return Err(format!("{s:?} is not a group name"));
    }
    Ok(s.to_owned())
}

pub(super) fn parse_absolute_path(s: &str) -> Result<PathBuf, String> {
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
pub(super) fn parse_url(s: &str) -> Result<String, String> {
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

pub(super) fn parse_string(s: &str) -> Result<String, String> {
    Ok(s.trim().to_owned())
}

/// Checks that `path` names a regular file of at most `max` bytes that
/// pbxmail's user may open, without reading it (the tenant thread does).
pub(super) fn check_readable_file(path: &Path, max: u64) -> Result<(), String> {
    match crate::base::fs::open_small_file(path, max) {
        Ok(_) => Ok(()),
        Err(e) => Err(cannot_read(&path.display().to_string(), &e)),
    }
}

/// "cannot read WHAT: why", with the usual fix where the OS refused (a
/// wrong path, a permission); the file's type or size is fixed otherwise.
fn cannot_read(what: &str, e: &std::io::Error) -> String {
    if e.raw_os_error().is_some() {
        format!("cannot read {what}: {e}; check the path and that pbxmail's user may read it")
    } else {
        format!("cannot read {what}: {e}")
    }
}

pub(super) fn read_password_file(path: &Path) -> Result<Secret, String> {
    // A path is named; anything else is not shown: admins sometimes type
    // the password itself here.
    let what = if path.is_absolute() {
        path.display().to_string()
    } else {
        "the file it names (not an absolute path; not shown)".to_string()
    };
    let bytes = crate::base::fs::read_small_file(path, crate::base::fs::MAX_SECRET_FILE)
        .map_err(|e| cannot_read(&what, &e))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("cannot read {what}: it is not UTF-8 text"))?;
    // Editors add a final newline that is not part of the password.
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_with_units_scale_and_say_what_is_wrong() {
        assert_eq!(parse_duration(" 5M "), Ok(Duration::from_secs(300)));
        assert_eq!(parse_size("25M"), Ok(25 << 20));
        assert_eq!(parse_size("512kb"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        let size_hint = "write bytes or a number with K, M or G, e.g. 512K, 25M";
        assert_eq!(
            parse_size("big"),
            Err(format!("\"big\" is not a size; {size_hint}"))
        );
        assert_eq!(
            parse_size("3x"),
            Err(format!("\"3x\" has an unknown unit \"x\"; {size_hint}"))
        );
        let duration_hint = "write a number and a unit: 30s, 5m, 2h or 5d";
        assert_eq!(
            parse_duration("30"),
            Err(format!("\"30\" has no unit; {duration_hint}"))
        );
        assert_eq!(
            parse_duration("2w"),
            Err(format!("\"2w\" has an unknown unit \"w\"; {duration_hint}"))
        );
        assert_eq!(
            parse_duration("99999999999999999999d"),
            Err("\"99999999999999999999d\" is too large".to_owned())
        );
        assert_eq!(
            parse_size("20000000T"),
            Err("\"20000000T\" is too large".to_owned())
        );
    }

    #[test]
    fn keywords_match_in_any_case_and_list_the_choices() {
        assert_eq!(parse_bool(" On "), Ok(true));
        assert_eq!(parse_bool("FALSE"), Ok(false));
        assert_eq!(parse_tls("StartTLS"), Ok(TlsMode::StartTls));
        assert_eq!(parse_auth("XOAUTH2"), Ok(AuthMode::XOAuth2));
        assert_eq!(parse_provider("Gmail"), Ok(Provider::Gmail));
        assert_eq!(parse_log_level("warn"), Ok(log::LevelFilter::Warn));
        assert_eq!(
            parse_tls(" ssl "),
            Err(
                "\"ssl\" is not a TLS mode; write starttls (port 587), implicit (port 465) or none"
                    .to_owned()
            )
        );
        assert_eq!(
            parse_auth("cram"),
            Err(
                "\"cram\" is not an auth mode; write auto, plain, login, xoauth2 or none"
                    .to_owned()
            )
        );
        assert_eq!(
            parse_provider("yahoo"),
            Err("\"yahoo\" is not a known provider; write office365, gmail, or leave it empty and set relay".to_owned())
        );
        assert_eq!(
            parse_log_level("loud"),
            Err(
                "\"loud\" is not a log level; write off, error, warn, info, debug or trace"
                    .to_owned()
            )
        );
    }
}
