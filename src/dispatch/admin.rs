//! Hold, release and delete answered once they are durable: the dispatcher
//! hands each tenant an `AdminJob` and a small waiter thread per request
//! collects the tenants' reports (bounded by `ANSWER_WITHIN`), then wakes
//! the loop, which answers the control connection from what came back. The
//! loop itself never waits on a tenant.

use crate::base::names::MessageId;
use crate::control::Response;
use crate::tenant::{Action, AdminJob, AdminReport, Applied, Job, Target, TenantSet};
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use mio::{Token, Waker};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a tenant gets to apply a command: it takes jobs between
/// messages, so a relay that stalls one message (up to a data timeout)
/// holds the answer back; past this the admin is told the command is
/// queued. Well below the CLI's 30 s read timeout.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// A waiter does nothing but wait on channels.
const WAITER_STACK: usize = 64 * 1024;

/// What one tenant was asked to do, as the loop knows it when asking.
pub struct Asked {
    pub tenant: String,
    pub target: Target,
    /// The message that tenant was sending when asked.
    pub sending: Option<MessageId>,
}

/// A tenant's answer, or why there is none.
enum Heard {
    Report(AdminReport),
    /// Not within `ANSWER_WITHIN`: the job waits in the tenant's queue.
    Late,
    /// The job was dropped (a full job queue, a tenant that ended).
    Lost,
}

/// One request in flight: who waits and what each tenant was asked.
struct Pending {
    token: Token,
    action: Action,
    asked: Vec<Asked>,
}

pub struct AdminWaits {
    heard_tx: Sender<(u64, Vec<Heard>)>,
    heard: Receiver<(u64, Vec<Heard>)>,
    pending: HashMap<u64, Pending>,
    next: u64,
    waker: Arc<Waker>,
    within: Duration,
}

impl AdminWaits {
    pub fn new(waker: Arc<Waker>) -> AdminWaits {
        let (heard_tx, heard) = unbounded();
        AdminWaits {
            heard_tx,
            heard,
            pending: HashMap::new(),
            next: 0,
            waker,
            within: answer_within(),
        }
    }

    /// Sends the jobs and starts a waiter; Err: the answer to give now.
    pub fn start(
        &mut self,
        tenants: &TenantSet,
        token: Token,
        action: Action,
        asked: Vec<Asked>,
    ) -> Result<(), Response> {
        let mut reports = Vec::with_capacity(asked.len());
        let mut jobs = Vec::with_capacity(asked.len());
        for a in &asked {
            let (done, report) = bounded(1);
            reports.push(report);
            jobs.push((
                a.tenant.clone(),
                Job::Admin(AdminJob {
                    action,
                    target: a.target.clone(),
                    done,
                }),
            ));
        }
        let ticket = self.next;
        self.next = self.next.wrapping_add(1);
        let (heard_tx, waker, within) =
            (self.heard_tx.clone(), Arc::clone(&self.waker), self.within);
        // Started before any job goes out, so a failure to start changes nothing.
        std::thread::Builder::new()
            .name("admin-wait".into())
            .stack_size(WAITER_STACK)
            .spawn(move || {
                let deadline = Instant::now().checked_add(within);
                let heard = reports.iter().map(|r| wait(r, deadline)).collect();
                if heard_tx.send((ticket, heard)).is_ok() {
                    let _ = waker.wake();
                }
            })
            .map_err(|e| Response::busy(format!("the daemon is busy ({e}); try again")))?;
        for (tenant, job) in jobs {
            tenants.route(&tenant, job);
        }
        self.pending.insert(
            ticket,
            Pending {
                token,
                action,
                asked,
            },
        );
        Ok(())
    }

    /// The answers that are complete: (connection, response).
    pub fn take(&mut self) -> Vec<(Token, Response)> {
        let mut answers = Vec::new();
        while let Ok((ticket, heard)) = self.heard.try_recv() {
            if let Some(pending) = self.pending.remove(&ticket) {
                answers.push((pending.token, answer(pending.action, &pending.asked, heard)));
            }
        }
        answers
    }
}

/// Test builds only: `PBXMAIL_DEBUG_ADMIN_WAIT_MS` shortens the bound, so
/// a test shows the pending answer without a 10 s stall.
#[cfg(debug_assertions)]
fn answer_within() -> Duration {
    std::env::var("PBXMAIL_DEBUG_ADMIN_WAIT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(ANSWER_WITHIN, Duration::from_millis)
}

#[cfg(not(debug_assertions))]
fn answer_within() -> Duration {
    ANSWER_WITHIN
}

fn wait(report: &Receiver<AdminReport>, deadline: Option<Instant>) -> Heard {
    let left = deadline.map_or(ANSWER_WITHIN, |d| {
        d.saturating_duration_since(Instant::now())
    });
    match report.recv_timeout(left) {
        Ok(report) => Heard::Report(report),
        Err(RecvTimeoutError::Timeout) => Heard::Late,
        Err(RecvTimeoutError::Disconnected) => Heard::Lost,
    }
}

/// What became of one message, as the answer names it.
fn word(action: Action, applied: &Applied) -> &'static str {
    match (applied, action) {
        (Applied::Done, Action::Hold) => "held",
        (Applied::Done, Action::Release) => "released",
        (Applied::Done, Action::Delete) => "deleted",
        (Applied::Unchanged, _) => "unchanged",
        (Applied::Gone, _) => "gone",
        (Applied::Failed(_), _) => "failed",
    }
}

/// The response: per message what happened (`results`), how many were
/// changed (`messages`, as before), and whether any tenant has yet to
/// apply it (`pending`: the CLI exits 75).
fn answer(action: Action, asked: &[Asked], heard: Vec<Heard>) -> Response {
    let mut results = Vec::new();
    let mut changed = 0u64;
    let mut pending = false;
    let mut lost = false;
    for (a, heard) in asked.iter().zip(heard) {
        let sending = |id: &MessageId| a.sending.as_ref() == Some(id);
        match heard {
            Heard::Report(report) => {
                for (id, applied) in &report.results {
                    if matches!(applied, Applied::Done) {
                        changed = changed.saturating_add(1);
                    }
                    let mut entry = serde_json::json!({
                        "id": id.to_string(),
                        "tenant": a.tenant,
                        "result": word(action, applied),
                        "sending": sending(id),
                    });
                    if let Applied::Failed(why) = applied {
                        entry["error"] = serde_json::Value::String(why.clone());
                    }
                    results.push(entry);
                }
            }
            Heard::Late => {
                pending = true;
                results.extend(unanswered(a, "pending"));
            }
            Heard::Lost => {
                lost = true;
                results.extend(unanswered(a, "failed"));
            }
        }
    }
    if lost {
        return Response::busy(
            "a tenant could not take the command now (its job queue is full or it is \
             restarting); nothing is known to have changed there: try again",
        );
    }
    Response::ok(serde_json::json!({
        "messages": changed,
        "results": results,
        "pending": pending,
    }))
}

/// Entries for a tenant that did not report: its listed IDs, or the tenant.
fn unanswered(a: &Asked, result: &str) -> Vec<serde_json::Value> {
    match &a.target {
        Target::Ids(ids) => ids
            .iter()
            .map(|id| {
                serde_json::json!({
                    "id": id.to_string(),
                    "tenant": a.tenant,
                    "result": result,
                    "sending": a.sending.as_ref() == Some(id),
                })
            })
            .collect(),
        Target::All => vec![serde_json::json!({
            "id": null,
            "tenant": a.tenant,
            "result": result,
            "sending": a.sending.is_some(),
        })],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> MessageId {
        MessageId::parse(text).unwrap()
    }

    #[test]
    fn the_answer_names_each_message_and_the_one_being_sent() {
        let (a, b) = (id("0000000000000000000000A"), id("0000000000000000000000B"));
        let asked = vec![Asked {
            tenant: "acme".into(),
            target: Target::Ids(vec![a.clone(), b.clone()]),
            sending: Some(b.clone()),
        }];
        let report = AdminReport {
            action: Action::Hold,
            results: vec![(a, Applied::Done), (b, Applied::Gone)],
        };
        let response = answer(Action::Hold, &asked, vec![Heard::Report(report)]);
        assert!(response.ok);
        let result = response.result.unwrap();
        assert_eq!(result["messages"], 1);
        assert_eq!(result["pending"], false);
        assert_eq!(result["results"][0]["result"], "held");
        assert_eq!(result["results"][0]["sending"], false);
        assert_eq!(result["results"][1]["result"], "gone");
        assert_eq!(result["results"][1]["sending"], true);
    }

    #[test]
    fn a_tenant_that_does_not_answer_in_time_leaves_the_command_pending() {
        let a = id("0000000000000000000000A");
        let asked = vec![Asked {
            tenant: "acme".into(),
            target: Target::Ids(vec![a]),
            sending: None,
        }];
        let response = answer(Action::Delete, &asked, vec![Heard::Late]);
        let result = response.result.unwrap();
        assert_eq!(result["pending"], true);
        assert_eq!(result["messages"], 0);
        assert_eq!(result["results"][0]["result"], "pending");
        // A dropped job is a temporary refusal, never a success.
        let response = answer(Action::Delete, &asked, vec![Heard::Lost]);
        assert!(!response.ok && response.busy);
    }

    #[test]
    fn a_waiter_reports_late_past_its_deadline_and_lost_when_the_job_is_dropped() {
        let (_keep, report) = bounded::<AdminReport>(1);
        let past = Instant::now().checked_sub(Duration::from_millis(1));
        assert!(matches!(wait(&report, past), Heard::Late));
        let (dropped, report) = bounded::<AdminReport>(1);
        drop(dropped);
        assert!(matches!(wait(&report, past), Heard::Lost));
    }
}
