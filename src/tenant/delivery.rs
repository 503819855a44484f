//! What a tenant worker does with due mail: open a session, send message
//! after message, record every recipient's outcome durably, and settle each
//! message: retry later, remove (delivered), or bounce (RFC 3464) to its
//! sender, else the postmaster, else keep it visibly failed.

use super::worker::TenantWorker;
use crate::bounce;
use crate::outcome::{self, Outcome, RcptJudgement, RetryScope};
use crate::smtp::client;
use crate::smtp::session::{Outgoing, Session};
use crate::smtp::SessionError;
use crate::spool::envelope::{BounceStage, Envelope, RcptResult, RcptStatus, Record};
use crate::spool::{self, MessageId};
use crate::tls::Stream;
use std::collections::HashSet;
use std::io::{BufReader, Seek};

/// A recipient's outcome in one attempt: (index in the envelope, address, outcome).
type RcptOutcome = (usize, String, Outcome);

/// How a session's run of messages ended.
enum SessionEnd {
    /// Nothing more due, or messages_per_session reached: QUIT.
    Done,
    /// The rate limit says wait: QUIT, and no new session until the next token.
    Paced,
    /// The session failed; `tenant_failing` when the relay itself is the problem.
    Broken { tenant_failing: bool },
}

impl TenantWorker {
    /// One SMTP session: up to messages_per_session due messages, the first
    /// of them `batch` (deferred together if the relay cannot be reached).
    /// Returns false when the relay failed or pacing ended the session.
    pub(super) fn run_session(&mut self, batch: &[MessageId]) -> bool {
        let mut settings = match &self.settings.client {
            Ok(settings) => settings.clone(),
            Err(why) => {
                let why = format!("tenant TLS settings unusable: {why}");
                self.defer_all(batch, "-", &why, RetryScope::Tenant, Announce::Each);
                return false;
            }
        };
        if !self.may_send_now() {
            return false;
        }
        if self.settings.oauth.is_some() {
            match self.access_token() {
                Ok(token) => settings.bearer = Some(token),
                Err(unavailable) => {
                    let relay = settings.relay.to_string();
                    // "Sign in again" is logged once, not once per message.
                    let announce = if unavailable.already_logged {
                        Announce::Repeat
                    } else {
                        Announce::Each
                    };
                    self.defer_all(
                        batch,
                        &relay,
                        &unavailable.why,
                        RetryScope::Tenant,
                        announce,
                    );
                    return false;
                }
            }
        }
        let mut connected = match client::open(&settings) {
            Ok(connected) => connected,
            Err(failure) => {
                if let (true, Some(tokens)) =
                    (outcome::forgets_token(&failure.error), self.tokens.as_mut())
                {
                    // The relay refused the token: fetch a fresh one next time.
                    tokens.forget();
                }
                let outcome = outcome::of_session_error(&failure.error).outcome;
                log::warn!(
                    "tenant {}: relay {}: {}",
                    self.name(),
                    failure.peer,
                    failure.error
                );
                self.defer_all(
                    batch,
                    &failure.peer,
                    outcome.reason(),
                    RetryScope::Tenant,
                    Announce::Each,
                );
                return false;
            }
        };
        self.tenant_backoff = None;
        self.in_session = true;
        self.publish();
        let outcome = self.send_due_messages(&mut connected);
        self.in_session = false;
        match outcome {
            SessionEnd::Done => {
                connected.session.quit();
                self.tenant_backoff.is_none()
            }
            SessionEnd::Paced => {
                connected.session.quit();
                false
            }
            SessionEnd::Broken { tenant_failing } => !tenant_failing,
        }
    }

    /// An access token for this session, refreshed by this thread when due, so a
    /// slow token endpoint delays only this tenant. Err: why the mail waits.
    fn access_token(&mut self) -> Result<crate::config::Secret, TokenUnavailable> {
        if self.tokens.is_none() {
            let endpoints = match &self.settings.oauth {
                Some(Ok(endpoints)) => endpoints.clone(),
                Some(Err(why)) => return Err(why.clone().into()),
                None => return Err(String::from("auth = xoauth2 without OAuth settings").into()),
            };
            let agent = crate::oauth::http_agent(self.settings.ca_file.as_deref())
                .map_err(|e| e.to_string())?;
            self.tokens = Some(crate::oauth::TokenSource::new(endpoints, agent));
        }
        let Some(tokens) = self.tokens.as_mut() else {
            return Err(String::from("no token source").into());
        };
        match tokens.access_token() {
            Ok(token) => {
                self.sign_in_logged = false;
                Ok(token)
            }
            Err(e) => {
                let why = e.to_string().replace("TENANT", self.name());
                let sign_in = matches!(e, crate::oauth::OAuthError::SignInNeeded(_));
                if !(sign_in && self.sign_in_logged) {
                    log::error!("tenant {}: {why}", self.name());
                }
                self.sign_in_logged |= sign_in;
                Err(TokenUnavailable {
                    why,
                    already_logged: sign_in,
                })
            }
        }
    }

    /// Sends due messages over an open session, up to messages_per_session.
    fn send_due_messages(&mut self, connected: &mut client::Connected) -> SessionEnd {
        let mut tried = HashSet::new();
        while tried.len() < self.settings.messages_per_session && !self.stopping() {
            // Mail submitted meanwhile rides this session too.
            self.take_waiting_jobs();
            let Some(id) = self.next_due(&tried) else {
                break;
            };
            if !tried.is_empty() && !self.may_send_now() {
                return SessionEnd::Paced;
            }
            tried.insert(id.clone());
            if let Err(broke) = self.deliver_one(&mut connected.session, &connected.peer, &id) {
                let e = &broke.error;
                log::warn!("tenant {}: relay {}: {e}", self.name(), connected.peer);
                let (scope, reason) = retry_after(e);
                if broke.recorded {
                    if scope == RetryScope::Tenant {
                        self.back_off_tenant();
                    }
                } else {
                    self.defer_all(
                        std::slice::from_ref(&id),
                        &connected.peer,
                        &reason,
                        scope,
                        Announce::Each,
                    );
                }
                return SessionEnd::Broken {
                    tenant_failing: scope == RetryScope::Tenant,
                };
            }
            if self.tenant_backoff.is_some() {
                // A reply showed the tenant's login is refused: stop here.
                break;
            }
        }
        SessionEnd::Done
    }

    /// Sends one message over an open session and records every recipient's result.
    fn deliver_one(
        &mut self,
        session: &mut Session<Stream>,
        peer: &str,
        id: &MessageId,
    ) -> Result<(), SessionBroke> {
        if !self.write_unrecorded(id) {
            return Ok(());
        }
        let envelope = match self.spool.load_envelope(self.name(), id) {
            Ok(env) => env,
            Err(e) if e.is_not_found() => {
                self.queue.remove(id); // deleted by an admin meanwhile
                return Ok(());
            }
            Err(e) => {
                self.quarantine(id, &e.to_string());
                return Ok(());
            }
        };
        let (mut file, eight_bit) = match self.open_verified(id, &envelope) {
            Ok(opened) => opened,
            Err(why) => {
                self.quarantine(id, &why);
                return Ok(());
            }
        };
        let mut pending: Vec<(usize, String)> = envelope
            .pending()
            .map(|(i, r)| (i, r.address.clone()))
            .collect();
        if pending.is_empty() {
            self.queue.remove(id);
            self.finish_done(id, &envelope, true);
            return Ok(());
        }
        let mail_from = self
            .settings
            .envelope_from
            .clone()
            .unwrap_or_else(|| envelope.sender.clone());
        let mut outcomes: Vec<RcptOutcome> = Vec::with_capacity(pending.len());
        // A 452 "too many recipients" after some were accepted means: send the
        // rest in a following transaction (RFC 5321 §4.5.3.1.10).
        while !pending.is_empty() {
            let rcpts: Vec<String> = pending.iter().map(|(_, a)| a.clone()).collect();
            let message = Outgoing {
                mail_from: &mail_from,
                recipients: &rcpts,
                size: envelope.size,
                eight_bit,
            };
            let sent = file
                .rewind()
                .map_err(|e| SessionError::Local(format!("cannot rewind the spooled message: {e}")))
                .and_then(|()| session.transaction(&message, &mut BufReader::new(&mut file)));
            let result = match sent {
                Ok(result) => result,
                Err(error) if outcomes.is_empty() => {
                    return Err(SessionBroke {
                        error,
                        recorded: false,
                    })
                }
                Err(error) => {
                    // A later transaction broke: what the relay already took
                    // stands (sending it again would duplicate it); only the
                    // recipients still unanswered are deferred.
                    let (scope, reason) = retry_after(&error);
                    outcomes.extend(pending.into_iter().map(|(index, address)| {
                        let retry = Outcome::Retry {
                            scope,
                            reason: reason.clone(),
                        };
                        (index, address, retry)
                    }));
                    self.record(id, &envelope, peer, outcomes, Some(reason), Announce::Each);
                    return Err(SessionBroke {
                        error,
                        recorded: true,
                    });
                }
            };
            let mut again = Vec::new();
            let judged = outcome::of_transaction(&result.per_recipient);
            for ((index, address), judgement) in pending.into_iter().zip(judged) {
                match judgement {
                    RcptJudgement::SendAgain => again.push((index, address)),
                    RcptJudgement::Final(verdict) => {
                        outcomes.push((index, address, verdict.outcome))
                    }
                }
            }
            pending = again;
        }
        let tenant_refused = outcomes.iter().any(|(_, _, o)| o.refuses_tenant());
        self.record(id, &envelope, peer, outcomes, None, Announce::Each);
        if tenant_refused {
            self.back_off_tenant();
        }
        Ok(())
    }

    /// Opens the message file and checks it against the SHA-256 in its
    /// envelope; the same pass notes whether it has 8-bit content.
    fn open_verified(
        &self,
        id: &MessageId,
        envelope: &Envelope,
    ) -> Result<(std::fs::File, bool), String> {
        let mut file = self
            .spool
            .open_message(self.name(), id)
            .map_err(|e| format!("message file unreadable: {e}"))?;
        let scan =
            spool::scan_message(&mut file).map_err(|e| format!("message file unreadable: {e}"))?;
        if scan.sha256 != envelope.sha256 {
            return Err(format!(
                "message file checksum mismatch (SHA-256 {}, envelope says {})",
                scan.sha256, envelope.sha256
            ));
        }
        Ok((file, scan.eight_bit))
    }

    /// Defers every pending recipient of each message after a session failure.
    pub(super) fn defer_all(
        &mut self,
        ids: &[MessageId],
        relay: &str,
        reason: &str,
        scope: RetryScope,
        announce: Announce,
    ) {
        if scope == RetryScope::Tenant {
            self.back_off_tenant();
        }
        for id in ids {
            if !self.write_unrecorded(id) {
                continue;
            }
            let envelope = match self.spool.load_envelope(self.name(), id) {
                Ok(env) => env,
                Err(e) if e.is_not_found() => {
                    self.queue.remove(id);
                    continue;
                }
                Err(e) => {
                    self.quarantine(id, &e.to_string());
                    continue;
                }
            };
            let outcomes = envelope
                .pending()
                .map(|(i, r)| {
                    let retry = Outcome::Retry {
                        scope,
                        reason: reason.to_string(),
                    };
                    (i, r.address.clone(), retry)
                })
                .collect();
            self.record(
                id,
                &envelope,
                relay,
                outcomes,
                Some(reason.to_string()),
                announce,
            );
        }
    }

    /// Logs one line per recipient, appends the attempt durably, and settles
    /// the message. A retry past max_queue_lifetime becomes a bounce.
    fn record(
        &mut self,
        id: &MessageId,
        envelope: &Envelope,
        relay: &str,
        outcomes: Vec<RcptOutcome>,
        error: Option<String>,
        announce: Announce,
    ) {
        let now = spool::unix_millis();
        let age_ms = now.saturating_sub(envelope.queued_at_ms);
        let delay = age_ms as f64 / 1000.0;
        let mut results = Vec::with_capacity(outcomes.len());
        let mut still_pending = 0;
        let mut last_problem = error;
        for (rcpt, address, outcome) in outcomes {
            let outcome = outcome.expire(age_ms, self.settings.max_queue_lifetime);
            let level = match (&outcome, announce) {
                (Outcome::Retry { .. }, Announce::Repeat) => log::Level::Debug,
                _ => log::Level::Info,
            };
            log::log!(
                level,
                "{id} tenant={} to=<{address}> relay={relay} delay={delay:.1}s status={} ({})",
                self.name(),
                outcome.status(),
                outcome.reason()
            );
            let status = match &outcome {
                Outcome::Delivered { .. } => RcptStatus::Sent,
                Outcome::Retry { .. } => {
                    still_pending += 1;
                    RcptStatus::Pending
                }
                Outcome::Bounce { .. } => RcptStatus::Failed,
            };
            self.count(&outcome);
            if status != RcptStatus::Sent {
                last_problem = Some(outcome.reason().to_string());
            }
            results.push(RcptResult {
                rcpt,
                status,
                reply: outcome.reason().to_string(),
            });
        }
        let pending_before = envelope.pending().count();
        still_pending += pending_before.saturating_sub(results.len());
        let next_attempt_ms = (still_pending > 0).then(|| {
            now + self
                .settings
                .backoff
                .after(envelope.attempts + 1)
                .as_millis() as u64
        });
        let record = Record::Attempt {
            at_ms: now,
            results,
            next_attempt_ms,
            error: last_problem,
        };
        if let Err(e) = self.spool.append(self.name(), id, &record) {
            // Keep the result in memory and write it before this message is
            // touched again: re-sending what the relay already took (the disk
            // is full, say) would deliver it once per retry.
            log::error!(
                "{id} tenant={}: cannot record the delivery result, will retry: {e}",
                self.name()
            );
            self.unrecorded.insert(id.clone(), record);
            let retry = now + self.settings.backoff.min.as_millis() as u64;
            self.schedule(id, retry, true);
            return;
        }
        match next_attempt_ms {
            Some(at) => self.schedule(id, at, true),
            None => {
                self.queue.remove(id);
                match self.spool.load_envelope(self.name(), id) {
                    Ok(done) => self.finish_done(id, &done, true),
                    Err(e) => log::error!(
                        "{id} tenant={}: cannot re-read the envelope: {e}",
                        self.name()
                    ),
                }
            }
        }
    }

    /// A message with no recipient pending: removed if every one was sent;
    /// otherwise bounced to its sender (or the postmaster), and a bounce that
    /// cannot be delivered goes to the postmaster; what nobody can take stays
    /// in the spool as failed. `announce` logs the "kept" case (not on rescans).
    pub(super) fn finish_done(&mut self, id: &MessageId, envelope: &Envelope, announce: bool) {
        let tenant = self.name().to_string();
        self.queue.remove(id);
        if !envelope.any_failed() || envelope.bounced_as.is_some() {
            self.failed.remove(id);
            if !self.archive_before_removal(id, envelope) {
                return;
            }
            if let Err(e) = self.spool.remove(&tenant, id) {
                log::error!("{id} tenant={tenant}: done, but cannot remove it from the spool: {e}");
            }
            return;
        }
        self.failed.insert(id.clone());
        let kept = |why: &str| {
            if announce {
                log::warn!("{id} tenant={tenant}: kept in the queue as failed: {why}");
            }
        };
        match &envelope.bounce {
            // Never a bounce of a bounce: it goes to the postmaster once, then stays.
            Some(of) if of.stage == BounceStage::Sender => match self.settings.postmaster.clone() {
                Some(postmaster) => {
                    let redirect = Record::Redirect {
                        to: vec![postmaster.clone()],
                    };
                    match self.spool.append(&tenant, id, &redirect) {
                        Ok(()) => {
                            log::info!("{id} tenant={tenant}: bounce undeliverable to its sender; sending it to <{postmaster}>");
                            self.failed.remove(id);
                            self.schedule(id, 0, false);
                        }
                        Err(e) => kept(&format!(
                            "cannot redirect the bounce to the postmaster: {e}"
                        )),
                    }
                }
                None => kept("its bounce could not be delivered and no postmaster is configured"),
            },
            Some(_) => kept("its bounce could not be delivered to the postmaster either"),
            None => self.bounce(id, envelope, announce),
        }
    }

    fn bounce(&mut self, id: &MessageId, envelope: &Envelope, announce: bool) {
        let tenant = self.name().to_string();
        let Some((to, stage)) = bounce::addressee(envelope, self.settings.postmaster.as_deref())
        else {
            if announce {
                log::warn!("{id} tenant={tenant}: kept in the queue as failed: null sender and no postmaster configured");
            }
            return;
        };
        let relay_host = match &self.settings.client {
            Ok(client) => client.relay.host.clone(),
            Err(_) => "unknown".to_string(),
        };
        let report = bounce::Report {
            hostname: &self.settings.hostname,
            relay_host: &relay_host,
            id,
            envelope,
        };
        let dsn = match bounce::queue(&self.spool, &tenant, &report, &to, stage) {
            Ok(dsn) => dsn,
            Err(e) => {
                // Stays failed on disk; the next rescan tries again.
                log::error!("{id} tenant={tenant}: cannot queue its bounce: {e}");
                return;
            }
        };
        log::info!("{id} tenant={tenant}: bounce {dsn} queued to <{to}>");
        let marked = Record::Bounced {
            dsn: dsn.to_string(),
        };
        match self.spool.append(&tenant, id, &marked) {
            Ok(()) if !self.archive_before_removal(id, envelope) => {}
            Ok(()) => {
                if let Err(e) = self.spool.remove(&tenant, id) {
                    log::error!(
                        "{id} tenant={tenant}: bounced, but cannot remove it from the spool: {e}"
                    );
                }
            }
            Err(e) => log::error!("{id} tenant={tenant}: cannot record its bounce: {e}"),
        }
        self.schedule(&dsn, 0, false);
    }

    /// Journals a message that reached at least one recipient into the
    /// tenant's archive, if it keeps one; true when the spool entry may go.
    /// On failure the entry stays and is tried again, so nothing sent is
    /// missing from the archive.
    fn archive_before_removal(&mut self, id: &MessageId, envelope: &Envelope) -> bool {
        let Some(policy) = &self.settings.archive else {
            return true;
        };
        let delivered = envelope
            .recipients
            .iter()
            .any(|r| r.status == RcptStatus::Sent);
        let addresses: Vec<String> = envelope
            .recipients
            .iter()
            .map(|r| r.address.clone())
            .collect();
        let user = crate::archive::user_of(&envelope.sender, &addresses);
        if !delivered || !policy.archives(&user) {
            return true;
        }
        match policy.archive(
            &self.spool,
            self.name(),
            id,
            &user,
            envelope.queued_at_ms / 1000,
        ) {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "{id} tenant={}: cannot archive it (kept in the spool, will retry): {e}",
                    self.name()
                );
                // Delivered but not yet journaled: `status` shows why it waits.
                self.note_error(format!(
                    "delivered, but cannot archive {id} (kept in the spool, retried): {e}"
                ));
                let retry = spool::unix_millis() + self.settings.backoff.min.as_millis() as u64;
                self.schedule(id, retry, true);
                false
            }
        }
    }

    /// Writes a result that could not be written before. False if it still cannot.
    fn write_unrecorded(&mut self, id: &MessageId) -> bool {
        let Some(record) = self.unrecorded.get(id) else {
            return true;
        };
        if let Err(e) = self.spool.append(self.name(), id, record) {
            log::error!(
                "{id} tenant={}: still cannot record the delivery result: {e}",
                self.name()
            );
            let retry = spool::unix_millis() + self.settings.backoff.min.as_millis() as u64;
            self.schedule(id, retry, true);
            return false;
        }
        self.unrecorded.remove(id);
        true
    }
}

/// A session that broke while one message was being sent.
struct SessionBroke {
    error: SessionError,
    /// The message's results are already recorded (some recipients were
    /// answered before the break); there is nothing left to defer.
    recorded: bool,
}

/// The retry a broken session means for the mail it was carrying.
fn retry_after(error: &SessionError) -> (RetryScope, String) {
    match outcome::of_session_error(error).outcome {
        Outcome::Retry { scope, reason } => (scope, reason),
        other => (RetryScope::Message, other.reason().to_string()),
    }
}

/// Why a session cannot have an access token.
struct TokenUnavailable {
    why: String,
    /// Said once in the log already (a sign-in is needed): the deferrals it
    /// causes are not logged again recipient by recipient.
    already_logged: bool,
}

impl From<String> for TokenUnavailable {
    fn from(why: String) -> Self {
        TokenUnavailable {
            why,
            already_logged: false,
        }
    }
}

/// Whether a recipient's result goes to the delivery log (info), or only to
/// debug, being a repeat of a tenant-wide failure the log has already told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Announce {
    Each,
    Repeat,
}
