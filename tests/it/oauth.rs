//! OAuth 2.0 (auth = xoauth2), end to end: the real daemon and `pbxmail oauth
//! login` against a token endpoint on loopback (HTTPS, the test CA) that
//! implements the refresh grant (RFC 6749 §6), the device grant (RFC 8628) and
//! the authorization code grant with PKCE (RFC 6749 §4.1, RFC 7636) with their
//! error answers, and the test SMTP server checking the XOAUTH2 and OAUTHBEARER
//! strings. Covered: the first send, expiry and refresh, rotation of the
//! refresh token, invalid_grant, an endpoint that is down or failing, a token
//! the relay refuses, device login through each server answer, code login with
//! the test as the admin's browser (a pasted address, a bare code, a foreign
//! state, a refused code), the choice of flow, that a login as root leaves
//! the token file to the token folder's owner, that a rotated token the disk
//! refuses is kept and used, that a crash's temporary files are removed, and
//! that no token, code or verifier ever shows in a log or an output.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::harness::{attempts, str_of, wait_until, Daemon, Run};
use crate::support::mail::subject;
use crate::support::oauth_server::{OAuthServer, Request, Response};
use crate::support::smtp_server::{Fault, ServerOptions, TestCa, TestServer, Tls};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::Value;

/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(15);

const USER: &str = "pbx@acme.test";
const CLIENT_ID: &str = "pbx-client-42";
const CLIENT_SECRET: &str = "cl1ent-s3cret-zq";
const SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";
/// Every token this file hands out contains this, so a leak is easy to find.
/// Where the tests' mail goes.
const RCPT: &str = "alice@example.com";
const MARK: &str = "-zq";
/// An access token's `expires_in` equal to the daemon's 120 s early-refresh
/// margin (src/oauth/source.rs): valid for the session that fetched it, and
/// stale for the next one, however soon that starts.
const STALE_AT_ONCE: u64 = 120;

fn access_token(n: usize) -> String {
    format!("acc3ss-tok-{n}{MARK}")
}

fn refresh_token(n: usize) -> String {
    format!("r3fresh-tok-{n}{MARK}")
}

// ---------------------------------------------------------------------------
// A token endpoint that behaves like a provider's.
// ---------------------------------------------------------------------------

/// What the simulated provider knows and does.
struct ProviderState {
    /// Refresh tokens it accepts now.
    valid_refresh: Vec<String>,
    /// Access tokens issued so far (the next is `access_token(issued + 1)`).
    issued: usize,
    expires_in: u64,
    /// Hand out a new refresh token with each access token and revoke the
    /// one that was used (as Microsoft and Google may).
    rotate: bool,
    /// Refresh tokens minted so far (rotation), starting after rt-1.
    minted: usize,
}

/// The refresh grant on /token; /device and device polling are scripted per test.
#[derive(Clone)]
struct Provider {
    state: Arc<Mutex<ProviderState>>,
}

impl Provider {
    fn new(expires_in: u64, rotate: bool) -> Provider {
        Provider {
            state: Arc::new(Mutex::new(ProviderState {
                valid_refresh: vec![refresh_token(1)],
                issued: 0,
                expires_in,
                rotate,
                minted: 1,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProviderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn accept_refresh(&self, token: &str) {
        self.lock().valid_refresh.push(token.to_string());
    }

    fn revoke_all(&self) {
        self.lock().valid_refresh.clear();
    }

    fn answer(&self, req: &Request) -> Response {
        if req.path != "/token" || req.method != "POST" {
            return Response::json(404, serde_json::json!({"error": "not_found"}));
        }
        if req.param("client_id") != Some(CLIENT_ID) {
            return Response::json(401, serde_json::json!({"error": "invalid_client"}));
        }
        if req.grant_type() != "refresh_token" {
            return Response::error("unsupported_grant_type");
        }
        let mut s = self.lock();
        let offered = req.param("refresh_token").unwrap_or("");
        if !s.valid_refresh.iter().any(|t| t == offered) {
            return Response::json(
                400,
                serde_json::json!({
                    "error": "invalid_grant",
                    "error_description": "AADSTS70000: The refresh token has expired or was revoked."
                }),
            );
        }
        s.issued += 1;
        let access = access_token(s.issued);
        let rotated = if s.rotate {
            s.minted += 1;
            let new = refresh_token(s.minted);
            s.valid_refresh = vec![new.clone()];
            Some(new)
        } else {
            None
        };
        Response::token(&access, s.expires_in, rotated.as_deref())
    }

    /// An endpoint whose handler is this provider.
    fn serve(&self, ca: &TestCa) -> OAuthServer {
        let provider = self.clone();
        OAuthServer::start_with(ca, move |req| provider.answer(req))
    }
}

// ---------------------------------------------------------------------------
// Test setup
// ---------------------------------------------------------------------------

/// A relay accepting the given access tokens for USER.
fn relay_options(tokens: &[usize], offer_oauthbearer: bool) -> ServerOptions {
    ServerOptions {
        oauth_tokens: tokens.iter().map(|&n| access_token(n)).collect(),
        oauth_user: Some(USER.to_string()),
        offer_oauthbearer,
        ..ServerOptions::default()
    }
}

/// A test's installation: the daemon's directory, the CA file, the token file.
struct Site {
    daemon: Daemon,
    token_file: PathBuf,
}

/// A second message in a second session, once the first session is over;
/// the access token is already stale then (it lives `STALE_AT_ONCE`, no more
/// than the daemon's early-refresh margin), so no wait stands in for time
/// passing. Asserts it went out with the second access token. Returns the
/// refresh token of each request to the endpoint, in order.
fn second_session_after_expiry(
    site: &Site,
    relay: &TestServer,
    endpoint: &OAuthServer,
) -> Vec<Option<String>> {
    assert!(
        relay.wait_for_idle(ARRIVAL),
        "the first session did not end"
    );
    site.daemon.submit_note(USER, RCPT, "two");
    let got = relay.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2, "log:\n{}", site.daemon.log());
    assert_eq!(subject(&got[1]), "two");
    assert_eq!(got[1].auth_token, Some(access_token(2)));
    endpoint
        .requests_to("/token")
        .iter()
        .map(|r| r.param("refresh_token").map(str::to_string))
        .collect()
}

/// `site_with` and no other tenant.
fn site(
    test: &str,
    ca: &TestCa,
    endpoint: &OAuthServer,
    relay: &str,
    refresh: Option<&str>,
) -> Site {
    site_with(test, ca, endpoint, relay, refresh, "")
}

/// Writes the CA, the client secret and (if `refresh` is Some) the token file
/// (0600), then the config: one xoauth2 tenant `acme` with `relay` lines, and
/// `others` (more tenant sections).
fn site_with(
    test: &str,
    ca: &TestCa,
    endpoint: &OAuthServer,
    relay: &str,
    refresh: Option<&str>,
    others: &str,
) -> Site {
    let daemon = Daemon::bare(test);
    let ca_file = daemon.dir().join("ca.pem");
    ca.write_ca_pem(&ca_file);
    let secret_file = daemon.write_file("client.secret", &format!("{CLIENT_SECRET}\n"));
    let token_file = daemon.dir().join("oauth").join("acme.json");
    if let Some(refresh) = refresh {
        write_token_file(&token_file, refresh);
    }
    let section = format!(
        "[tenant:acme]\n\
         domains = acme.test\n\
         {relay}\
         auth = xoauth2\n\
         username = {USER}\n\
         oauth_token_url = {}\n\
         oauth_device_url = {}\n\
         oauth_client_id = {CLIENT_ID}\n\
         oauth_client_secret_file = {}\n\
         oauth_scope = {SCOPE}\n\
         oauth_token_file = {}\n\
         ca_file = {}\n",
        endpoint.url("/token"),
        endpoint.url("/device"),
        secret_file.display(),
        token_file.display(),
        ca_file.display(),
    );
    daemon.configure(&format!("{section}\n{others}"));
    Site { daemon, token_file }
}

/// Relay lines for a plaintext test server (AUTH allowed without TLS).
fn plain_relay(server: &TestServer) -> String {
    format!(
        "relay = 127.0.0.1:{}\ntls = none\nallow_plaintext_auth = yes\n",
        server.port()
    )
}

fn write_token_file(path: &Path, refresh: &str) {
    fs::create_dir_all(path.parent().expect("token file has a folder")).expect("mkdir");
    fs::write(
        path,
        serde_json::json!({ "refresh_token": refresh }).to_string(),
    )
    .expect("write token file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
}

/// The `.tmp` files in the token file's folder.
fn temp_files(token_file: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(token_file.parent().expect("token folder"))
        .expect("read token folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    names.sort();
    names
}

/// The ID of a process that has exited (and been reaped).
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait for true");
    pid
}

fn read_token_file(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// `pbxmail status --json`, parsed (Null if the command failed).
fn status(daemon: &Daemon) -> (Value, Run) {
    let run = daemon.run(&["status", "--json"], b"");
    let value = serde_json::from_str(&run.stdout).unwrap_or(Value::Null);
    (value, run)
}

fn tenant_status(daemon: &Daemon) -> Value {
    status(daemon).0["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "acme"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The XOAUTH2 initial response for `token`, in the format Google and
/// Microsoft document (there is no RFC).
fn xoauth2_string(token: &str) -> String {
    format!("user={USER}\x01auth=Bearer {token}\x01\x01")
}

/// Asserts that no secret (nor the base64 of an AUTH string carrying one)
/// shows in the daemon's log, in `queue --json`, in `status --json` (when
/// the daemon runs), or in any of `runs`.
fn assert_no_secrets(site: &Site, relay: Option<&TestServer>, runs: &[&Run]) {
    let daemon = &site.daemon;
    let mut texts = vec![
        ("daemon.log".to_string(), daemon.log()),
        (
            "queue --json".to_string(),
            daemon.run(&["queue", "--json"], b"").stdout,
        ),
    ];
    let (_, st) = status(daemon);
    texts.push((
        "status --json".to_string(),
        format!("{}{}", st.stdout, st.stderr),
    ));
    for (i, run) in runs.iter().enumerate() {
        texts.push((format!("run {i} stdout"), run.stdout.clone()));
        texts.push((format!("run {i} stderr"), run.stderr.clone()));
    }
    let mut needles = vec![CLIENT_SECRET.to_string(), MARK.to_string()];
    if let Some(relay) = relay {
        for attempt in relay.oauth_attempts() {
            needles.push(BASE64.encode(&attempt.decoded));
        }
    }
    for (name, text) in &texts {
        for needle in &needles {
            assert!(
                !text.contains(needle.as_str()),
                "{name} shows a secret ({needle:?}):\n{text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The daemon: refresh grant and XOAUTH2
// ---------------------------------------------------------------------------

#[test]
fn first_send_fetches_a_token_and_authenticates_with_the_exact_xoauth2_string() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    // A STARTTLS relay under the same test CA: ca_file is trusted for both.
    let relay = TestServer::start(
        ServerOptions {
            tls: Tls::StartTls,
            ..relay_options(&[1], false)
        },
        Some(&ca),
    );
    let relay_lines = format!("relay = localhost:{}\ntls = starttls\n", relay.port());
    let mut site = site(
        "oauth_first_send",
        &ca,
        &endpoint,
        &relay_lines,
        Some(&refresh_token(1)),
    );
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "first");

    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(subject(&got[0]), "first");
    assert!(got[0].tls);
    assert_eq!(got[0].auth_mechanism.as_deref(), Some("XOAUTH2"));
    assert_eq!(got[0].auth_token, Some(access_token(1)));
    assert_eq!(got[0].auth_user.as_deref(), Some(USER));

    // The refresh request, field by field (RFC 6749 §6).
    let requests = endpoint.requests_to("/token");
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(r.grant_type(), "refresh_token");
    assert_eq!(r.param("refresh_token"), Some(refresh_token(1).as_str()));
    assert_eq!(r.param("client_id"), Some(CLIENT_ID));
    assert_eq!(r.param("client_secret"), Some(CLIENT_SECRET));
    assert_eq!(r.param("scope"), Some(SCOPE));
    assert_eq!(endpoint.tls_failures(), 0);

    // The XOAUTH2 string on the wire, exactly, as the initial response.
    let expected = xoauth2_string(&access_token(1));
    let attempts = relay.oauth_attempts();
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    assert_eq!(attempts[0].decoded, expected);
    let auth_lines: Vec<String> = relay
        .commands()
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| c.to_ascii_uppercase().starts_with("AUTH"))
        .collect();
    assert_eq!(
        auth_lines,
        [format!("AUTH XOAUTH2 {}", BASE64.encode(&expected))]
    );

    let queue = site.daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // Not rotated: the token file is as it was.
    assert_eq!(
        read_token_file(&site.token_file)["refresh_token"],
        refresh_token(1)
    );
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn cached_access_token_serves_later_sessions_until_it_expires() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let mut site = site(
        "oauth_cached",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "one");
    assert_eq!(relay.wait_for_messages(1, ARRIVAL).len(), 1);
    // The relay records a message before its 250: until the session has
    // ended, "two" could still ride it.
    assert!(
        relay.wait_for_idle(ARRIVAL),
        "the first session did not end"
    );
    site.daemon.submit_note(USER, RCPT, "two");
    let got = relay.wait_for_messages(2, ARRIVAL);
    assert_eq!(got.len(), 2, "log:\n{}", site.daemon.log());
    // Two sessions, one token: valid for an hour, so no second refresh.
    assert_eq!(relay.oauth_attempts().len(), 2);
    assert_eq!(endpoint.count("/token"), 1);
    assert!(got.iter().all(|m| m.auth_token == Some(access_token(1))));
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn expired_access_token_is_refreshed_before_the_next_session() {
    let ca = TestCa::new();
    let provider = Provider::new(STALE_AT_ONCE, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1, 2], false), None);
    let mut site = site(
        "oauth_expiry",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();

    site.daemon.submit_note(USER, RCPT, "one");
    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_token, Some(access_token(1)));
    assert_eq!(endpoint.count("/token"), 1);

    // Without rotation the same refresh token serves again.
    let used = second_session_after_expiry(&site, &relay, &endpoint);
    assert_eq!(used, [Some(refresh_token(1)), Some(refresh_token(1))]);
    // No AUTH was refused: the stale token was never tried.
    assert!(relay.oauth_attempts().iter().all(|a| a.accepted));
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn rotated_refresh_token_replaces_the_file_and_is_used_next() {
    let ca = TestCa::new();
    let provider = Provider::new(STALE_AT_ONCE, true);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1, 2], false), None);
    let mut site = site(
        "oauth_rotation",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();

    site.daemon.submit_note(USER, RCPT, "one");
    assert_eq!(
        relay.wait_for_messages(1, ARRIVAL).len(),
        1,
        "log:\n{}",
        site.daemon.log()
    );
    // rt-1 was answered with rt-2 (and revoked): the file holds rt-2, 0600,
    // and no temporary file is left beside it.
    let rotated = wait_until(ARRIVAL, || {
        read_token_file(&site.token_file)["refresh_token"] == refresh_token(2)
    });
    assert!(rotated, "token file: {}", read_token_file(&site.token_file));
    assert_eq!(mode(&site.token_file), 0o600);
    let leftovers: Vec<String> = fs::read_dir(site.token_file.parent().expect("folder"))
        .expect("read token folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["acme.json"]);

    let used = second_session_after_expiry(&site, &relay, &endpoint);
    assert_eq!(used, [Some(refresh_token(1)), Some(refresh_token(2))]);
    assert_eq!(
        read_token_file(&site.token_file)["refresh_token"],
        refresh_token(3)
    );
    assert_eq!(mode(&site.token_file), 0o600);
    assert_no_secrets(&site, Some(&relay), &[]);
}

/// The provider rotates the refresh token and revokes the old one, but the
/// disk will not take the new one: the daemon keeps it in memory, says so
/// once, and offers it at the next refresh, so mail keeps going out.
#[test]
fn rotated_refresh_token_the_disk_refuses_is_kept_and_used() {
    let ca = TestCa::new();
    let provider = Provider::new(STALE_AT_ONCE, true);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1, 2], false), None);
    let mut site = site(
        "oauth_rotation_unsaved",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    // A token file whose temporary files' names would be longer than a file
    // name may be (255 bytes): every save fails, even for root, while the
    // file itself reads fine.
    let unsavable = site
        .token_file
        .with_file_name(format!("{}.json", "t".repeat(225)));
    fs::rename(&site.token_file, &unsavable).expect("rename token file");
    let config = fs::read_to_string(site.daemon.config_path())
        .expect("read config")
        .replace(
            &site.token_file.display().to_string(),
            &unsavable.display().to_string(),
        );
    site.daemon.write_config(&config);
    site.token_file = unsavable;
    site.daemon.start();

    site.daemon.submit_note(USER, RCPT, "one");
    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    // rt-1 was revoked when rt-2 was issued: only the kept rt-2 could work.
    let used = second_session_after_expiry(&site, &relay, &endpoint);
    assert_eq!(used, [Some(refresh_token(1)), Some(refresh_token(2))]);
    assert_eq!(
        read_token_file(&site.token_file)["refresh_token"],
        refresh_token(1)
    );
    assert_eq!(mode(&site.token_file), 0o600);
    assert!(temp_files(&site.token_file).is_empty());
    let queue = site.daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // Said once, though both rotations and every retry failed to save.
    let log = site.daemon.log();
    let told = log
        .lines()
        .filter(|l| l.contains("cannot be saved"))
        .count();
    assert_eq!(told, 1, "log:\n{log}");
    assert_no_secrets(&site, Some(&relay), &[]);
}

/// A crash during rotation can leave `.acme.json.PID.ID.tmp` files beside the
/// token file, each holding a refresh token. When the daemon first uses the
/// token file it removes those whose writer is gone (or that are old), and
/// keeps the token file, a write in progress and other files' temporaries.
#[test]
fn temp_files_of_an_interrupted_rotation_are_removed_and_the_token_file_kept() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let mut site = site(
        "oauth_stale_temps",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    let folder = site
        .token_file
        .parent()
        .expect("token folder")
        .to_path_buf();
    let dead = dead_pid();
    let crashed = format!(".acme.json.{dead}.0A1B2C3D4E5F60718293A4B.tmp");
    let old_style = ".acme.json.06B03E181B954E001FA6001.tmp".to_string();
    let in_progress = format!(
        ".acme.json.{}.0A1B2C3D4E5F60718293A4C.tmp",
        std::process::id()
    );
    let other_file = format!(".shop.json.{dead}.0A1B2C3D4E5F60718293A4D.tmp");
    for name in [&crashed, &old_style, &in_progress, &other_file] {
        write_token_file(&folder.join(name), &refresh_token(9));
    }
    // Written an hour ago, by a version that did not name its process.
    fs::File::options()
        .write(true)
        .open(folder.join(&old_style))
        .expect("open old temp")
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .expect("age old temp");
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "after a crash");

    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_token, Some(access_token(1)));
    let mut kept = vec![in_progress, other_file];
    kept.sort();
    assert_eq!(temp_files(&site.token_file), kept);
    assert_eq!(
        read_token_file(&site.token_file)["refresh_token"],
        refresh_token(1)
    );
    let requests = endpoint.requests_to("/token");
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(
        requests[0].param("refresh_token"),
        Some(refresh_token(1).as_str())
    );
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn invalid_grant_defers_the_tenants_mail_and_asks_for_oauth_login_once() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    provider.revoke_all();
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let mut site = site(
        "oauth_invalid_grant",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();
    for subject in ["one", "two", "three"] {
        site.daemon.submit_note(USER, RCPT, subject);
    }

    // Every message tried, and the endpoint asked again on a later retry.
    let queue = site.daemon.wait_for_queue(ARRIVAL, |q| {
        q.len() == 3 && q.iter().all(|e| attempts(e) >= 1)
    });
    assert_eq!(queue.len(), 3, "{queue:#?}");
    assert!(
        endpoint.wait_for_requests("/token", 3, ARRIVAL).len() >= 3,
        "the daemon stopped asking the endpoint"
    );
    let queue = site.daemon.queue();
    for entry in &queue {
        assert_eq!(str_of(entry, "state"), "deferred", "{entry:#}");
        assert!(
            str_of(entry, "last_error").contains("oauth login"),
            "{entry:#}"
        );
    }
    // Deferred, not bounced: nothing went to the relay at all.
    assert_eq!(relay.connections(), 0);
    let acme = tenant_status(&site.daemon);
    assert!(
        str_of(&acme, "last_error").contains("oauth login"),
        "status: {acme:#}"
    );
    assert_eq!(acme["bounced"], 0, "status: {acme:#}");
    // Said once in the log, not per message or per retry: the deferrals it
    // causes are recorded in the spool (queue shows them) but logged at
    // debug only, below what an admin's log_level shows.
    let log = site.daemon.log();
    let told: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("oauth login") && !l.contains(" DEBUG: "))
        .collect();
    assert_eq!(told.len(), 1, "{told:#?}\nlog:\n{log}");

    // The admin signs in again (simulated: the provider accepts a new token,
    // which is stored where `oauth login` would put it); a flush delivers.
    provider.accept_refresh(&refresh_token(7));
    write_token_file(&site.token_file, &refresh_token(7));
    let flush = site.daemon.run(&["flush", "--tenant", "acme"], b"");
    assert_eq!(flush.code, 0, "{flush:?}");
    let got = relay.wait_for_messages(3, ARRIVAL);
    assert_eq!(got.len(), 3, "log:\n{}", site.daemon.log());
    let queue = site.daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert_no_secrets(&site, Some(&relay), &[&flush]);
}

#[test]
fn token_endpoint_down_defers_and_mail_goes_when_it_is_back() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let mut site = site(
        "oauth_endpoint_down",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    endpoint.down();
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "while down");

    let queue = site
        .daemon
        .wait_for_queue(ARRIVAL, |q| q.len() == 1 && attempts(&q[0]) >= 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "state"), "deferred", "{queue:#?}");
    assert!(!str_of(&queue[0], "last_error").is_empty(), "{queue:#?}");
    assert_eq!(relay.connections(), 0);

    endpoint.up();
    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_token, Some(access_token(1)));
    let queue = site.daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn token_endpoint_5xx_is_temporary_and_retried() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    endpoint.push(
        "/token",
        Response::text(503, "<html>Service Unavailable</html>"),
    );
    endpoint.push(
        "/token",
        Response::json(500, serde_json::json!({"error": "server_error"})),
    );
    let relay = TestServer::start(relay_options(&[1], false), None);
    let mut site = site(
        "oauth_endpoint_5xx",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "retried");

    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_token, Some(access_token(1)));
    assert_eq!(endpoint.pending("/token"), 0);
    assert_eq!(endpoint.count("/token"), 3);
    // Deferred twice, never bounced; delivered on the third attempt.
    assert_eq!(relay.messages().len(), 1);
    let queue = site.daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    // The counters are published after the session, not with the result:
    // the queue can be empty a moment before the status says delivered.
    let mut acme = Value::Null;
    wait_until(ARRIVAL, || {
        acme = tenant_status(&site.daemon);
        acme["delivered"] == 1
    });
    assert_eq!(acme["delivered"], 1, "status: {acme:#}");
    assert_eq!(acme["bounced"], 0, "status: {acme:#}");
    assert_no_secrets(&site, Some(&relay), &[]);
}

/// An endpoint that takes a minute to answer, and a second, plain tenant.
fn stalled_endpoint_site(
    test: &str,
    other_relay: &TestServer,
) -> (TestCa, OAuthServer, TestServer, Site) {
    let ca = TestCa::new();
    let endpoint = OAuthServer::start_with(&ca, |_| {
        Response::token(&access_token(1), 3600, None).delayed(Duration::from_secs(60))
    });
    let relay = TestServer::start(relay_options(&[1], false), None);
    let beta = format!(
        "[tenant:beta]\ndomains = beta.test\nrelay = 127.0.0.1:{}\ntls = none\n",
        other_relay.port()
    );
    let site = site_with(
        test,
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
        &beta,
    );
    (ca, endpoint, relay, site)
}

#[test]
fn stalled_token_endpoint_delays_only_its_tenant() {
    let beta_relay = TestServer::start(ServerOptions::default(), None);
    let (_ca, endpoint, relay, mut site) =
        stalled_endpoint_site("oauth_stalled_isolation", &beta_relay);
    site.daemon.start();
    site.daemon
        .submit_note(USER, RCPT, "stuck behind the endpoint");
    assert_eq!(endpoint.wait_for_requests("/token", 1, ARRIVAL).len(), 1);

    // Well under the 60 s stall, and room for starting sendmail and the
    // delivery on a loaded machine.
    let budget = Duration::from_secs(20);
    let started = Instant::now();
    let run = site.daemon.sendmail(
        &["-i", "bob@example.com"],
        b"From: pbx@beta.test\nTo: bob@example.com\nSubject: beta\n\nb\n",
    );
    assert_eq!(run.code, 0, "{run:?}");
    let got = beta_relay.wait_for_messages(1, budget);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert!(started.elapsed() < budget, "took {:?}", started.elapsed());
    // acme is still waiting for its first answer: asked once, nothing sent.
    assert_eq!(endpoint.count("/token"), 1);
    assert_eq!(relay.connections(), 0);
}

#[test]
fn sigterm_with_a_stalled_token_endpoint_exits_within_the_session_grace() {
    let beta_relay = TestServer::start(ServerOptions::default(), None);
    let (_ca, endpoint, _relay, mut site) =
        stalled_endpoint_site("oauth_stalled_sigterm", &beta_relay);
    site.daemon.start();
    site.daemon
        .submit_note(USER, RCPT, "stuck behind the endpoint");
    assert_eq!(endpoint.wait_for_requests("/token", 1, ARRIVAL).len(), 1);
    // The daemon gives sessions 10 s; a token fetch must not hold it longer.
    let started = Instant::now();
    let status = site.daemon.stop();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(14), "SIGTERM took {took:?}");
    assert!(status.success() || status.code().is_some(), "{status:?}");
    // The message is still queued for the next start.
    let queue = site.daemon.queue();
    assert_eq!(queue.len(), 1, "{queue:#?}");
}

#[test]
fn oauthbearer_is_preferred_when_the_relay_offers_it() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], true), None);
    let mut site = site(
        "oauth_oauthbearer",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "bearer");

    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_mechanism.as_deref(), Some("OAUTHBEARER"));
    let attempts = relay.oauth_attempts();
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    // RFC 7628 §3.1, with the relay's host and port as configured.
    assert_eq!(
        attempts[0].decoded,
        format!(
            "n,a={USER},\x01host=127.0.0.1\x01port={}\x01auth=Bearer {}\x01\x01",
            relay.port(),
            access_token(1)
        )
    );
    assert_no_secrets(&site, Some(&relay), &[]);
}

/// The relay refuses the first token (334 error, then 535 after the client's
/// answer): the message is deferred, not bounced, the token forgotten, and
/// the next attempt fetches a fresh one although the first had an hour left.
fn refused_token_is_forgotten_and_refreshed(test: &str, oauthbearer: bool, ack: &str) {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[2], oauthbearer), None);
    let mut site = site(
        test,
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "refused first");

    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_token, Some(access_token(2)));
    let attempts = relay.oauth_attempts();
    let summary: Vec<(Option<String>, bool, Option<String>)> = attempts
        .iter()
        .map(|a| (a.token.clone(), a.accepted, a.client_ack.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some(access_token(1)), false, Some(ack.to_string())),
            (Some(access_token(2)), true, None),
        ]
    );
    assert_eq!(endpoint.count("/token"), 2);
    // The 535 deferred the message (no bounce went out through the relay).
    assert_eq!(relay.messages().len(), 1);
    let queue = site.daemon.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(queue.is_empty(), "{queue:#?}");
    let acme = tenant_status(&site.daemon);
    assert_eq!(acme["bounced"], 0, "status: {acme:#}");
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn token_refused_with_a_plain_535_is_forgotten_and_refreshed() {
    // Microsoft 365 answers a bad token with 535 5.7.3 and no 334 challenge.
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(
        ServerOptions {
            faults: vec![(
                "AUTH".into(),
                1,
                Fault::Reply("535 5.7.3 Authentication unsuccessful".into()),
            )],
            ..relay_options(&[1, 2], false)
        },
        None,
    );
    let mut site = site(
        "oauth_refused_535",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "refused first");
    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_token, Some(access_token(2)));
    let tokens: Vec<Option<String>> = relay
        .oauth_attempts()
        .iter()
        .map(|a| a.token.clone())
        .collect();
    assert_eq!(tokens, [Some(access_token(1)), Some(access_token(2))]);
    assert_eq!(endpoint.count("/token"), 2);
    let acme = tenant_status(&site.daemon);
    assert_eq!(acme["bounced"], 0, "status: {acme:#}");
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn missing_token_file_defers_and_asks_for_oauth_login() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let mut site = site(
        "oauth_no_token_file",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        None,
    );
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "never signed in");
    let queue = site
        .daemon
        .wait_for_queue(ARRIVAL, |q| q.len() == 1 && attempts(&q[0]) >= 1);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    assert_eq!(str_of(&queue[0], "state"), "deferred", "{queue:#?}");
    let why = str_of(&queue[0], "last_error");
    assert!(why.contains("oauth login"), "{why}");
    // Nothing to refresh with: the endpoint and the relay are not bothered.
    assert_eq!(endpoint.count("/token"), 0);
    assert_eq!(relay.connections(), 0);
    assert_no_secrets(&site, Some(&relay), &[]);
}

#[test]
fn xoauth2_token_refused_by_the_relay_is_forgotten_and_refreshed() {
    refused_token_is_forgotten_and_refreshed("oauth_refused_xoauth2", false, "");
}

#[test]
fn oauthbearer_token_refused_by_the_relay_is_forgotten_and_refreshed() {
    refused_token_is_forgotten_and_refreshed("oauth_refused_oauthbearer", true, "AQ==");
}

#[test]
fn test_command_authenticates_with_a_fresh_token_and_redacts_it() {
    let ca = TestCa::new();
    let provider = Provider::new(3600, false);
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let site = site(
        "oauth_test_command",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        Some(&refresh_token(1)),
    );
    let config = site.daemon.config_path().to_string_lossy().into_owned();
    let args = [
        "test",
        "--tenant",
        "acme",
        "--to",
        "alice@example.com",
        "-c",
        &config,
    ];
    let ok = site.daemon.run(&args, b"");
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(
        ok.stdout.contains("AUTH XOAUTH2 <credentials redacted>"),
        "{ok:?}"
    );
    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].auth_token, Some(access_token(1)));

    // A refused refresh token: the command says what to do, and fails.
    provider.revoke_all();
    let refused = site.daemon.run(&args, b"");
    assert_ne!(refused.code, 0, "{refused:?}");
    let said = format!("{}{}", refused.stdout, refused.stderr);
    assert!(said.contains("oauth login"), "{refused:?}");
    assert_eq!(relay.connections(), 1, "connected without a token");
    assert_no_secrets(&site, Some(&relay), &[&ok, &refused]);
}

// ---------------------------------------------------------------------------
// `pbxmail oauth login`: the device grant
// ---------------------------------------------------------------------------

const DEVICE_CODE: &str = "d3vice-code-zq";
const USER_CODE: &str = "WDJB-MJHT";
const VERIFY_URI: &str = "https://microsoft.com/devicelogin";

fn device_answer() -> Response {
    Response::json(
        200,
        serde_json::json!({
            "device_code": DEVICE_CODE,
            "user_code": USER_CODE,
            "verification_uri": VERIFY_URI,
            "expires_in": 900,
            "interval": 1,
            "message": "To sign in, use a web browser"
        }),
    )
}

/// One `pbxmail oauth login` and what it left behind.
struct Login {
    site: Site,
    endpoint: OAuthServer,
    /// The tenant's relay (for tests that go on to send).
    relay: TestServer,
    run: Run,
    device: Request,
    /// The device-grant polls of /token.
    polls: Vec<Request>,
}

/// Scripts /device and the device-grant polls of /token, runs `pbxmail oauth
/// login --tenant acme -c FILE`, and checks the requests every login makes.
fn device_login(test: &str, polls: Vec<Response>) -> Login {
    device_login_prepared(test, polls, |_| {})
}

/// `device_login`, with `prepare` run on the site before the login.
fn device_login_prepared(test: &str, polls: Vec<Response>, prepare: impl FnOnce(&Site)) -> Login {
    let ca = TestCa::new();
    let endpoint = OAuthServer::start(&ca);
    endpoint.push("/device", device_answer());
    for poll in polls {
        endpoint.push("/token", poll);
    }
    let relay = TestServer::start(relay_options(&[1], false), None);
    let site = site(test, &ca, &endpoint, &plain_relay(&relay), None);
    prepare(&site);
    let config = site.daemon.config_path().to_string_lossy().into_owned();
    let run = site
        .daemon
        .run(&["oauth", "login", "--tenant", "acme", "-c", &config], b"");

    let device = endpoint.requests_to("/device");
    assert_eq!(device.len(), 1, "{device:#?}");
    assert_eq!(device[0].method, "POST");
    assert_eq!(device[0].param("client_id"), Some(CLIENT_ID));
    assert_eq!(device[0].param("scope"), Some(SCOPE));
    assert!(
        run.stdout.contains(&format!(
            "To sign in, open {VERIFY_URI} and enter the code {USER_CODE}"
        )),
        "{run:?}"
    );
    let polls = endpoint.requests_to("/token");
    for poll in &polls {
        assert_eq!(
            poll.grant_type(),
            "urn:ietf:params:oauth:grant-type:device_code"
        );
        assert_eq!(poll.param("device_code"), Some(DEVICE_CODE));
        assert_eq!(poll.param("client_id"), Some(CLIENT_ID));
        assert!(poll.at >= device[0].at);
    }
    Login {
        site,
        endpoint,
        relay,
        run,
        device: device[0].clone(),
        polls,
    }
}

fn signed_in() -> Response {
    Response::token(&access_token(1), 3600, Some(&refresh_token(1)))
}

/// From the device request to the last poll, by the endpoint's clock: the
/// client's pacing without its process start-up.
fn polling_time(device: &Request, polls: &[Request]) -> Duration {
    polls
        .last()
        .map_or(Duration::ZERO, |p| p.at.duration_since(device.at))
}

/// Seconds between consecutive requests.
fn gaps(device: &Request, polls: &[Request]) -> Vec<f64> {
    let mut last = device.at;
    polls
        .iter()
        .map(|p| {
            let gap = p.at.duration_since(last).as_secs_f64();
            last = p.at;
            gap
        })
        .collect()
}

fn assert_signed_in(site: &Site, run: &Run) {
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        read_token_file(&site.token_file)["refresh_token"],
        refresh_token(1)
    );
    assert_eq!(mode(&site.token_file), 0o600);
    assert_no_secrets(site, None, &[run]);
}

fn assert_not_signed_in(site: &Site, run: &Run) {
    assert_ne!(run.code, 0, "{run:?}");
    assert!(!site.token_file.exists(), "a token file was written");
    assert_no_secrets(site, None, &[run]);
}

#[test]
fn device_login_stores_the_refresh_token() {
    let login = device_login("oauth_login_ok", vec![signed_in()]);
    assert_eq!(login.polls.len(), 1);
    assert_signed_in(&login.site, &login.run);
    assert_eq!(login.endpoint.pending("/token"), 0);
}

#[test]
fn device_login_keeps_polling_while_authorization_is_pending() {
    let pending = || Response::error("authorization_pending");
    let login = device_login(
        "oauth_login_pending",
        vec![pending(), pending(), signed_in()],
    );
    assert_eq!(login.polls.len(), 3);
    assert_signed_in(&login.site, &login.run);
    // interval = 1: about a second between polls, never hammering.
    let gaps = gaps(&login.device, &login.polls);
    assert!(gaps.iter().all(|&g| g >= 0.9), "polled too soon: {gaps:?}");
    let took = polling_time(&login.device, &login.polls);
    assert!(took < Duration::from_secs(10), "polling took {took:?}");
}

#[test]
fn device_login_slows_down_by_five_seconds_when_told() {
    let login = device_login(
        "oauth_login_slow_down",
        vec![Response::error("slow_down"), signed_in()],
    );
    assert_eq!(login.polls.len(), 2);
    assert_signed_in(&login.site, &login.run);
    // RFC 8628 §3.5: the interval grows by 5 s, from 1 s to 6 s.
    let gaps = gaps(&login.device, &login.polls);
    assert!(gaps[0] >= 0.9, "{gaps:?}");
    assert!(gaps[1] >= 5.9, "did not slow down: {gaps:?}");
    let took = polling_time(&login.device, &login.polls);
    assert!(took < Duration::from_secs(12), "polling took {took:?}");
}

#[test]
fn device_login_fails_when_the_code_expires() {
    let login = device_login(
        "oauth_login_expired",
        vec![
            Response::error("authorization_pending"),
            Response::error("expired_token"),
        ],
    );
    assert_eq!(login.polls.len(), 2);
    assert_not_signed_in(&login.site, &login.run);
    assert!(login.run.stderr.contains("expired"), "{:?}", login.run);
}

#[test]
fn device_login_fails_when_access_is_denied() {
    let login = device_login("oauth_login_denied", vec![Response::error("access_denied")]);
    assert_eq!(login.polls.len(), 1);
    assert_not_signed_in(&login.site, &login.run);
    let stderr = &login.run.stderr;
    assert!(
        stderr.contains("declined") || stderr.contains("denied"),
        "{:?}",
        login.run
    );
}

#[test]
fn device_login_gives_up_when_the_code_lifetime_ends() {
    // The server never decides; the client stops at the code's expires_in.
    let ca = TestCa::new();
    let endpoint = OAuthServer::start_with(&ca, |_| Response::error("authorization_pending"));
    endpoint.push(
        "/device",
        Response::json(
            200,
            serde_json::json!({
                "device_code": DEVICE_CODE,
                "user_code": USER_CODE,
                "verification_uri": VERIFY_URI,
                "expires_in": 3,
                "interval": 1
            }),
        ),
    );
    let relay = TestServer::start(relay_options(&[1], false), None);
    let site = site(
        "oauth_login_lifetime",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        None,
    );
    let config = site.daemon.config_path().to_string_lossy().into_owned();
    let run = site
        .daemon
        .run(&["oauth", "login", "--tenant", "acme", "-c", &config], b"");
    assert_not_signed_in(&site, &run);
    assert!(run.stderr.contains("expired"), "{run:?}");
    let device = endpoint.requests_to("/device");
    assert_eq!(device.len(), 1, "{device:#?}");
    let polls = endpoint.requests_to("/token");
    let took = polling_time(&device[0], &polls);
    assert!(took < Duration::from_secs(8), "polling took {took:?}");
    assert!(
        (1..=4).contains(&polls.len()),
        "{} polls in a 3 s lifetime",
        polls.len()
    );
}

#[test]
fn device_login_token_is_then_used_by_the_daemon() {
    let mut login = device_login("oauth_login_then_send", vec![signed_in()]);
    assert_signed_in(&login.site, &login.run);
    // The daemon refreshes with the stored token against the same endpoint.
    let provider = Provider::new(3600, false);
    login.endpoint.set_handler(move |req| provider.answer(req));
    login.site.daemon.start();
    login.site.daemon.submit_note(USER, RCPT, "after login");
    let got = login.relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", login.site.daemon.log());
    assert_eq!(got[0].auth_token, Some(access_token(1)));
    let refresh: Vec<Request> = login
        .endpoint
        .requests_to("/token")
        .into_iter()
        .filter(|r| r.grant_type() == "refresh_token")
        .collect();
    assert_eq!(refresh.len(), 1);
    assert_eq!(
        refresh[0].param("refresh_token"),
        Some(refresh_token(1).as_str())
    );
    assert_no_secrets(&login.site, Some(&login.relay), &[&login.run]);
}

/// `sudo pbxmail oauth login` into the folder the package made for the
/// daemon's user: the token file becomes that user's (still 0600), or the
/// daemon, not root, could not read it and would report "sign-in needed".
#[test]
fn login_as_root_hands_the_token_file_to_the_token_folders_owner() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "login_as_root_hands_the_token_file_to_the_token_folders_owner: skipped, needs \
             root; the owner rule is unit-tested in src/oauth/token_file.rs"
        );
        return;
    }
    const NOBODY: u32 = 65534;
    let login = device_login_prepared("oauth_login_owner", vec![signed_in()], |site| {
        let folder = site.token_file.parent().expect("token folder");
        fs::create_dir_all(folder).expect("mkdir token folder");
        std::os::unix::fs::chown(folder, Some(NOBODY), Some(NOBODY)).expect("chown folder");
    });
    assert_signed_in(&login.site, &login.run);
    let meta = fs::metadata(&login.site.token_file).expect("stat token file");
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(
        login
            .run
            .stdout
            .contains(&format!("(uid {NOBODY}), mode 0600")),
        "{:?}",
        login.run
    );
    assert!(
        !login.run.stdout.contains("belongs to root"),
        "{:?}",
        login.run
    );
    assert!(temp_files(&login.site.token_file).is_empty());
}

/// The daemon's text for an unreachable endpoint ends in "will retry"; the
/// login retries nothing, so it says what to check and to run it again.
#[test]
fn login_with_the_endpoint_unreachable_says_to_check_it_and_run_again() {
    let ca = TestCa::new();
    let endpoint = OAuthServer::start(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let site = site(
        "oauth_login_unreachable",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        None,
    );
    endpoint.down();
    let config = site.daemon.config_path().to_string_lossy().into_owned();
    let run = site
        .daemon
        .run(&["oauth", "login", "--tenant", "acme", "-c", &config], b"");
    assert_eq!(run.code, 75, "{run:?}");
    assert!(run.stderr.contains(&endpoint.url("/device")), "{run:?}");
    assert!(run.stderr.contains("Check the network"), "{run:?}");
    assert!(
        run.stderr
            .contains("run `pbxmail oauth login --tenant acme` again"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("will retry"), "{run:?}");
    assert_not_signed_in(&site, &run);
}

// ---------------------------------------------------------------------------
// `pbxmail oauth login`: the authorization code grant with PKCE (Google)
// ---------------------------------------------------------------------------

/// The authorization codes the simulated provider hands out: shaped like
/// Google's (a `/` that the redirect percent-encodes) and marked for leaks.
fn auth_code(n: usize) -> String {
    format!("4/0Ab-auth-c0de-{n}{MARK}")
}

/// What the endpoint's own query carries, as the gmail preset's does.
const AUTH_QUERY: &str = "access_type=offline&prompt=consent";

/// One code the authorization endpoint issued, and what it is bound to.
struct Issued {
    code: String,
    challenge: String,
    redirect_uri: String,
    used: bool,
}

/// An authorization server: GET /authorize checks the request as Google does
/// and redirects to the client's loopback address with a code; the code grant
/// on /token checks the PKCE verifier against the challenge (RFC 7636 §4.6),
/// the redirect URI and the client; the refresh grant is `Provider`'s.
#[derive(Clone)]
struct Authorizer {
    refresh: Provider,
    issued: Arc<Mutex<Vec<Issued>>>,
}

impl Authorizer {
    fn new() -> Authorizer {
        Authorizer {
            refresh: Provider::new(3600, false),
            issued: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn issued(&self) -> std::sync::MutexGuard<'_, Vec<Issued>> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(&self, req: &Request) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/authorize") => self.authorize(req),
            ("POST", "/token") if req.grant_type() == "authorization_code" => self.exchange(req),
            _ => self.refresh.answer(req),
        }
    }

    fn authorize(&self, req: &Request) -> Response {
        let q = |key: &str| req.query_param(key).unwrap_or_default();
        let redirect_uri = q("redirect_uri");
        let problems = [
            (q("response_type") == "code", "response_type"),
            (q("client_id") == CLIENT_ID, "client_id"),
            (q("scope") == SCOPE, "scope"),
            (
                redirect_uri.starts_with("http://127.0.0.1:"),
                "redirect_uri",
            ),
            (
                q("code_challenge_method") == "S256",
                "code_challenge_method",
            ),
            (q("code_challenge").len() == 43, "code_challenge"),
            (!q("state").is_empty(), "state"),
        ];
        if let Some((_, name)) = problems.iter().find(|(ok, _)| !ok) {
            // Google shows an error page; it never redirects a bad request.
            return Response::text(400, &format!("Error 400: invalid_request ({name})"));
        }
        let mut issued = self.issued();
        let code = auth_code(issued.len() + 1);
        issued.push(Issued {
            code: code.clone(),
            challenge: q("code_challenge"),
            redirect_uri: redirect_uri.clone(),
            used: false,
        });
        Response::redirect(&format!(
            "{redirect_uri}?state={}&code={}&scope={}",
            form_encode(&q("state")),
            form_encode(&code),
            form_encode(SCOPE)
        ))
    }

    fn exchange(&self, req: &Request) -> Response {
        if req.param("client_id") != Some(CLIENT_ID)
            || req.param("client_secret") != Some(CLIENT_SECRET)
        {
            return Response::json(401, serde_json::json!({"error": "invalid_client"}));
        }
        let verifier = req.param("code_verifier").unwrap_or("");
        let mut issued = self.issued();
        let Some(grant) = issued
            .iter_mut()
            .find(|i| Some(i.code.as_str()) == req.param("code") && !i.used)
        else {
            return Response::error("invalid_grant");
        };
        if req.param("redirect_uri") != Some(grant.redirect_uri.as_str())
            || pkce_s256(verifier) != grant.challenge
        {
            return Response::error("invalid_grant");
        }
        grant.used = true;
        Response::token(&access_token(100), 3599, Some(&refresh_token(1)))
    }

    fn serve(&self, ca: &TestCa) -> OAuthServer {
        let authorizer = self.clone();
        OAuthServer::start_with(ca, move |req| authorizer.answer(req))
    }
}

/// RFC 7636 §4.2, computed independently of pbxmail.
fn pkce_s256(verifier: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// `application/x-www-form-urlencoded` value encoding.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The device-grant site plus `oauth_auth_url` (with a query of its own, as
/// the gmail preset's), so the code grant is the tenant's flow.
fn code_site(test: &str, ca: &TestCa, endpoint: &OAuthServer, relay: &TestServer) -> Site {
    let lines = format!(
        "{}oauth_auth_url = {}?{AUTH_QUERY}\n",
        plain_relay(relay),
        endpoint.url("/authorize")
    );
    site(test, ca, endpoint, &lines, None)
}

/// Visits `url` as the admin's browser would and returns where the
/// authorization endpoint redirected it (the address the admin pastes).
fn browse(ca: &TestCa, url: &str) -> String {
    let root = ureq::tls::Certificate::from_der(ca.ca_der().as_ref()).to_owned();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![root])))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_global(Some(ARRIVAL))
            .build(),
    );
    let response = agent
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(response.status().as_u16(), 302, "GET {url}: {response:?}");
    response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a Location header")
        .to_string()
}

/// A running `pbxmail oauth login` that the test talks to as the admin:
/// stdout read line by line as it comes, stdin written when the test says.
struct Interactive {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Interactive {
    fn start(site: &Site, extra: &[&str]) -> Interactive {
        use std::io::{BufRead, Read};
        use std::process::{Command, Stdio};
        let config = site.daemon.config_path().to_string_lossy().into_owned();
        let mut child = Command::new(crate::support::harness::PBXMAIL)
            .args(["oauth", "login", "--tenant", "acme", "-c", &config])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pbxmail oauth login");
        let stdout = child.stdout.take().expect("stdout pipe");
        let mut stderr = child.stderr.take().expect("stderr pipe");
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Interactive {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// The first stdout line starting with `prefix`; panics (with what was
    /// printed) if none comes.
    fn line_starting(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + ARRIVAL;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line starting with {prefix:?}; stdout so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Types `text` and Enter, closes stdin and waits for the command to end.
    fn paste(mut self, text: &str) -> Run {
        use std::io::Write;
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(format!("{text}\n").as_bytes());
        }
        let deadline = Instant::now() + ARRIVAL;
        let status = loop {
            match self.child.try_wait().expect("wait for pbxmail") {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    panic!("oauth login still running after the paste")
                }
                None => thread::sleep(Duration::from_millis(20)),
            }
        };
        // The reader ends at the pipe's EOF, so this collects all of stdout.
        self.seen.extend(self.lines.iter());
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        Run {
            code: status.code().unwrap_or(-1),
            stdout: self.seen.join("\n"),
            stderr,
        }
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        // Only after a failed assertion: our own child, by its handle.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The query of the authorization request the endpoint received (the
/// printed address, visited by the test's browser).
fn authorize_query(endpoint: &OAuthServer) -> Request {
    let requests = endpoint.requests_to("/authorize");
    assert_eq!(requests.len(), 1, "{requests:#?}");
    requests[0].clone()
}

#[test]
fn code_login_stores_the_refresh_token_and_the_daemon_then_sends() {
    let ca = TestCa::new();
    let authorizer = Authorizer::new();
    let endpoint = authorizer.serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let mut site = code_site("oauth_code_ok", &ca, &endpoint, &relay);

    let mut login = Interactive::start(&site, &[]);
    let printed = login.line_starting(&endpoint.url("/authorize?"));
    let location = browse(&ca, &printed);
    let run = login.paste(&location);
    assert_signed_in(&site, &run);
    assert!(
        run.stdout.contains(&format!(
            "Signed in; refresh token stored in {}",
            site.token_file.display()
        )),
        "{run:?}"
    );

    // The printed address, as the authorization endpoint received it: the
    // endpoint's own query first, then RFC 6749 §4.1.1 and RFC 7636 §4.3.
    let authorize = authorize_query(&endpoint);
    assert_eq!(
        printed,
        endpoint.url(&format!("/authorize?{}", authorize.query))
    );
    assert!(
        authorize.query.starts_with(&format!("{AUTH_QUERY}&")),
        "{printed}"
    );
    let q = |key: &str| authorize.query_param(key).unwrap_or_default();
    assert_eq!(q("response_type"), "code");
    assert_eq!(q("client_id"), CLIENT_ID);
    assert_eq!(q("scope"), SCOPE);
    assert_eq!(q("code_challenge_method"), "S256");
    assert_eq!(q("login_hint"), USER);
    let redirect_uri = q("redirect_uri");
    let port: u16 = redirect_uri
        .strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.strip_suffix('/'))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("redirect_uri {redirect_uri:?}"));
    assert!(port >= 49152, "{redirect_uri}");
    let state = q("state");
    assert!(
        state.len() >= 22,
        "state {state:?} is too short to guess-proof"
    );
    assert!(location.starts_with(&format!("{redirect_uri}?state={state}&code=")));

    // The exchange (RFC 6749 §4.1.3, RFC 7636 §4.5): the endpoint issued the
    // refresh token only because SHA-256 of this verifier is the challenge.
    let exchange = endpoint.requests_to("/token");
    assert_eq!(exchange.len(), 1, "{exchange:#?}");
    let x = &exchange[0];
    assert_eq!(x.method, "POST");
    assert_eq!(x.grant_type(), "authorization_code");
    assert_eq!(x.param("code"), Some(auth_code(1).as_str()));
    assert_eq!(x.param("redirect_uri"), Some(redirect_uri.as_str()));
    assert_eq!(x.param("client_id"), Some(CLIENT_ID));
    assert_eq!(x.param("client_secret"), Some(CLIENT_SECRET));
    let verifier = x.param("code_verifier").unwrap_or_default().to_string();
    assert!(
        (43..=128).contains(&verifier.len())
            && verifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)),
        "verifier {verifier:?}"
    );
    assert_eq!(pkce_s256(&verifier), q("code_challenge"));
    assert_ne!(verifier, state);
    assert!(authorizer.issued()[0].used);
    for text in [&run.stdout, &run.stderr] {
        assert!(!text.contains(&verifier), "the verifier was shown:\n{text}");
    }

    // The daemon delivers with the stored token, exactly as after a device login.
    site.daemon.start();
    site.daemon.submit_note(USER, RCPT, "after code login");
    let got = relay.wait_for_messages(1, ARRIVAL);
    assert_eq!(got.len(), 1, "log:\n{}", site.daemon.log());
    assert_eq!(got[0].auth_mechanism.as_deref(), Some("XOAUTH2"));
    assert_eq!(got[0].auth_token, Some(access_token(1)));
    let refresh: Vec<Request> = endpoint
        .requests_to("/token")
        .into_iter()
        .filter(|r| r.grant_type() == "refresh_token")
        .collect();
    assert_eq!(refresh.len(), 1);
    assert_eq!(
        refresh[0].param("refresh_token"),
        Some(refresh_token(1).as_str())
    );
    assert_no_secrets(&site, Some(&relay), &[&run]);
}

#[test]
fn code_login_refuses_an_address_with_another_state() {
    let ca = TestCa::new();
    let endpoint = Authorizer::new().serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let site = code_site("oauth_code_state", &ca, &endpoint, &relay);

    let mut login = Interactive::start(&site, &[]);
    let printed = login.line_starting(&endpoint.url("/authorize?"));
    let location = browse(&ca, &printed);
    let state = authorize_query(&endpoint)
        .query_param("state")
        .expect("a state");
    // A genuine code, but under another sign-in's state (RFC 6749 §10.12).
    let forged = location.replace(&format!("state={state}"), "state=F0rged-state-0123456789");
    assert_ne!(forged, location);
    let run = login.paste(&forged);
    assert_eq!(run.code, 65, "{run:?}");
    assert_not_signed_in(&site, &run);
    assert!(run.stderr.contains("state"), "{run:?}");
    assert_eq!(endpoint.count("/token"), 0, "the code was exchanged");
}

#[test]
fn code_login_reports_invalid_grant_and_stores_nothing() {
    let ca = TestCa::new();
    let endpoint = Authorizer::new().serve(&ca);
    endpoint.push(
        "/token",
        Response::json(
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "Bad Request"}),
        ),
    );
    let relay = TestServer::start(relay_options(&[1], false), None);
    let site = code_site("oauth_code_invalid_grant", &ca, &endpoint, &relay);

    let mut login = Interactive::start(&site, &[]);
    let printed = login.line_starting(&endpoint.url("/authorize?"));
    let run = login.paste(&browse(&ca, &printed));
    assert_eq!(run.code, 65, "{run:?}");
    assert_not_signed_in(&site, &run);
    assert!(run.stderr.contains("invalid_grant"), "{run:?}");
    assert!(run.stderr.contains("run the command again"), "{run:?}");
    let exchange = endpoint.requests_to("/token");
    assert_eq!(exchange.len(), 1, "{exchange:#?}");
    assert_eq!(exchange[0].grant_type(), "authorization_code");
}

#[test]
fn code_login_accepts_the_bare_code_as_the_address_bar_shows_it() {
    let ca = TestCa::new();
    let endpoint = Authorizer::new().serve(&ca);
    let relay = TestServer::start(relay_options(&[1], false), None);
    let site = code_site("oauth_code_bare", &ca, &endpoint, &relay);

    let mut login = Interactive::start(&site, &[]);
    let printed = login.line_starting(&endpoint.url("/authorize?"));
    let location = browse(&ca, &printed);
    // Only the value after code=, still percent-encoded ("4%2F0Ab-…").
    let code = location
        .split_once("code=")
        .and_then(|(_, rest)| rest.split('&').next())
        .expect("a code in the redirect")
        .to_string();
    assert!(code.starts_with("4%2F"), "{code}");
    let run = login.paste(&code);
    assert_signed_in(&site, &run);
    let exchange = endpoint.requests_to("/token");
    assert_eq!(exchange.len(), 1, "{exchange:#?}");
    assert_eq!(exchange[0].param("code"), Some(auth_code(1).as_str()));
}

#[test]
fn login_flow_follows_oauth_auth_url_unless_flow_says_otherwise() {
    let ca = TestCa::new();
    let endpoint = OAuthServer::start(&ca);
    endpoint.push("/device", device_answer());
    endpoint.push("/token", signed_in());
    let relay = TestServer::start(relay_options(&[1], false), None);
    // Both endpoints set: the code grant is the tenant's flow...
    let site = code_site("oauth_flow_choice", &ca, &endpoint, &relay);
    let config = site.daemon.config_path().to_string_lossy().into_owned();
    let login = ["oauth", "login", "--tenant", "acme", "-c", &config];
    let nothing_pasted = site.daemon.run(&login, b"");
    assert_eq!(nothing_pasted.code, 65, "{nothing_pasted:?}");
    assert!(
        nothing_pasted
            .stdout
            .contains(&endpoint.url(&format!("/authorize?{AUTH_QUERY}&response_type=code"))),
        "{nothing_pasted:?}"
    );
    assert_eq!(endpoint.count("/device"), 0);
    assert!(!site.token_file.exists());

    // ...and --flow device signs in with the device grant all the same.
    let device = site
        .daemon
        .run(&[&login[..], &["--flow", "device"]].concat(), b"");
    assert_signed_in(&site, &device);
    assert!(device.stdout.contains(USER_CODE), "{device:?}");
    assert!(!device.stdout.contains("/authorize"), "{device:?}");
    assert_eq!(endpoint.count("/device"), 1);

    let bad = site
        .daemon
        .run(&[&login[..], &["--flow", "browser"]].concat(), b"");
    assert_eq!(bad.code, 64, "{bad:?}");

    // Without oauth_auth_url, --flow code is a configuration problem.
    let device_only = site_with(
        "oauth_flow_code_unset",
        &ca,
        &endpoint,
        &plain_relay(&relay),
        None,
        "",
    );
    let config = device_only
        .daemon
        .config_path()
        .to_string_lossy()
        .into_owned();
    let unset = device_only.daemon.run(
        &[
            "oauth", "login", "--tenant", "acme", "--flow", "code", "-c", &config,
        ],
        b"",
    );
    assert_eq!(unset.code, 78, "{unset:?}");
    assert!(unset.stderr.contains("oauth_auth_url"), "{unset:?}");
    assert_no_secrets(&site, None, &[&nothing_pasted, &device, &bad, &unset]);
}
