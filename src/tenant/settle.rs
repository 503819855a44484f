//! Settling a finished message (no recipient pending): remove it when
//! every recipient was sent (journaled into the archive first if the tenant
//! keeps one), else bounce it (RFC 3464) to its sender, else the
//! postmaster, else keep it visibly failed. The ledger (ledger.rs) calls this
//! once a message's last verdict is recorded; it decides nothing about
//! replies (outcome.rs does).

use super::queue::Queue;
use super::settings::Policy;
use super::TenantStatus;
use crate::base::names::{MessageId, TenantName};
use crate::bounce;
use crate::spool::envelope::{BounceStage, Envelope, RcptStatus, Record};
use crate::spool::Spool;

/// What settling touches, borrowed from the ledger for one message.
pub(super) struct Settle<'a> {
    pub name: &'a TenantName,
    pub policy: &'a Policy,
    pub spool: &'a Spool,
    pub queue: &'a mut Queue,
    /// For `status`: why a delivered message waits (its archive is failing).
    pub counters: &'a mut TenantStatus,
    pub now: u64,
}

impl Settle<'_> {
    /// A message with no recipient pending: removed if every one was sent;
    /// otherwise bounced to its sender (or the postmaster), and a bounce that
    /// cannot be delivered goes to the postmaster; what nobody can take stays
    /// in the spool as failed. `announce` logs the "kept" case (not on rescans).
    pub(super) fn finish_done(&mut self, id: &MessageId, envelope: &Envelope, announce: bool) {
        let tenant = self.name.clone();
        self.queue.remove(id);
        if !envelope.any_failed() || envelope.bounced_as.is_some() {
            self.queue.unfail(id);
            if !self.archive_before_removal(id, envelope) {
                return;
            }
            if let Err(e) = self.spool.remove(&tenant, id) {
                log::error!("{id} tenant={tenant}: done, but cannot remove it from the spool: {e}");
            }
            return;
        }
        // Failed is where a message ends up only when it stays: a message
        // whose bounce went out is settled, and `status` must not count it.
        match &envelope.bounce {
            // Never a bounce of a bounce: it goes to the postmaster once, then stays.
            Some(of) if of.stage == BounceStage::Sender => match self.policy.postmaster.clone() {
                Some(postmaster) => {
                    let redirect = Record::Redirect {
                        to: vec![postmaster.clone()],
                    };
                    match self.spool.append(&tenant, id, &redirect) {
                        Ok(()) => {
                            log::info!("{id} tenant={tenant}: bounce undeliverable to its sender; sending it to <{postmaster}>");
                            self.queue.unfail(id);
                            self.queue.schedule(id, 0, false);
                        }
                        Err(e) => self.keep_failed(
                            id,
                            announce,
                            &format!("cannot redirect the bounce to the postmaster: {e}"),
                        ),
                    }
                }
                None => self.keep_failed(
                    id,
                    announce,
                    "its bounce could not be delivered and no postmaster is configured",
                ),
            },
            Some(_) => self.keep_failed(
                id,
                announce,
                "its bounce could not be delivered to the postmaster either",
            ),
            None => self.bounce(id, envelope, announce),
        }
    }

    /// Nobody can take the message's failures: it stays in the spool,
    /// counted as failed, until an admin deletes it.
    fn keep_failed(&mut self, id: &MessageId, announce: bool, why: &str) {
        self.queue.mark_failed(id);
        if announce {
            log::warn!(
                "{id} tenant={}: kept in the queue as failed: {why}",
                self.name
            );
        }
    }

    fn bounce(&mut self, id: &MessageId, envelope: &Envelope, announce: bool) {
        let tenant = self.name.clone();
        let Some((to, stage)) = bounce::addressee(envelope, self.policy.postmaster.as_deref())
        else {
            self.keep_failed(id, announce, "null sender and no postmaster configured");
            return;
        };
        let report = bounce::Report {
            hostname: &self.policy.hostname,
            relay_host: &self.policy.relay_host,
            id,
            envelope,
        };
        let dsn = match bounce::queue(self.spool, &tenant, &report, &to, stage) {
            Ok(dsn) => dsn,
            Err(e) => {
                // Stays failed on disk; the next rescan tries again.
                log::error!("{id} tenant={tenant}: cannot queue its bounce: {e}");
                self.queue.mark_failed(id);
                return;
            }
        };
        log::info!("{id} tenant={tenant}: bounce {dsn} queued to <{to}>");
        // Its failures are the bounce's now (found failed by a rescan before, maybe).
        self.queue.unfail(id);
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
            Err(e) => {
                // Still on disk as unbounced: kept out of the queue (a rescan
                // would bounce it again) and shown as failed.
                log::error!("{id} tenant={tenant}: cannot record its bounce: {e}");
                self.queue.mark_failed(id);
            }
        }
        self.queue.schedule(&dsn, 0, false);
    }

    /// Journals a message that reached at least one recipient into the
    /// tenant's archive, if it keeps one; true when the spool entry may go.
    /// On failure the entry stays and is tried again, so nothing sent is
    /// missing from the archive.
    fn archive_before_removal(&mut self, id: &MessageId, envelope: &Envelope) -> bool {
        let Some(policy) = &self.policy.archive else {
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
            self.spool,
            self.name,
            id,
            &user,
            envelope.queued_at_ms / 1000,
        ) {
            Ok(()) => {
                journaled_pause();
                true
            }
            Err(e) => {
                log::error!(
                    "{id} tenant={}: cannot archive it (kept in the spool, will retry): {e}",
                    self.name
                );
                // Delivered but not yet journaled: `status` shows why it waits.
                self.counters.last_error = Some(format!(
                    "delivered, but cannot archive {id} (kept in the spool, retried): {e}"
                ));
                let retry = self.queue.retry_soon(self.now);
                self.queue.schedule(id, retry, true);
                false
            }
        }
    }
}

/// Test builds only: `PBXMAIL_DEBUG_JOURNALED_PAUSE_MS` holds a journaled
/// message in the spool that long before removal, so a crash test can kill
/// the daemon inside that window rather than hope to hit microseconds.
#[cfg(debug_assertions)]
fn journaled_pause() {
    if let Some(ms) = std::env::var("PBXMAIL_DEBUG_JOURNALED_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
    }
}

#[cfg(not(debug_assertions))]
fn journaled_pause() {}
