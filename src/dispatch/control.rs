//! Control requests, carried out: status and flush at once; hold, release
//! and delete handed to the tenants (listed IDs located first on the
//! offload thread, answers gathered by admin.rs); reload read on the
//! offload thread and applied here. The mio loop (mod.rs) only routes the
//! control socket's events and the Waker's news to these.

use super::admin::Asked;
use super::offload::{Chore, Done, Located};
use super::Dispatcher;
use crate::base::names::MessageId;
use crate::config::{Config, ConfigError};
use crate::control::{self, Request, Response, Selection};
use crate::tenant::{Action, Job, Target};
use mio::Token;
use std::collections::BTreeMap;

/// What to do with an offloaded chore's result.
pub(super) enum Awaiting {
    /// Apply the loaded configuration; answer the control connection, if any.
    Reload(Option<Token>),
    /// Hand the command to the tenants holding the IDs; answer the
    /// connection once they reported.
    Select(Token, Action),
}

impl Dispatcher {
    /// Hands a chore to the offload thread and notes who waits for it; the
    /// chore comes back when that thread is busy.
    fn offload(&mut self, chore: Chore, awaiting: Awaiting) -> Result<(), Chore> {
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        self.offload.try_send(ticket, chore)?;
        self.awaiting.insert(ticket, awaiting);
        Ok(())
    }

    /// Re-reads the configuration off this thread; `reply_to` gets the outcome.
    pub(super) fn start_reload(&mut self, reply_to: Option<Token>) {
        let chore = Chore::LoadConfig(self.config.path.clone());
        if self.offload(chore, Awaiting::Reload(reply_to)).is_err() {
            match reply_to {
                Some(token) => self.respond(token, &busy()),
                // Not lost: it runs once the offload thread answers.
                None => self.reload_wanted = true,
            }
        }
    }

    /// Results of offloaded chores: apply them and answer who waits.
    pub(super) fn take_offloaded(&mut self) {
        while let Some((ticket, done)) = self.offload.try_recv() {
            let Some(awaiting) = self.awaiting.remove(&ticket) else {
                continue;
            };
            match (awaiting, done) {
                (Awaiting::Reload(reply_to), Done::Config(loaded)) => {
                    let response = match self.apply_reload(*loaded) {
                        Ok(()) => {
                            Response::ok(serde_json::json!({ "tenants": self.tenants.len() }))
                        }
                        Err(problems) => Response::error(format!(
                            "the new configuration was refused; the old one stays in force:\n{}",
                            problems.join("\n")
                        )),
                    };
                    if let Some(token) = reply_to {
                        self.respond(token, &response);
                    }
                }
                (Awaiting::Select(token, action), Done::Located(found)) => {
                    if let Some(response) = self.act_on(token, found, action) {
                        self.respond(token, &response);
                    }
                }
                (Awaiting::Reload(reply_to), _) => {
                    if let Some(token) = reply_to {
                        self.respond(token, &Response::error("internal error: wrong reply"));
                    }
                }
                (Awaiting::Select(token, _), _) => {
                    self.respond(token, &Response::error("internal error: wrong reply"));
                }
            }
        }
        if std::mem::take(&mut self.reload_wanted) {
            self.start_reload(None);
        }
    }

    /// Applies a configuration the offload thread loaded; an invalid one is
    /// refused and the old one kept. Returns the problems that made it refuse.
    fn apply_reload(&mut self, loaded: Result<Config, ConfigError>) -> Result<(), Vec<String>> {
        match loaded {
            Ok(config) => {
                for warning in &config.warnings {
                    log::warn!("{warning}");
                }
                self.tenants.reload(&config);
                if config.daemon.listen != self.config.daemon.listen {
                    log::warn!("reload: a change of listen takes effect after a restart");
                }
                self.config = config;
                let path = self.config.path.display();
                log::info!("reloaded {path}: {} tenants", self.tenants.len());
                Ok(())
            }
            Err(e) => {
                for problem in &e.problems {
                    log::error!("reload refused: {problem}");
                }
                log::error!("reload refused: the running configuration stays in force");
                Err(e.problems.iter().map(|p| p.to_string()).collect())
            }
        }
    }

    fn respond(&mut self, token: Token, response: &Response) {
        self.control.respond(self.poll.registry(), token, response);
    }

    pub(super) fn serve_control(&mut self, token: Token) {
        for event in self.control.ready(self.poll.registry(), token) {
            if let control::Event::Request(token, request) = event {
                if let Some(response) = self.execute(token, request) {
                    self.respond(token, &response);
                }
            }
        }
    }

    /// Carries out an admin's request. Work on messages is handed to their
    /// tenant's thread, which records it durably; this only routes. None
    /// when the answer comes later, from the offload thread.
    fn execute(&mut self, token: Token, request: Request) -> Option<Response> {
        let response = match request {
            Request::Status => {
                Response::ok(serde_json::json!({ "tenants": self.tenants.status() }))
            }
            Request::Flush { tenant } => match tenant {
                Some(tenant) => self.to_tenant(&tenant, Job::Flush),
                None => {
                    self.tenants.route_all(|| Job::Flush);
                    Response::ok(serde_json::json!({ "tenants": self.tenants.len() }))
                }
            },
            Request::Hold(selection) => return self.select(token, selection, Action::Hold),
            Request::Release(selection) => return self.select(token, selection, Action::Release),
            Request::Delete(selection) => return self.select(token, selection, Action::Delete),
            Request::Reload => {
                self.start_reload(Some(token));
                return None;
            }
        };
        Some(response)
    }

    fn to_tenant(&self, tenant: &str, job: Job) -> Response {
        if !self.tenants.is_running(tenant) {
            return Response::error(format!("no tenant named {tenant:?} is running"));
        }
        self.tenants.route(tenant, job);
        Response::ok(serde_json::json!({ "tenant": tenant }))
    }

    /// A whole tenant at once; listed IDs once the offload thread found
    /// which tenant's folder holds each (that stats spool files). None: the
    /// answer comes once the tenants reported (admin.rs).
    fn select(&mut self, token: Token, selection: Selection, action: Action) -> Option<Response> {
        if let Some(tenant) = selection.tenant {
            if !self.tenants.is_running(&tenant) {
                return Some(Response::error(format!(
                    "no tenant named {tenant:?} is running"
                )));
            }
            return self.ask(token, action, vec![(tenant, Target::All)]);
        }
        if selection.ids.is_empty() {
            return Some(Response::error("name message IDs, or --tenant T"));
        }
        match self.offload(
            Chore::Locate(selection.ids),
            Awaiting::Select(token, action),
        ) {
            Ok(()) => None,
            Err(_) => Some(busy()),
        }
    }

    /// Hands the command to each tenant, noting the message each is
    /// sending now; None: the answer comes with their reports.
    fn ask(
        &mut self,
        token: Token,
        action: Action,
        targets: Vec<(String, Target)>,
    ) -> Option<Response> {
        let asked = targets
            .into_iter()
            .map(|(tenant, target)| Asked {
                sending: self.tenants.sending(&tenant),
                tenant,
                target,
            })
            .collect();
        self.admin.start(&self.tenants, token, action, asked).err()
    }

    /// Reports from tenants that complete a request: answer it.
    pub(super) fn take_admin_reports(&mut self) {
        for (token, response) in self.admin.take() {
            self.respond(token, &response);
        }
    }

    /// Listed IDs grouped by the tenant whose folder holds them.
    fn act_on(
        &mut self,
        token: Token,
        found: Vec<(String, Located)>,
        action: Action,
    ) -> Option<Response> {
        let mut by_tenant: BTreeMap<String, Vec<MessageId>> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut orphaned = Vec::new();
        for (raw, located) in found {
            match located {
                Located::Queued { tenant, id } if self.tenants.is_running(tenant.as_str()) => {
                    by_tenant.entry(tenant.to_string()).or_default().push(id)
                }
                Located::Queued { tenant, .. } => orphaned.push(format!("{raw} (tenant {tenant})")),
                Located::Unknown => unknown.push(raw),
            }
        }
        // All or nothing: a typo in one ID must not leave the command half done.
        if !unknown.is_empty() {
            return Some(Response::error(format!(
                "no queued message with ID {}; nothing was changed",
                unknown.join(", ")
            )));
        }
        if !orphaned.is_empty() {
            return Some(Response::error(format!(
                "{} belong to a tenant that is no longer configured; nothing was changed. \
                 Add its [tenant:NAME] section back and reload to act on them",
                orphaned.join(", ")
            )));
        }
        let targets = by_tenant
            .into_iter()
            .map(|(tenant, ids)| (tenant, Target::Ids(ids)))
            .collect();
        self.ask(token, action, targets)
    }
}

/// The offload thread has a full queue: the admin tries again.
fn busy() -> Response {
    Response::busy("the daemon is busy; try again in a moment")
}
