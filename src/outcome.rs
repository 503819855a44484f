//! The one place that decides what a failure means. Every relay reply and
//! every session failure becomes Delivered, Retry (with the scope that should
//! wait) or Bounce; the tenant worker acts on that value alone.

use crate::smtp::reply::Reply;
use crate::smtp::{Phase, SessionError};

/// Who should wait before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryScope {
    /// The relay itself is failing (down, TLS, AUTH, refusing sessions): the whole tenant backs off.
    Tenant,
    /// This message could not be sent now; others may go.
    Message,
    /// Only this recipient was deferred.
    Recipient,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered { reply: String },
    Retry { scope: RetryScope, reason: String },
    Bounce { reason: String },
}

impl Outcome {
    /// The status word of the delivery log line.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "sent",
            Outcome::Retry { .. } => "deferred",
            Outcome::Bounce { .. } => "bounced",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Delivered { reply } => reply,
            Outcome::Retry { reason, .. } | Outcome::Bounce { reason } => reason,
        }
    }
}

/// A recipient's deciding reply (its RCPT reply, or the reply to the end of DATA).
pub fn of_reply(reply: &Reply) -> Outcome {
    let text = reply.summary();
    if reply.code.is_positive() {
        Outcome::Delivered { reply: text }
    } else if is_authentication_problem(reply) {
        // The message is fine; the tenant's login is not. Bouncing would lose
        // mail over a configuration mistake, so the whole tenant waits.
        Outcome::Retry {
            scope: RetryScope::Tenant,
            reason: format!(
                "{text} (the relay wants a working login: check username, password and auth)"
            ),
        }
    } else if is_sending_quota(reply) {
        // The mailbox sent too much today: every message waits, none is
        // wrong. Bouncing a voicemail over a daily quota would lose it.
        Outcome::Retry {
            scope: RetryScope::Tenant,
            reason: format!(
                "{text} (the mailbox's sending quota is used up: mail waits until the provider \
                 lets it send again; a rate_limit below the quota avoids this)"
            ),
        }
    } else if reply.code.is_permanent() {
        Outcome::Bounce { reason: text }
    } else {
        // 4xx, and anything out of place (a 3xx where a final reply belongs):
        // retrying is the choice that never loses mail.
        Outcome::Retry {
            scope: RetryScope::Recipient,
            reason: text,
        }
    }
}

/// 530 authentication required, 535 credentials invalid, and the enhanced
/// codes providers use for "this mailbox may not log in this way"
/// (RFC 4954 §6: 5.7.0, 5.7.8; Exchange Online: 5.7.139, 5.7.30, 5.7.57).
fn is_authentication_problem(reply: &Reply) -> bool {
    matches!(reply.code.0, 530 | 535)
        || matches!(
            reply.enhanced(),
            Some("5.7.8" | "5.7.139" | "5.7.30" | "5.7.57")
        )
}

/// The provider's daily or per-minute sending quota for the mailbox, which
/// ends by itself: Gmail's 5.4.5 "Daily user sending limit exceeded" and
/// Exchange Online's SubmissionQuotaExceeded / "message rate limit".
fn is_sending_quota(reply: &Reply) -> bool {
    let lower = reply.summary().to_ascii_lowercase();
    reply.enhanced() == Some("5.4.5")
        || lower.contains("submissionquotaexceeded")
        || lower.contains("sending limit exceeded")
        || lower.contains("message rate limit")
}

/// A failure that ended the session. It never bounces: the message is fine,
/// the relay or the link or our configuration is not (RFC 5321 §4.5.4.1 lets
/// the sender retry).
pub fn of_session_error(error: &SessionError) -> Outcome {
    let scope = match error {
        SessionError::Local(_) => RetryScope::Message,
        SessionError::Timeout(phase)
        | SessionError::Io(phase, _)
        | SessionError::Protocol(phase, _) => phase_scope(*phase),
        // 421: the relay is closing the channel (RFC 5321 §3.8); everything waits.
        SessionError::Rejected(_, reply) if reply.code.0 == 421 => RetryScope::Tenant,
        SessionError::Rejected(phase, _) => phase_scope(*phase),
        SessionError::Connect { .. }
        | SessionError::StartTlsNotOffered
        | SessionError::Tls(_)
        | SessionError::Config(_) => RetryScope::Tenant,
    };
    Outcome::Retry {
        scope,
        reason: error.to_string(),
    }
}

fn phase_scope(phase: Phase) -> RetryScope {
    match phase {
        Phase::Greeting | Phase::Ehlo | Phase::StartTls | Phase::Auth => RetryScope::Tenant,
        Phase::Mail
        | Phase::Rcpt
        | Phase::Data
        | Phase::Body
        | Phase::DataEnd
        | Phase::Reset
        | Phase::Quit => RetryScope::Message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::ReplyCode;

    fn reply(code: u16) -> Reply {
        Reply {
            code: ReplyCode(code),
            lines: vec!["text".into()],
        }
    }

    fn reply_saying(code: u16, text: &str) -> Reply {
        Reply {
            code: ReplyCode(code),
            lines: vec![text.into()],
        }
    }

    #[test]
    fn a_used_up_sending_quota_defers_the_tenant_and_bounces_nothing() {
        for quota in [
            reply_saying(550, "5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852"),
            reply_saying(554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception"),
            reply_saying(550, "5.7.60 ... message rate limit exceeded"),
        ] {
            assert!(
                matches!(of_reply(&quota), Outcome::Retry { scope: RetryScope::Tenant, .. }),
                "{quota}"
            );
        }
        // A permanent refusal that is not a quota still bounces.
        assert_eq!(
            of_reply(&reply_saying(550, "5.1.1 No such user")).status(),
            "bounced"
        );
    }

    #[test]
    fn reply_classes() {
        assert_eq!(of_reply(&reply(250)).status(), "sent");
        assert_eq!(of_reply(&reply(451)).status(), "deferred");
        assert_eq!(of_reply(&reply(550)).status(), "bounced");
        assert_eq!(of_reply(&reply(354)).status(), "deferred");
    }

    #[test]
    fn authentication_refusals_defer_the_tenant() {
        let required = Reply {
            code: ReplyCode(530),
            lines: vec!["5.7.0 Authentication required".into()],
        };
        let basic_auth_off = Reply {
            code: ReplyCode(550),
            lines: vec!["5.7.30 Basic authentication is not supported".into()],
        };
        for reply in [required, basic_auth_off] {
            assert!(matches!(
                of_reply(&reply),
                Outcome::Retry {
                    scope: RetryScope::Tenant,
                    ..
                }
            ));
        }
        let no_such_user = Reply {
            code: ReplyCode(550),
            lines: vec!["5.1.1 no such user".into()],
        };
        assert_eq!(of_reply(&no_such_user).status(), "bounced");
    }

    #[test]
    fn session_failures_never_bounce() {
        let refused_auth = SessionError::Rejected(Phase::Auth, reply(535));
        assert!(matches!(
            of_session_error(&refused_auth),
            Outcome::Retry {
                scope: RetryScope::Tenant,
                ..
            }
        ));
        let mid_data = SessionError::Timeout(Phase::DataEnd);
        assert!(matches!(
            of_session_error(&mid_data),
            Outcome::Retry {
                scope: RetryScope::Message,
                ..
            }
        ));
        assert!(matches!(
            of_session_error(&SessionError::StartTlsNotOffered),
            Outcome::Retry {
                scope: RetryScope::Tenant,
                ..
            }
        ));
    }
}
