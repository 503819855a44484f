use std::time::Duration;

use super::provider::Provider;
use super::section::edit_distance;
use super::values::*;
use super::*;
use crate::base::relay::{AuthMode, Relay, TlsMode};
use crate::base::secret::Secret;

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

    // Accepted, but the admin is told: unverified certificates, and an
    // archive group this machine does not have.
    let warnings: Vec<(Option<usize>, &str)> = c
        .warnings
        .iter()
        .map(|w| (w.line, w.message.as_str()))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert_eq!(warnings[0].0, Some(19));
    assert!(warnings[0]
        .1
        .contains("certificates of the relay are not verified"));
    assert_eq!(warnings[1].0, Some(40), "{warnings:#?}");
    assert!(
        warnings[1]
            .1
            .contains("\"acme-admins\" does not exist in /etc/group"),
        "{warnings:#?}"
    );
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
    let (_, msg) = one_error("[tenant:acme]\ndomains = acme.example\nrelay = 2001:db8::1:587\n");
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
    assert_eq!(
        g.rate_limit,
        Some(RateLimit {
            messages: 2000,
            per: Duration::from_secs(86_400)
        })
    );
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

/// Found by the mutated-config property test: rust-ini ends a line at a bare
/// CR, so `tls = none<CR>auth = none` became a key "auth" on no line at all.
#[test]
fn a_bare_cr_inside_a_line_is_refused_at_its_line() {
    let text = format!("{MINIMAL}tls = none\rauth = none\n");
    let (line, msg) = one_error(&text);
    assert_eq!(line, Some(4));
    assert!(msg.contains("carriage return (CR)"), "{msg}");
    // CRLF line ends are still read as line ends.
    let c = ok(&MINIMAL.replace('\n', "\r\n"));
    assert_eq!(c.tenants[0].relay.to_string(), "smtp.acme.example:587");
}

/// Found by the mutated-config property test: rust-ini reads `\=` and `\]`
/// as part of a key or section name and ends it at a later `=`, `:` or `]`,
/// so `auth\= none` swallowed the next line into a key on no line at all.
#[test]
fn a_backslash_in_a_key_or_section_name_is_refused_at_its_line() {
    let (line, msg) = one_error(&format!("{MINIMAL}auth\\= none\nrate_limit = 5/s\n"));
    assert_eq!(line, Some(4));
    assert!(msg.contains("a key may not contain \\"), "{msg}");
    let (line, msg) = one_error(&format!("{MINIMAL}[tenant:b\\] ; x]\nrelay = b:25\n"));
    assert_eq!(line, Some(4));
    assert!(msg.contains("a section name may not contain \\"), "{msg}");
    // In a value a backslash is data, as before.
    let c = ok(&format!("{MINIMAL}username = dom\\pbx\npassword = a\\b\n"));
    assert_eq!(c.tenants[0].username.as_deref(), Some("dom\\pbx"));
}

/// Keys and sections were paired with the scan by searching the whole
/// section for each one, quadratic in a file of many repeated keys.
#[test]
fn a_file_of_many_repeated_keys_is_read_in_bounded_time() {
    let text = format!("[daemon]\n{}", "log_level = info\n".repeat(20_000));
    let started = std::time::Instant::now();
    let p = problems(&text);
    let took = started.elapsed();
    assert_eq!(p.len(), 19_999);
    assert_eq!(p[0].line, Some(3));
    assert_eq!(p[19_998].line, Some(20_001));
    // Linear takes milliseconds; the quadratic pairing took seconds here.
    assert!(took < Duration::from_secs(1), "took {took:?}");
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

/// Issue 14: what check-config accepts must run; a password or CA file that
/// is a device, a FIFO or a folder would make the daemon read forever,
/// allocate without end or wait for a writer. Each is refused at its line,
/// at once, naming the file and what it is.
#[test]
fn password_and_ca_files_that_are_not_regular_files_are_refused_at_their_line() {
    let dir = temp_dir("pwspecial");
    let fifo = dir.join("secret.fifo");
    let _ = std::fs::remove_file(&fifo);
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
    let big = dir.join("big.secret");
    std::fs::write(&big, vec![b'x'; 64 * 1024 + 1]).unwrap();
    let started = std::time::Instant::now();
    for (file, why) in [
        (
            Path::new("/dev/zero"),
            "a character device, not a regular file",
        ),
        (fifo.as_path(), "a FIFO, not a regular file"),
        (dir.as_path(), "a folder, not a regular file"),
        (big.as_path(), "larger than 65536 bytes"),
    ] {
        let (line, msg) = one_error(&format!(
            "{MINIMAL}username = u\npassword_file = {}\n",
            file.display()
        ));
        assert_eq!(line, Some(5), "{msg}");
        let named = format!("password_file: cannot read {}: {why}", file.display());
        assert!(msg.contains(&named), "{msg}");
        if file != big.as_path() {
            let (line, msg) = one_error(&format!("{MINIMAL}ca_file = {}\n", file.display()));
            assert_eq!(line, Some(4), "{msg}");
            let named = format!("ca_file: cannot read {}: {why}", file.display());
            assert!(msg.contains(&named), "{msg}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    std::fs::remove_dir_all(&dir).unwrap();
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
    assert_eq!(parse_provider("office365"), Ok(Provider::Office365));
    assert_eq!(parse_provider("Gmail"), Ok(Provider::Gmail));
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

const SAMPLE: &str = include_str!("../../etc/pbxmail.ini");

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

#[test]
fn oauth_auth_url_is_read_and_checked() {
    let c = ok(&format!(
        "{MINIMAL}oauth_auth_url = https://idp.example/authorize?prompt=consent\n"
    ));
    assert_eq!(
        c.tenants[0].oauth_auth_url.as_deref(),
        Some("https://idp.example/authorize?prompt=consent")
    );
    assert_eq!(ok(MINIMAL).tenants[0].oauth_auth_url, None);
    // http only on loopback, as every endpoint; no fragment (the query is appended to).
    let (line, message) = one_error(&format!(
        "{MINIMAL}oauth_auth_url = http://idp.example/authorize\n"
    ));
    assert_eq!(line, Some(4));
    assert!(message.contains("oauth_auth_url"), "{message}");
    assert!(message.contains("https://"), "{message}");
    let (_, message) = one_error(&format!(
        "{MINIMAL}oauth_auth_url = https://idp.example/authorize#x\n"
    ));
    assert!(message.contains("fragment"), "{message}");
    ok(&format!(
        "{MINIMAL}oauth_auth_url = http://127.0.0.1:8080/authorize\n"
    ));
}

#[test]
fn gmail_preset_signs_in_with_the_code_grant_and_office365_with_the_device_grant() {
    let c = ok("[tenant:g]\ndomains = g.example\nprovider = gmail\n\
                [tenant:m]\ndomains = m.example\nprovider = office365\n");
    let g = &c.tenants[0];
    // Google's device grant refuses https://mail.google.com/ (invalid_scope).
    assert_eq!(g.oauth_device_url, None);
    assert_eq!(
        g.oauth_auth_url.as_deref(),
        Some("https://accounts.google.com/o/oauth2/v2/auth?access_type=offline&prompt=consent")
    );
    assert_eq!(
        g.oauth_token_url.as_deref(),
        Some("https://oauth2.googleapis.com/token")
    );
    assert_eq!(g.oauth_scope.as_deref(), Some("https://mail.google.com/"));
    let m = &c.tenants[1];
    assert_eq!(m.oauth_auth_url, None);
    assert_eq!(
        m.oauth_device_url.as_deref(),
        Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode")
    );
    assert_eq!(
        m.oauth_token_url.as_deref(),
        Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/token")
    );
    assert_eq!(
        m.oauth_scope.as_deref(),
        Some("https://outlook.office.com/SMTP.Send offline_access")
    );
}

#[test]
fn explicit_oauth_endpoints_win_over_the_gmail_preset() {
    let c = ok("[tenant:g]\ndomains = g.example\nprovider = gmail\n\
                oauth_auth_url = https://idp.example/authorize\n\
                oauth_device_url = https://idp.example/device\n");
    let g = &c.tenants[0];
    assert_eq!(
        g.oauth_auth_url.as_deref(),
        Some("https://idp.example/authorize")
    );
    assert_eq!(
        g.oauth_device_url.as_deref(),
        Some("https://idp.example/device")
    );
}

/// Every numeric key with its smallest and largest accepted value and a
/// value just outside each end, as written in pbxmail.ini(5).
const RANGES: &[(&str, bool, &str, &str, &str, &str)] = &[
    // (key, in [daemon]?, too small, min, max, too big)
    ("max_queue_lifetime", true, "0s", "1s", "30d", "31d"),
    ("retry_min", true, "0s", "1s", "7d", "8d"),
    ("retry_max", true, "0s", "1s", "7d", "8d"),
    ("listen_idle_timeout", true, "0s", "1s", "1h", "61m"),
    ("listen_max_connections", true, "0", "1", "10000", "10001"),
    ("listen_max_recipients", true, "0", "1", "10000", "10001"),
    ("listen_max_message_size", true, "0", "1", "4G", "4097M"),
    ("max_sessions", true, "0", "1", "100000", "100001"),
    (
        "max_connections_per_relay",
        true,
        "0",
        "1",
        "100000",
        "100001",
    ),
    ("connect_timeout", false, "0s", "1s", "1h", "3601s"),
    ("command_timeout", false, "0s", "1s", "1h", "3601s"),
    ("data_timeout", false, "0s", "1s", "1h", "3601s"),
    ("messages_per_session", false, "0", "1", "10000", "10001"),
    (
        "rate_limit",
        false,
        "0/min",
        "1/s",
        "1000000/7d",
        "1000001/s",
    ),
];

/// `key = value` in its section, the key on line 2 of the text.
fn with_key(key: &str, daemon: bool, value: &str) -> String {
    if daemon {
        // The other retry key at its far end, so retry_max >= retry_min
        // holds and the range is the one error.
        let other = match key {
            "retry_max" => "retry_min = 1s\n",
            "retry_min" => "retry_max = 7d\n",
            _ => "",
        };
        format!("[daemon]\n{key} = {value}\n{other}{MINIMAL}")
    } else {
        format!("[tenant:acme]\n{key} = {value}\ndomains = acme.example\nrelay = smtp.acme.example:587\n")
    }
}

#[test]
fn every_numeric_key_refuses_values_outside_its_range_at_its_line() {
    for &(key, daemon, too_small, _, _, too_big) in RANGES {
        for value in [too_small, too_big] {
            let (line, msg) = one_error(&with_key(key, daemon, value));
            assert_eq!(line, Some(2), "{key} = {value}: {msg}");
            assert!(msg.contains(key), "{key} = {value}: {msg}");
        }
    }
    // The absurd values that crashed the daemon are refused too.
    for (key, daemon, value) in [
        ("listen_max_connections", true, "100000000"),
        ("retry_max", true, "18446744073709551615s"),
        ("max_queue_lifetime", true, "18446744073709551615s"),
        ("data_timeout", false, "18446744073709551615s"),
        ("rate_limit", false, "1/18446744073709551615s"),
    ] {
        let (line, msg) = one_error(&with_key(key, daemon, value));
        assert_eq!(line, Some(2), "{key} = {value}: {msg}");
    }
}

#[test]
fn every_numeric_key_accepts_the_ends_of_its_range() {
    for &(key, daemon, _, min, max, _) in RANGES {
        for value in [min, max] {
            let text = with_key(key, daemon, value);
            ok(&text);
        }
    }
    let c = ok(&with_key("listen_max_connections", true, "10000"));
    assert_eq!(c.daemon.listen_limits.max_connections, 10_000);
    let c = ok(&with_key("max_sessions", true, "3"));
    assert_eq!(c.daemon.sessions.total, 3);
    let c = ok(&with_key("max_connections_per_relay", true, "2"));
    assert_eq!(c.daemon.sessions.per_relay, 2);
    let c = ok(&with_key("max_queue_lifetime", true, "30d"));
    assert_eq!(
        c.daemon.max_queue_lifetime,
        Duration::from_secs(30 * 86_400)
    );
}

#[test]
fn a_refused_range_names_the_range() {
    let (_, msg) = one_error(&with_key("listen_max_connections", true, "100000000"));
    assert!(msg.contains("1 to 10000"), "{msg}");
    let (_, msg) = one_error(&with_key("data_timeout", false, "2h"));
    assert!(msg.contains("1s to 1h"), "{msg}");
    let (_, msg) = one_error(&with_key("listen_max_message_size", true, "5G"));
    assert!(msg.contains("1 to 4G"), "{msg}");
}

const PACKAGED: &str = include_str!("../../packaging/pbxmail.ini");

/// Real configurations to mutate: the two shipped files, the smallest valid
/// one, and one that reaches the keys the samples leave empty (listen,
/// OAuth, presets, archive), with a BOM, CRLF line ends and odd spacing.
const SEEDS: &[&str] = &[
    SAMPLE,
    PACKAGED,
    MINIMAL,
    "\u{feff}; appliance\r\n[daemon]\r\nlisten = 127.0.0.1:2525 ; submission\r\n\
     default_tenant = gmail\r\nretry_min=30s\r\nretry_max = 2h\r\n  # indented comment\r\n\
     min_free_space = 500M\r\nlog_level = debug\r\n\r\n[tenant:gmail]\r\n\
     domains = g.example\r\nprovider = gmail\r\nauth = xoauth2\r\nusername = pbx@g.example\r\n\
     oauth_client_id = abc\r\noauth_token_file = /var/lib/pbxmail/oauth/g.json\r\n\
     archive = yes\r\narchive_users = 101, 102\r\narchive_group = root\r\n\
     [tenant:lan]\r\ndomains = *.lan.example\r\nrelay = [::1]:25\r\ntls = none\r\n\
     auth = none\r\nrate_limit = 5/s\r\nmessages_per_session = 1\r\n",
    "[daemon]\nlisten = /run/pbxmail/submit.sock\nlisten_max_connections = 10000\n\
     [tenant:a]\ndomains = a.example\nrelay = a.example:465\ntls = implicit\n\
     tls_verify = no\nusername = u\npassword = pw\n[tenant:b]\nprovider = office365\n\
     domains = b.example\nconnect_timeout = 1s\ncommand_timeout = 1h\ndata_timeout = 1h\n",
];

/// The bytes that shape an INI file, most likely first.
const INI_BYTES: &[u8] = b"\n\n\r[]=:;# \t\\\"'*,.0159/:@kKmMhds\x7f\0";

/// Whatever a mutated configuration holds, the parser returns (no panic,
/// arithmetic overflow included: debug builds check it, and `cargo test
/// --release` runs this too) within a bounded time, and every error it
/// reports points at a line of the input, where check-config sends the admin.
#[test]
fn mutated_real_configs_never_panic_and_every_error_names_a_line_of_the_input() {
    use crate::base::mutate::{cases, mutate_with, seed, Rng};
    let mut rng = Rng::seeded(seed(0x5eed_1417));
    let (mut accepted, mut refused) = (0usize, 0usize);
    let mut slowest = Duration::ZERO;
    for case in 0..cases(1_500) {
        let seed = rng.pick(SEEDS).as_bytes();
        let bytes = mutate_with(seed, INI_BYTES, &mut rng);
        // load() reads the file with read_to_string: only UTF-8 reaches parse.
        let text = String::from_utf8_lossy(&bytes);
        let lines = text.split('\n').count();
        let started = std::time::Instant::now();
        let result = parse(&path(), &text);
        slowest = slowest.max(started.elapsed());
        match result {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused += 1;
                assert!(
                    !e.problems.is_empty(),
                    "case {case}: empty error for {text:?}"
                );
                for problem in &e.problems {
                    assert!(
                        problem.line.is_some_and(|l| (1..=lines).contains(&l)),
                        "case {case}: {problem} is not on one of the {lines} lines of {text:?}"
                    );
                }
            }
        }
    }
    // Generous for a loaded two-core machine in a debug build; a parser
    // that goes quadratic on a long line or many keys takes far longer.
    assert!(
        slowest < Duration::from_secs(2),
        "slowest case took {slowest:?}"
    );
    // The mutations keep some inputs valid and break others: both sides run.
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
}

/// `count` tenants `t0`…, each claiming `tN.example` and `*.tN.example`.
fn many_tenants(count: usize) -> String {
    let mut text = String::from("[daemon]\ndefault_tenant = t0\n");
    for i in 0..count {
        text.push_str(&format!(
            "[tenant:t{i}]\ndomains = t{i}.example, *.t{i}.example\nrelay = r.example:587\n"
        ));
    }
    text
}

/// Generous for a loaded two-core machine; what went quadratic took longer.
fn load_bound() -> Duration {
    if cfg!(debug_assertions) {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(1)
    }
}

#[test]
fn twenty_thousand_tenants_load_in_linear_time() {
    let text = many_tenants(20_000);
    let started = std::time::Instant::now();
    let c = ok(&text);
    let took = started.elapsed();
    assert!(took < load_bound(), "20,000 tenants took {took:?} to load");
    assert_eq!(c.tenants.len(), 20_000);
    assert_eq!(owner(&c, "t19999.example"), Some("t19999"));
    assert_eq!(owner(&c, "pbx.t19999.example"), Some("t19999"));
}

#[test]
fn a_duplicate_among_many_tenants_is_found_with_its_first_line() {
    let mut text = many_tenants(20_000);
    text.push_str("[tenant:t7]\ndomains = other.example\nrelay = r.example:587\n");
    let started = std::time::Instant::now();
    let p = problems(&text);
    assert!(
        started.elapsed() < load_bound(),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(p.len(), 1, "{p:#?}");
    // Line 3 + 3 lines per tenant before t7.
    assert_eq!(
        p[0].message,
        "[tenant:t7] given twice (first at line 24); merge the two or rename one"
    );
}

#[test]
fn sender_routing_is_a_lookup_not_a_scan() {
    let c = ok(&many_tenants(20_000));
    // A scan of 20,000 tenants per lookup would take minutes for these.
    let started = std::time::Instant::now();
    for i in (0..20_000).rev() {
        let name = c
            .tenant_for_sender_domain(&format!("a.b.t{i}.example"))
            .map(|t| t.name.as_str().to_owned());
        assert_eq!(name, Some(format!("t{i}")));
    }
    assert_eq!(
        c.tenant_for_sender_domain("nobody.example")
            .map(|t| t.name.as_str()),
        Some("t0")
    );
    let took = started.elapsed();
    assert!(took < load_bound(), "20,000 lookups took {took:?}");
}

/// The rule `tenant_for_domain` must follow, written as the plain scan.
fn owner_by_scan<'c>(c: &'c Config, domain: &str) -> Option<&'c str> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let claims = || {
        c.tenants
            .iter()
            .flat_map(|t| t.domains.iter().map(move |d| (t, d)))
    };
    claims()
        .find(|(_, d)| matches!(d, DomainPattern::Exact(_)) && d.matches(&domain))
        .or_else(|| {
            claims()
                .filter(|(_, d)| matches!(d, DomainPattern::Wildcard(_)) && d.matches(&domain))
                .max_by_key(|(_, d)| d.to_string().len())
        })
        .map(|(t, _)| t.name.as_str())
}

#[test]
fn domain_index_agrees_with_the_plain_rule() {
    let c = routing_config();
    let labels = ["", ".", "a", "eu", "sales", "acme", "example", "x"];
    let mut checked = 0;
    for first in labels {
        for second in labels {
            for tail in [
                "acme.example",
                "eu.acme.example",
                "example",
                "fallback.example",
                "",
            ] {
                let domain = [first, second, tail]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(".");
                for d in [
                    domain.clone(),
                    domain.to_ascii_uppercase(),
                    format!("{domain}."),
                ] {
                    assert_eq!(owner(&c, &d), owner_by_scan(&c, &d), "{d:?}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500);
    assert_eq!(
        owner(&c, "..acme.example"),
        owner_by_scan(&c, "..acme.example")
    );
    assert_eq!(
        owner(&c, ".acme.example"),
        owner_by_scan(&c, ".acme.example")
    );
}

#[test]
fn tenants_are_limited_with_a_clear_error() {
    // One load: the error at the first header past the limit, and none
    // before it, shows that MAX_TENANTS tenants pass.
    let mut text = many_tenants(MAX_TENANTS);
    let header_line = text.lines().count() + 1;
    text.push_str("[tenant:one-more]\ndomains = more.example\nrelay = r.example:587\n");
    text.push_str("[tenant:and-another]\ndomains = another.example\nrelay = r.example:587\n");
    let (line, msg) = one_error(&text);
    assert_eq!(line, Some(header_line));
    assert_eq!(
        msg,
        format!(
            "[tenant:one-more]: more than {MAX_TENANTS} tenants; one pbxmail serves at most \
             {MAX_TENANTS} (see Limits in pbxmail.ini(5)): split the tenants across hosts"
        )
    );
}
