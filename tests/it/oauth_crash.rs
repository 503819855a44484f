//! Issue 7, "a crash during token-file rotation": the daemon of an xoauth2
//! tenant is killed with SIGKILL at random moments while mail flows and the
//! token endpoint rotates the refresh token on every refresh. After every
//! kill the tenant must still have a valid token file: present, mode 0600,
//! JSON whose `refresh_token` the endpoint issued (and the newest one the
//! daemon could know of). Leftover temporary files of an interrupted write
//! are allowed, but only under the writer's own `.NAME.*.tmp` names; the
//! restarted daemon must refresh with the token file's token, not with one
//! of those, and removes them (they hold refresh tokens): none is left once
//! a daemon has run undisturbed. Every other kill is aimed at the rotation
//! (after the endpoint's answer, or as soon as a temporary file shows the
//! write), and the test asserts from the token folder that kills landed
//! there, inside the write at least once.
//!
//! Random choices come from a seeded PRNG; the seed is printed, and
//! `PBXMAIL_CRASH_SEED=N` repeats a run's choices.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::harness::{wait_until, Daemon, Running};
use crate::support::mail::{note, subject};
use crate::support::oauth_server::{OAuthServer, Request, Response};
use crate::support::rng::Rng;
use crate::support::smtp_server::{ServerOptions, TestCa, TestServer};
use serde_json::Value;

const USER: &str = "pbx@acme.test";
const RCPT: &str = "alice@example.com";
const CLIENT_ID: &str = "pbx-client-42";
const CLIENT_SECRET: &str = "cl1ent-s3cret-zq";
const SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";
/// 121 s minus the daemon's 120 s expiry margin: every access token is stale
/// after about a second, so every daemon start (and every session a second
/// later) refreshes, and every refresh rotates the refresh token.
const EXPIRES_IN: u64 = 121;
/// Daemon kills per run.
const KILLS: usize = 20;
/// Longest time from a daemon's readiness to its SIGKILL.
const MAX_KILL_DELAY_MS: u64 = 400;
/// Access tokens the relay accepts (far more than a run fetches).
const ACCESS_TOKENS: usize = 5000;
/// Pause between two submissions of the message stream.
const SUBMIT_EVERY: Duration = Duration::from_millis(40);
/// Longest wait for everything accepted to arrive once the daemon runs undisturbed.
const DRAIN: Duration = Duration::from_secs(20);

fn access_token(n: usize) -> String {
    format!("acc3ss-tok-{n}-zq")
}

fn refresh_token(n: usize) -> String {
    format!("r3fresh-tok-{n}-zq")
}

// ---------------------------------------------------------------------------
// A provider that rotates on every refresh
// ---------------------------------------------------------------------------

/// One successful refresh grant.
#[derive(Clone, Debug)]
struct Grant {
    offered: String,
    issued: String,
}

#[derive(Default)]
struct ProviderState {
    /// Every refresh token ever issued (rt-1 by the "sign-in"), all accepted:
    /// a real provider revokes the old one only once the new one is used,
    /// and the model here is simply "anything it issued".
    issued: Vec<String>,
    /// Successful refresh grants, in the order they were answered.
    grants: Vec<Grant>,
    /// Refresh tokens offered that it never issued.
    refused: Vec<String>,
    /// Access tokens issued so far.
    access: usize,
}

#[derive(Clone)]
struct Provider {
    state: Arc<Mutex<ProviderState>>,
}

impl Provider {
    fn new() -> Provider {
        Provider {
            state: Arc::new(Mutex::new(ProviderState {
                issued: vec![refresh_token(1)],
                ..ProviderState::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProviderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(&self, req: &Request) -> Response {
        if req.path != "/token" || req.method != "POST" {
            return Response::json(404, serde_json::json!({"error": "not_found"}));
        }
        if req.param("client_id") != Some(CLIENT_ID)
            || req.param("client_secret") != Some(CLIENT_SECRET)
        {
            return Response::json(401, serde_json::json!({"error": "invalid_client"}));
        }
        if req.grant_type() != "refresh_token" {
            return Response::error("unsupported_grant_type");
        }
        let offered = req.param("refresh_token").unwrap_or("").to_string();
        let mut s = self.lock();
        if !s.issued.contains(&offered) {
            s.refused.push(offered);
            return Response::json(
                400,
                serde_json::json!({
                    "error": "invalid_grant",
                    "error_description": "The refresh token has expired or was revoked."
                }),
            );
        }
        s.access += 1;
        let access = access_token(s.access);
        let issued = refresh_token(s.issued.len() + 1);
        s.issued.push(issued.clone());
        s.grants.push(Grant {
            offered,
            issued: issued.clone(),
        });
        Response::token(&access, EXPIRES_IN, Some(&issued))
    }

    fn serve(&self, ca: &TestCa) -> OAuthServer {
        let provider = self.clone();
        OAuthServer::start_with(ca, move |req| provider.answer(req))
    }
}

// ---------------------------------------------------------------------------
// Setup (as in tests/oauth.rs)
// ---------------------------------------------------------------------------

/// Writes the CA, the client secret and the token file (rt-1, 0600), then
/// the config: one xoauth2 tenant `acme` relaying to `relay` in plaintext.
/// Returns the daemon's installation and the token file's path.
fn site(test: &str, ca: &TestCa, endpoint: &OAuthServer, relay: &TestServer) -> (Daemon, PathBuf) {
    let daemon = Daemon::bare(test);
    let ca_file = daemon.dir().join("ca.pem");
    ca.write_ca_pem(&ca_file);
    let secret_file = daemon.write_file("client.secret", &format!("{CLIENT_SECRET}\n"));
    let token_file = daemon.dir().join("oauth").join("acme.json");
    fs::create_dir_all(token_file.parent().expect("token file has a folder")).expect("mkdir");
    fs::write(
        &token_file,
        serde_json::json!({ "refresh_token": refresh_token(1) }).to_string(),
    )
    .expect("write token file");
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
    daemon.configure_with(
        "retry_max = 2s\nlog_level = info",
        &format!(
            "[tenant:acme]\n\
         domains = acme.test\n\
         relay = 127.0.0.1:{}\n\
         tls = none\n\
         allow_plaintext_auth = yes\n\
         connect_timeout = 5s\n\
         command_timeout = 10s\n\
         data_timeout = 10s\n\
         auth = xoauth2\n\
         username = {USER}\n\
         oauth_token_url = {}\n\
         oauth_client_id = {CLIENT_ID}\n\
         oauth_client_secret_file = {}\n\
         oauth_scope = {SCOPE}\n\
         oauth_token_file = {}\n\
         ca_file = {}\n",
            relay.port(),
            endpoint.url("/token"),
            secret_file.display(),
            token_file.display(),
            ca_file.display(),
        ),
    );
    (daemon, token_file)
}

/// The temporary-file names `write_refresh_token` uses for `token_file`.
fn is_temp_of(name: &str, token_file: &Path) -> bool {
    let base = token_file
        .file_name()
        .expect("token file name")
        .to_string_lossy();
    name.strip_prefix(&format!(".{base}."))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|id| !id.is_empty())
}

/// Whether the token folder holds a temporary file of `token_file` that is
/// not in `seen`: a write of it is under way (or was cut off).
fn new_temp_file(token_file: &Path, seen: &BTreeSet<String>) -> bool {
    let Some(folder) = token_file.parent() else {
        return false;
    };
    let Ok(entries) = fs::read_dir(folder) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        is_temp_of(&name, token_file) && !seen.contains(&name)
    })
}

/// Checks the token folder as a restarting daemon would find it: the token
/// file is there, a regular file, mode 0600, JSON with a `refresh_token` the
/// endpoint issued; anything else in the folder is a temporary file of an
/// interrupted write, private to the owner. Returns the stored token and the
/// temporary files' names.
fn check_token_folder(token_file: &Path, provider: &Provider, when: &str) -> (String, Vec<String>) {
    let meta = fs::symlink_metadata(token_file)
        .unwrap_or_else(|e| panic!("{when}: the token file {}: {e}", token_file.display()));
    assert!(
        meta.file_type().is_file(),
        "{when}: the token file is not a regular file: {meta:?}"
    );
    let mode = meta.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{when}: token file mode {mode:o}");
    let text = fs::read_to_string(token_file)
        .unwrap_or_else(|e| panic!("{when}: read {}: {e}", token_file.display()));
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{when}: the token file is not JSON ({e}): {text:?}"));
    let token = json["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{when}: no refresh_token string in the token file: {text:?}"))
        .to_string();
    assert!(
        provider.lock().issued.contains(&token),
        "{when}: the token file holds {token:?}, which the endpoint never issued"
    );
    let mut temps = Vec::new();
    let folder = token_file.parent().expect("token folder");
    for entry in fs::read_dir(folder).expect("read the token folder") {
        let entry = entry.expect("folder entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path() == token_file {
            continue;
        }
        assert!(
            is_temp_of(&name, token_file),
            "{when}: unexpected file {name:?} beside the token file"
        );
        let mode = entry.metadata().expect("stat temp").permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "{when}: temporary file {name} is mode {mode:o}: readable by others"
        );
        temps.push(name);
    }
    temps.sort();
    (token, temps)
}

/// Where a kill found the rotation.
#[derive(Default, Debug)]
struct KillPhases {
    /// No refresh was answered during this daemon's life.
    no_refresh: usize,
    /// A refresh was answered but the file still held the offered token
    /// (killed between the endpoint's answer and the rename).
    answered_not_stored: usize,
    /// ... and a new temporary file was left: killed inside the write.
    of_which_temp_left: usize,
    /// The file held the token the last refresh issued.
    stored: usize,
}

#[test]
fn crash_during_token_rotation_never_leaves_the_tenant_without_a_token() {
    let test = "crash_during_token_rotation_never_leaves_the_tenant_without_a_token";
    let started = Instant::now();
    let mut rng = Rng::from_env(test);
    let ca = TestCa::new();
    let provider = Provider::new();
    let endpoint = provider.serve(&ca);
    let relay = TestServer::start(
        ServerOptions {
            oauth_tokens: (1..=ACCESS_TOKENS).map(access_token).collect(),
            oauth_user: Some(USER.to_string()),
            ..ServerOptions::default()
        },
        None,
    );
    let (d, token_file) = site("oauth_crash_rotation", &ca, &endpoint, &relay);

    let stop_submitting = AtomicBool::new(false);
    let mut phases = KillPhases::default();
    let mut temps_seen: BTreeSet<String> = BTreeSet::new();
    // The token each killed daemon left: the next daemon must offer it.
    let mut left_token = refresh_token(1);
    let mut first_offers_checked = 0;

    let (accepted, refused) = thread::scope(|s| {
        // The message stream: sendmail spools whether a daemon runs or not.
        let submitter = s.spawn(|| {
            let mut accepted = Vec::new();
            let mut refused = Vec::new();
            let mut n = 0usize;
            while !stop_submitting.load(Ordering::SeqCst) {
                let subject = format!("stream-{n}");
                let run = d.sendmail(&["-i", RCPT], &note(USER, RCPT, &subject));
                if run.code == 0 {
                    accepted.push(subject);
                } else {
                    refused.push((subject, run.code, run.stderr));
                }
                n += 1;
                thread::sleep(SUBMIT_EVERY);
            }
            (accepted, refused)
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for kill in 1..=KILLS {
                let grants_before = provider.lock().grants.len();
                let mut daemon = Running::after_kill(&d);
                if kill % 2 == 0 {
                    thread::sleep(Duration::from_millis(rng.below(MAX_KILL_DELAY_MS + 1)));
                } else {
                    // Aim at the rotation itself: the endpoint has answered, so the
                    // daemon is between reading the new token and renaming its file.
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while provider.lock().grants.len() == grants_before && Instant::now() < deadline
                    {
                        thread::sleep(Duration::from_micros(200));
                    }
                    // Then kill at a random moment up to 3 ms on, or as soon as a
                    // new temporary file shows the write under way: inside it.
                    let until = Instant::now() + Duration::from_micros(rng.below(3000));
                    while Instant::now() < until && !new_temp_file(&token_file, &temps_seen) {
                        thread::sleep(Duration::from_micros(20));
                    }
                }
                let status = daemon.kill9();
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "kill {kill}: the daemon ended before it was killed ({status})"
                );
                let when = format!("after kill {kill}");
                let (token, temps) = check_token_folder(&token_file, &provider, &when);
                let grants = provider.lock().grants.clone();
                // The restarted daemon refreshed with the token the killed
                // one left in the file, not with a temporary file's.
                if let Some(first) = grants.get(grants_before) {
                    assert_eq!(
                        first.offered, left_token,
                        "{when}: the daemon's first refresh offered another token than the file held"
                    );
                    first_offers_checked += 1;
                }
                // Nothing newer was lost either: the file holds what the last
                // answered refresh offered or issued (one tenant thread refreshes).
                let newest = match grants.last() {
                    Some(g) => vec![g.offered.clone(), g.issued.clone()],
                    None => vec![refresh_token(1)],
                };
                assert!(
                    newest.contains(&token),
                    "{when}: the token file holds {token:?}, older than the last refresh {newest:?}"
                );
                let new_temps: Vec<&String> =
                    temps.iter().filter(|t| !temps_seen.contains(*t)).collect();
                if grants.len() == grants_before {
                    phases.no_refresh += 1;
                } else if grants.last().is_some_and(|g| g.issued == token) {
                    phases.stored += 1;
                } else {
                    phases.answered_not_stored += 1;
                    if !new_temps.is_empty() {
                        phases.of_which_temp_left += 1;
                    }
                }
                temps_seen.extend(temps.iter().cloned());
                left_token = token;
            }
        }));
        stop_submitting.store(true, Ordering::SeqCst);
        let submitted = submitter.join().expect("submitter thread");
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        submitted
    });
    assert!(
        refused.is_empty(),
        "sendmail refused submissions: {refused:#?}"
    );

    // Undisturbed at last: everything accepted goes out.
    let grants_before = provider.lock().grants.len();
    let mut daemon = Running::after_kill(&d);
    // One more message after the start, so this daemon refreshes (its cache
    // starts empty) even if the killed ones delivered everything else.
    let mut accepted = accepted;
    let run = d.sendmail(&["-i", RCPT], &note(USER, RCPT, "final"));
    assert_eq!(run.code, 0, "sendmail final: {run:?}");
    accepted.push("final".to_string());
    let want: BTreeSet<&str> = accepted.iter().map(String::as_str).collect();
    let drained = wait_until(DRAIN, || {
        let got: BTreeSet<String> = relay.messages().iter().map(subject).collect();
        want.iter().all(|s| got.contains(*s))
    });
    let status = daemon
        .stop_within(Duration::from_secs(15))
        .expect("the daemon did not exit within 15 s of SIGTERM");
    assert!(status.success(), "daemon stop: {status}");
    let (token, temps) = check_token_folder(&token_file, &provider, "at the end");

    let msgs = relay.messages();
    let got: Vec<String> = msgs.iter().map(subject).collect();
    let distinct: BTreeSet<&str> = got.iter().map(String::as_str).collect();
    let lost: Vec<&&str> = want.iter().filter(|s| !distinct.contains(**s)).collect();
    let unknown: Vec<&&str> = distinct.iter().filter(|s| !want.contains(**s)).collect();
    let grants = provider.lock().grants.clone();
    let refused_tokens = provider.lock().refused.clone();
    eprintln!(
        "oauth_crash: {KILLS} kills, {} accepted, {} delivered ({} distinct), {} refreshes \
         (each rotated), {} first offers checked, {} temp files left, in {:.1?}",
        accepted.len(),
        got.len(),
        distinct.len(),
        grants.len(),
        first_offers_checked,
        temps.len(),
        started.elapsed()
    );
    eprintln!("oauth_crash: where the kills found the rotation: {phases:?}");
    // The windows this test is about were hit, judged by the token folder
    // after each kill: killed after the endpoint's answer and before the
    // rename, and at least once inside the write (a temporary file left).
    assert!(
        phases.answered_not_stored >= 1 && phases.of_which_temp_left >= 1,
        "no kill landed inside a token rotation: {phases:?}"
    );
    assert!(
        drained && lost.is_empty(),
        "accepted but not delivered within {DRAIN:?}: {lost:?}"
    );
    assert!(
        unknown.is_empty(),
        "never submitted, yet delivered: {unknown:?}"
    );
    assert!(
        refused_tokens.is_empty(),
        "the daemon offered refresh tokens the endpoint never issued: {refused_tokens:?}"
    );
    if let Some(first) = grants.get(grants_before) {
        assert_eq!(
            first.offered, left_token,
            "the final daemon's first refresh offered another token than the file held"
        );
    }
    assert!(
        grants.len() > grants_before,
        "the final daemon never refreshed"
    );
    // The final daemon removed what the killed ones left (their writers are
    // gone) and left nothing of its own.
    assert!(
        temps.is_empty(),
        "temporary files of the killed daemons are left: {temps:?}"
    );
    // The final daemon stopped cleanly: the file holds the newest token.
    let newest = grants.last().map_or(refresh_token(1), |g| g.issued.clone());
    assert_eq!(
        token, newest,
        "the token file lags behind the last rotation"
    );
    let refused_access: Vec<String> = relay
        .oauth_attempts()
        .into_iter()
        .filter(|a| !a.accepted)
        .map(|a| a.decoded)
        .collect();
    assert!(
        refused_access.is_empty(),
        "the relay refused access tokens: {refused_access:?}"
    );
}
