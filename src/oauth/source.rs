//! A tenant's access tokens: fetched from the token endpoint with the stored
//! refresh token (RFC 6749 §6) and cached until shortly before they expire.
//! Each tenant's thread owns its own, so a slow or failing endpoint delays
//! only that tenant. A rotated refresh token the disk will not take is kept
//! in memory, used, and saved again until it sticks: the provider may have
//! revoked the one the file still holds.

use super::http::{post_token, seconds_within};
use super::token_file::{read_refresh_token, remove_stale_temps, write_refresh_token};
use super::{Endpoints, OAuthError};
use crate::base::secret::Secret;
use std::time::{Duration, Instant};

/// Refresh this long before the endpoint says the token expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(120);

/// The longest an access token is trusted, whatever `expires_in` says:
/// providers issue them for an hour; a day bounds a hostile or broken answer.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);

/// A tenant's access tokens: cached, refreshed when near expiry.
pub struct TokenSource {
    endpoints: Endpoints,
    agent: ureq::Agent,
    cached: Option<(Secret, Instant)>,
    unsaved: Option<Unsaved>,
}

/// The newest refresh token, which the token file could not take.
struct Unsaved {
    token: Secret,
    /// What the file held when it was read: anything else there now was
    /// written by a sign-in since, which wins over this.
    replaces: Secret,
}

impl TokenSource {
    /// Also removes what a crash during an earlier rotation left beside the
    /// token file (see `remove_stale_temps`).
    pub fn new(endpoints: Endpoints, agent: ureq::Agent) -> TokenSource {
        let path = &endpoints.token_file;
        match remove_stale_temps(path) {
            Ok(removed) if !removed.is_empty() => log::info!(
                "tenant {}: removed {} temporary token file(s) an interrupted write left beside {}",
                endpoints.tenant,
                removed.len(),
                path.display()
            ),
            Ok(_) => {}
            Err(e) => log::warn!(
                "tenant {}: cannot look for leftover temporary token files beside {}: {e}",
                endpoints.tenant,
                path.display()
            ),
        }
        TokenSource {
            endpoints,
            agent,
            cached: None,
            unsaved: None,
        }
    }

    /// A valid access token, from the cache or the token endpoint. A rotated
    /// refresh token in the answer replaces the stored one before it is used;
    /// if it cannot be stored, it is used from memory (see `keep_rotated`).
    pub fn access_token(&mut self) -> Result<Secret, OAuthError> {
        // Each session tries again to save a rotated token the disk refused.
        self.save_unsaved();
        if let Some((token, valid_until)) = &self.cached {
            if Instant::now() < *valid_until {
                return Ok(token.clone());
            }
        }
        let refresh = self.refresh_token()?;
        let e = &self.endpoints;
        let grant = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.expose()),
            ("client_id", e.client_id.as_str()),
        ];
        let scope: Vec<_> = e.scope.iter().map(|s| ("scope", s.as_str())).collect();
        let (status, answer) = post_token(&self.agent, e, &grant, &scope)?;
        match (answer.access_token, answer.error.as_deref()) {
            (Some(access), _) if (200..300).contains(&status) => {
                if let Some(rotated) = answer.refresh_token.filter(|r| r != refresh.expose()) {
                    self.keep_rotated(Secret::new(rotated), refresh);
                }
                let valid_until = valid_until(Instant::now(), answer.expires_in);
                let token = Secret::new(access);
                self.cached = Some((token.clone(), valid_until));
                Ok(token)
            }
            (_, Some("invalid_grant")) => {
                self.cached = None;
                Err(OAuthError::SignInNeeded(format!(
                    "the refresh token was refused: {}",
                    answer.error_description.unwrap_or_else(|| "invalid_grant".into())
                )))
            }
            (_, Some("invalid_client" | "unauthorized_client")) => Err(OAuthError::Config(format!(
                "the token endpoint refused the client ({}): check oauth_client_id and the client secret",
                answer.error.unwrap_or_default()
            ))),
            _ => Err(OAuthError::Temporary(format!(
                "{} answered HTTP {status}{}",
                e.token_url,
                answer.error.map(|e| format!(" ({e})")).unwrap_or_default()
            ))),
        }
    }

    /// Forgets the cached token (the relay refused it).
    pub fn forget(&mut self) {
        self.cached = None;
    }

    /// The refresh token to offer: the newest, which is the one waiting to
    /// be saved if there is one, else the file's.
    fn refresh_token(&self) -> Result<Secret, OAuthError> {
        match &self.unsaved {
            Some(unsaved) => Ok(unsaved.token.clone()),
            None => read_refresh_token(&self.endpoints.token_file),
        }
    }

    /// Stores a rotated refresh token; if the disk refuses (full, read-only),
    /// keeps it to use and to save later, and tells the admin once.
    fn keep_rotated(&mut self, token: Secret, offered: Secret) {
        let path = &self.endpoints.token_file;
        match write_refresh_token(path, &token) {
            Ok(_) => self.unsaved = None,
            Err(e) => {
                let why = match e {
                    OAuthError::Config(why) => why,
                    other => other.to_string(),
                };
                if self.unsaved.is_none() {
                    log::error!(
                        "tenant {}: the provider rotated the OAuth refresh token, but it cannot \
                         be saved: {why}. pbxmail keeps using it from memory and tries to save it \
                         before each session; fix the disk or folder before pbxmail stops, or \
                         sign in again afterwards",
                        self.endpoints.tenant
                    );
                }
                // The file still holds what it held before the first failure.
                let replaces = self.unsaved.take().map_or(offered, |u| u.replaces);
                self.unsaved = Some(Unsaved { token, replaces });
            }
        }
    }

    /// Tries again to save the token the disk refused, unless the file now
    /// holds one a sign-in wrote since.
    fn save_unsaved(&mut self) {
        let Some(unsaved) = &self.unsaved else {
            return;
        };
        let (tenant, path) = (&self.endpoints.tenant, &self.endpoints.token_file);
        if let Ok(stored) = read_refresh_token(path) {
            if stored == unsaved.token {
                self.unsaved = None;
                return;
            }
            if stored != unsaved.replaces {
                log::warn!(
                    "tenant {tenant}: {} was replaced (by `pbxmail oauth login`?) while a rotated \
                     refresh token waited to be saved; using the file's",
                    path.display()
                );
                self.unsaved = None;
                return;
            }
        }
        if write_refresh_token(path, &unsaved.token).is_ok() {
            log::info!(
                "tenant {tenant}: the rotated OAuth refresh token is saved in {} now",
                path.display()
            );
            self.unsaved = None;
        }
    }
}

/// Until when a token the endpoint says lives `expires_in` seconds is used:
/// clamped to a day and never past what an `Instant` can hold, less a margin
/// so it is renewed before the relay would refuse it.
fn valid_until(now: Instant, expires_in: Option<u64>) -> Instant {
    let lifetime = seconds_within(expires_in, 3600, MAX_TOKEN_LIFETIME);
    now.checked_add(lifetime.saturating_sub(EXPIRY_MARGIN))
        .unwrap_or(now)
}

impl Drop for TokenSource {
    /// A last try to save a token the disk refused; it is lost otherwise.
    fn drop(&mut self) {
        self.save_unsaved();
        if self.unsaved.is_some() {
            log::error!(
                "tenant {}: the newest OAuth refresh token could not be saved in {} and is lost \
                 now; if the provider revoked the one the file holds, run `pbxmail oauth login \
                 --tenant {}`",
                self.endpoints.tenant,
                self.endpoints.token_file.display(),
                self.endpoints.tenant
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::{Path, PathBuf};

    fn scratch(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pbxmail-source-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A file whose temporary files' names are too long: every save fails,
    /// even for root, while the file itself reads fine.
    fn unwritable(dir: &Path, token: &str) -> PathBuf {
        let path = dir.join(format!("{}.json", "u".repeat(225)));
        fs::write(&path, format!(r#"{{"refresh_token":"{token}"}}"#)).unwrap();
        path
    }

    fn source(token_file: PathBuf) -> TokenSource {
        let endpoints = Endpoints {
            tenant: "acme".into(),
            token_url: "http://127.0.0.1:9/token".into(),
            device_url: None,
            auth_url: None,
            client_id: "id".into(),
            client_secret: None,
            scope: None,
            token_file,
        };
        TokenSource::new(endpoints, ureq::Agent::new_with_defaults())
    }

    fn secret(text: &str) -> Secret {
        Secret::new(text.into())
    }

    /// A token endpoint on loopback that answers every request with `body`.
    fn token_endpoint(body: &'static str) -> String {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut form = vec![0; length];
                let _ = reader.read_exact(&mut form);
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        url
    }

    #[test]
    fn huge_expires_in_from_the_token_endpoint_does_not_panic_and_is_clamped() {
        for body in [
            r#"{"access_token":"at","expires_in":18446744073709551615}"#,
            r#"{"access_token":"at","expires_in":"18446744073709551615"}"#,
        ] {
            let dir = scratch("huge-expiry");
            let token_file = dir.join("acme.json");
            fs::write(&token_file, r#"{"refresh_token":"rt"}"#).unwrap();
            let mut tokens = source(token_file);
            tokens.endpoints.token_url = token_endpoint(body);
            let before = Instant::now();
            assert_eq!(tokens.access_token().unwrap().expose(), "at");
            let (_, until) = tokens.cached.as_ref().unwrap();
            assert!(*until <= before + MAX_TOKEN_LIFETIME + Duration::from_secs(60));
            assert!(*until > before + Duration::from_secs(3600));
        }
    }

    #[test]
    fn token_lifetime_is_clamped_to_a_day_and_never_overflows() {
        let now = Instant::now();
        let max = now + MAX_TOKEN_LIFETIME - EXPIRY_MARGIN;
        assert_eq!(valid_until(now, Some(u64::MAX)), max);
        assert_eq!(valid_until(now, Some(60)), now);
        assert_eq!(
            valid_until(now, None),
            now + Duration::from_secs(3600) - EXPIRY_MARGIN
        );
    }

    #[test]
    fn rotated_token_the_disk_refuses_is_used_and_saved_once_it_can_be() {
        let dir = scratch("unsaved");
        let mut tokens = source(unwritable(&dir, "rt-1"));
        tokens.keep_rotated(secret("rt-2"), secret("rt-1"));
        tokens.save_unsaved();
        assert!(tokens.unsaved.is_some());
        assert_eq!(tokens.refresh_token().unwrap().expose(), "rt-2");
        // Rotated again before the disk recovered: the newest is kept, and
        // the file's token is still the one it replaces.
        tokens.keep_rotated(secret("rt-3"), secret("rt-2"));
        assert_eq!(tokens.refresh_token().unwrap().expose(), "rt-3");
        let kept = tokens.unsaved.as_ref().unwrap();
        assert_eq!(kept.replaces.expose(), "rt-1");

        // The disk takes it again (here: the same token in a file it can
        // write): the next use saves it and offers it from the file.
        let good = dir.join("acme.json");
        fs::write(&good, r#"{"refresh_token":"rt-1"}"#).unwrap();
        tokens.endpoints.token_file = good.clone();
        tokens.save_unsaved();
        assert_eq!(tokens.refresh_token().unwrap().expose(), "rt-3");
        assert!(tokens.unsaved.is_none());
        assert_eq!(read_refresh_token(&good).unwrap().expose(), "rt-3");
        drop(tokens);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A source whose file holds rt-1 and whose rotated rt-2 waits to be saved.
    fn waiting_to_save(dir: &Path) -> (PathBuf, TokenSource) {
        let path = dir.join("acme.json");
        fs::write(&path, r#"{"refresh_token":"rt-1"}"#).unwrap();
        let mut tokens = source(path.clone());
        tokens.unsaved = Some(Unsaved {
            token: secret("rt-2"),
            replaces: secret("rt-1"),
        });
        (path, tokens)
    }

    #[test]
    fn a_sign_in_since_wins_over_the_unsaved_token() {
        let dir = scratch("superseded");
        let (path, mut tokens) = waiting_to_save(&dir);
        // `oauth login` stored a new token meanwhile.
        fs::write(&path, r#"{"refresh_token":"rt-new"}"#).unwrap();
        tokens.save_unsaved();
        assert_eq!(tokens.refresh_token().unwrap().expose(), "rt-new");
        assert!(tokens.unsaved.is_none());
        assert_eq!(read_refresh_token(&path).unwrap().expose(), "rt-new");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn dropping_the_source_saves_what_waits() {
        let dir = scratch("drop");
        let (path, tokens) = waiting_to_save(&dir);
        drop(tokens);
        assert_eq!(read_refresh_token(&path).unwrap().expose(), "rt-2");
        let _ = fs::remove_dir_all(&dir);
    }
}
