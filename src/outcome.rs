//! The judge: the one place that decides what a failure means (Postfix's
//! smtp_trouble.c). Every relay reply, every broken or refused session and
//! every expiry becomes a verdict: Delivered, Retry (with the scope that
//! should wait) or Bounce, plus the advice key an admin's hint is looked up
//! by (advice.rs words it). The tenant worker acts on verdicts alone.

use crate::smtp::reply::Reply;
use crate::smtp::{Phase, SessionError};
use crate::tls::TlsError;
use std::time::Duration;

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
    Delivered {
        reply: String,
    },
    Retry {
        scope: RetryScope,
        reason: String,
        /// The relay had the whole message (our final dot, or BDAT LAST)
        /// when the session ended without its reply: it may have taken it,
        /// so this retry may deliver it twice (RFC 5321 §6.1).
        unconfirmed: bool,
    },
    Bounce {
        reason: String,
    },
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

    /// What the delivery log adds to the line: a retry that may duplicate
    /// the message says so, as Postfix does.
    pub fn warning(&self) -> Option<&'static str> {
        match self {
            Outcome::Retry {
                unconfirmed: true, ..
            } => Some("the message may be delivered more than once"),
            _ => None,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Delivered { reply } => reply,
            Outcome::Retry { reason, .. } | Outcome::Bounce { reason } => reason,
        }
    }

    /// The relay refused the tenant itself (its login, its quota, its
    /// sessions): the tenant backs off and sends nothing more for now.
    pub fn refuses_tenant(&self) -> bool {
        matches!(
            self,
            Outcome::Retry {
                scope: RetryScope::Tenant,
                ..
            }
        )
    }

    /// Past max_queue_lifetime a retry gives up: it becomes a 4.4.7 bounce
    /// (RFC 3463 §3.5, "delivery time expired"). Other outcomes stand.
    pub fn expire(self, age_ms: u64, lifetime: Duration) -> Outcome {
        match self {
            Outcome::Retry { reason, .. } if u128::from(age_ms) > lifetime.as_millis() => {
                Outcome::Bounce {
                    reason: format!(
                        "4.4.7 gave up after {} in the queue; last error: {reason}",
                        crate::base::time::human_duration(age_ms / 1000)
                    ),
                }
            }
            other => other,
        }
    }
}

/// The judge's answer: what happened, and what an admin could do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// The key advice.rs words a hint from; None when there is nothing to say.
    pub advice: Option<Advice>,
}

/// What the admin should be told, by situation. The wording (which depends
/// on the relay and on how the tenant signs in) lives in advice.rs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// The relay refused the OAuth token for this mailbox or scope (its JSON says 400).
    OAuthScopeRefused,
    /// The relay refused the OAuth token (expired, revoked, another mailbox).
    OAuthTokenRefused,
    /// Microsoft 365's SMTP AUTH is off for the mailbox (5.7.139, 5.7.30).
    SmtpAuthDisabled,
    /// 535 with 5.7.8: the username/password pair is not accepted.
    PasswordNotAccepted,
    /// Any other 535: the login was refused.
    LoginRefused,
    /// 530 asking for STARTTLS first.
    TlsRequired,
    /// 530: a login is required.
    LoginRequired,
    /// The mailbox may not send as this sender.
    SendAsDenied,
    /// 5.4.5: the daily sending quota is used up.
    DailyQuota,
    /// Exchange Online's SubmissionQuotaExceeded.
    ExchangeQuota,
    /// 552 or 5.3.4: the message is too large.
    TooLarge,
    /// 5.7.1 relaying denied.
    RelayDenied,
    /// 550 5.1.1: no such recipient.
    NoSuchUser,
    /// 421 or 45x: temporary, retried on its own.
    Temporary,
    /// Nothing answers at the relay's address.
    Unreachable,
    /// The relay stopped answering mid-session.
    Silent,
    /// The relay does not offer STARTTLS.
    NoStartTls,
    /// A login is configured but the relay offers no mechanism we can use for it.
    NoUsableAuth,
    /// 5.6.3: 8-bit content the relay (no 8BITMIME) cannot take, and that
    /// could not be converted to 7 bits.
    EightBitUnsupported,
    /// 5.6.7: a non-ASCII address or UTF-8 header the relay (no SMTPUTF8) cannot take.
    SmtpUtf8Unsupported,
    /// The relay's certificate is not trusted; what helps depends on why.
    Certificate(CertificateFix),
    /// The TLS handshake failed; what helps depends on how.
    Handshake(HandshakeFix),
}

/// Why a relay's certificate was refused, as far as the fix differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateFix {
    /// Self-signed: that certificate goes in ca_file.
    SelfSigned,
    /// A CA certificate presented as the server's: ca_file cannot help.
    CaAsServer,
    /// Expired or not yet valid: the relay's operator, or this clock.
    Dates,
    /// Issued for another name: fix `relay`.
    WrongName,
    /// Signed by a CA we do not trust (or a mismatching one): its CA in ca_file.
    UntrustedIssuer,
    /// Revoked, weak, for another purpose, malformed, missing: only the relay's operator can fix it.
    RelayOperator,
}

/// How a TLS handshake failed, as far as the fix differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFix {
    /// Plain text where TLS was due: the wrong `tls =` mode or port.
    NotTls,
    /// Only TLS 1.1 or older: the relay must enable TLS 1.2.
    OldVersion,
    /// No cipher suite in common: the relay must enable a modern one.
    NoSharedCipher,
    /// Closed, an alert, a protocol error: nothing a setting here changes.
    Other,
}

/// How one recipient's reply in a transaction is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptJudgement {
    /// Final for this attempt.
    Final(Verdict),
    /// 452 "too many recipients" after another recipient was accepted: send
    /// it again in a following transaction (RFC 5321 §4.5.3.1.10), now.
    SendAgain,
}

/// Judges a transaction's replies, one per recipient, in order.
pub fn of_transaction(replies: &[Reply]) -> Vec<RcptJudgement> {
    let any_accepted = replies.iter().any(|r| r.code.is_positive());
    replies
        .iter()
        .map(|reply| {
            if any_accepted && reply.code.0 == 452 {
                RcptJudgement::SendAgain
            } else {
                RcptJudgement::Final(of_reply(reply))
            }
        })
        .collect()
}

/// A recipient's deciding reply (its RCPT reply, or the reply to the end of DATA).
pub fn of_reply(reply: &Reply) -> Verdict {
    Verdict {
        outcome: outcome_of_reply(reply),
        advice: advice_for_reply(reply),
    }
}

fn outcome_of_reply(reply: &Reply) -> Outcome {
    let text = reply.summary();
    if reply.code.is_positive() {
        Outcome::Delivered { reply: text }
    } else if let Some(missing) = missing_extension(reply) {
        // The message needs what this relay lacks; no later attempt through
        // it can differ, so it bounces at once (as Postfix does) rather than
        // waiting in the queue until it expires.
        Outcome::Bounce {
            reason: format!("{text} ({missing})"),
        }
    } else if is_authentication_problem(reply) {
        // The message is fine; the tenant's login is not. Bouncing would lose
        // mail over a configuration mistake, so the whole tenant waits.
        Outcome::Retry {
            scope: RetryScope::Tenant,
            reason: format!(
                "{text} (the relay wants a working login: check username, password and auth)"
            ),
            unconfirmed: false,
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
            unconfirmed: false,
        }
    } else if reply.code.is_permanent() {
        Outcome::Bounce { reason: text }
    } else {
        // 4xx, and anything out of place (a 3xx where a final reply belongs):
        // retrying is the choice that never loses mail.
        Outcome::Retry {
            scope: RetryScope::Recipient,
            reason: text,
            unconfirmed: false,
        }
    }
}

/// The relay cannot carry this message as it is (RFC 3463 §3.7 5.6.3
/// "conversion required but not supported"; RFC 6531 §3.7.2 5.6.7 for
/// non-ASCII addresses or UTF-8 headers): what the relay lacks, in words.
fn missing_extension(reply: &Reply) -> Option<&'static str> {
    if !reply.code.is_permanent() {
        return None;
    }
    match reply.enhanced()?.split_once('.')?.1 {
        "6.3" => Some("the relay cannot take this message's 8-bit content"),
        "6.7" => Some("the message needs SMTPUTF8, which the relay does not take"),
        _ => None,
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

/// Which advice a reply calls for: matched on the enhanced status code and
/// the provider's wording, which are stable across versions. The order
/// matters (the first match wins) and is the same for every auth mode.
fn advice_for_reply(reply: &Reply) -> Option<Advice> {
    let lower = reply.summary().to_ascii_lowercase();
    let enhanced = reply.enhanced().unwrap_or_default();
    if lower.contains("oauth error from the relay") {
        return Some(if lower.contains("\"status\":\"400\"") {
            Advice::OAuthScopeRefused
        } else {
            Advice::OAuthTokenRefused
        });
    }
    let advice = match (reply.code.0, enhanced) {
        (_, "5.7.139" | "5.7.30") => Advice::SmtpAuthDisabled,
        (535, "5.7.8") => Advice::PasswordNotAccepted,
        (535, _) => Advice::LoginRefused,
        (530, _) if lower.contains("starttls") => Advice::TlsRequired,
        (530, _) => Advice::LoginRequired,
        _ if lower.contains("sendasdenied") || enhanced == "5.2.0" && lower.contains("send as") => {
            Advice::SendAsDenied
        }
        (_, "5.6.3") => Advice::EightBitUnsupported,
        (_, "5.6.7") => Advice::SmtpUtf8Unsupported,
        (_, "5.4.5") => Advice::DailyQuota,
        _ if lower.contains("submissionquotaexceeded") => Advice::ExchangeQuota,
        (552, _) | (_, "5.3.4") => Advice::TooLarge,
        (550 | 553, "5.7.1") if lower.contains("relay") => Advice::RelayDenied,
        (550, "5.1.1") => Advice::NoSuchUser,
        (421, _) | (450..=459, _) => Advice::Temporary,
        _ => return None,
    };
    Some(advice)
}

/// A failure that ended (or never began) a session. It never bounces: the
/// message is fine, the relay or the link or our configuration is not
/// (RFC 5321 §4.5.4.1 lets the sender retry). This is also what a session
/// that broke mid-message means for the recipients still unanswered.
pub fn of_session_error(error: &SessionError) -> Verdict {
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
        // The login cannot be used with this relay: no mail of the tenant's
        // goes without it, so all of it waits (it never bounces over this).
        | SessionError::NoUsableAuth { .. }
        | SessionError::Tls(_)
        | SessionError::Config(_) => RetryScope::Tenant,
    };
    Verdict {
        outcome: Outcome::Retry {
            scope,
            reason: error.to_string(),
            unconfirmed: unconfirmed(error),
        },
        advice: advice_for_error(error),
    }
}

/// The session ended while we waited for the reply to the end of the
/// message: the relay had all of it and may have accepted it. Retrying is
/// still right (RFC 5321 §6.1: a message must not be lost), but the copy it
/// sends may be a second one. A reply there, even 421, is an answer.
fn unconfirmed(error: &SessionError) -> bool {
    matches!(
        error,
        SessionError::Timeout(Phase::DataEnd)
            | SessionError::Io(Phase::DataEnd, _)
            | SessionError::Protocol(Phase::DataEnd, _)
    )
}

/// A session that could not be opened. Whatever the phase, the relay (or
/// our way to it) is the problem, not the mail: the whole tenant waits.
pub fn of_failed_open(error: &SessionError) -> Outcome {
    Outcome::Retry {
        scope: RetryScope::Tenant,
        reason: error.to_string(),
        unconfirmed: false,
    }
}

/// A session that could not even be tried (settings unusable, no access
/// token): the tenant waits, the mail stays queued.
pub fn of_unavailable_session(reason: &str) -> Outcome {
    Outcome::Retry {
        scope: RetryScope::Tenant,
        reason: reason.to_string(),
        unconfirmed: false,
    }
}

/// Whether a failed session shows the relay refused our OAuth access token,
/// so the next session must fetch a fresh one.
pub fn forgets_token(error: &SessionError) -> bool {
    matches!(error, SessionError::Rejected(Phase::Auth, _))
}

fn advice_for_error(error: &SessionError) -> Option<Advice> {
    match error {
        SessionError::Connect { .. } => Some(Advice::Unreachable),
        SessionError::Timeout(_) => Some(Advice::Silent),
        SessionError::StartTlsNotOffered => Some(Advice::NoStartTls),
        SessionError::NoUsableAuth { .. } => Some(Advice::NoUsableAuth),
        SessionError::Tls(tls) => tls_advice(tls),
        SessionError::Rejected(_, reply) => advice_for_reply(reply),
        _ => None,
    }
}

fn tls_advice(error: &TlsError) -> Option<Advice> {
    use crate::tls::{CertificateProblem as C, HandshakeProblem as H, Incompatibility as I};
    let advice = match error {
        TlsError::Certificate(problem) => Advice::Certificate(match problem {
            C::SelfSigned => CertificateFix::SelfSigned,
            C::CaUsedAsEndEntity => CertificateFix::CaAsServer,
            C::Expired | C::NotYetValid => CertificateFix::Dates,
            C::WrongName { .. } => CertificateFix::WrongName,
            C::UnknownIssuer | C::BadSignature => CertificateFix::UntrustedIssuer,
            C::Revoked
            | C::UnsupportedAlgorithm
            | C::WrongPurpose
            | C::BadEncoding
            | C::NonePresented
            | C::Other(_) => CertificateFix::RelayOperator,
        }),
        TlsError::Handshake(H::NotTls) => Advice::Handshake(HandshakeFix::NotTls),
        TlsError::Handshake(_) => Advice::Handshake(HandshakeFix::Other),
        TlsError::Incompatible(I::OldProtocolVersion) => {
            Advice::Handshake(HandshakeFix::OldVersion)
        }
        TlsError::Incompatible(I::NoSharedCipher | I::Other(_)) => {
            Advice::Handshake(HandshakeFix::NoSharedCipher)
        }
        TlsError::Config(_) | TlsError::Timeout => return None,
    };
    Some(advice)
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
                matches!(of_reply(&quota).outcome, Outcome::Retry { scope: RetryScope::Tenant, .. }),
                "{quota}"
            );
        }
        // A permanent refusal that is not a quota still bounces.
        assert_eq!(
            of_reply(&reply_saying(550, "5.1.1 No such user"))
                .outcome
                .status(),
            "bounced"
        );
    }

    #[test]
    fn reply_classes() {
        assert_eq!(of_reply(&reply(250)).outcome.status(), "sent");
        assert_eq!(of_reply(&reply(451)).outcome.status(), "deferred");
        assert_eq!(of_reply(&reply(550)).outcome.status(), "bounced");
        assert_eq!(of_reply(&reply(354)).outcome.status(), "deferred");
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
                of_reply(&reply).outcome,
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
        assert_eq!(of_reply(&no_such_user).outcome.status(), "bounced");
    }

    #[test]
    fn session_failures_never_bounce() {
        let refused_auth = SessionError::Rejected(Phase::Auth, reply(535));
        assert!(matches!(
            of_session_error(&refused_auth).outcome,
            Outcome::Retry {
                scope: RetryScope::Tenant,
                ..
            }
        ));
        let mid_data = SessionError::Timeout(Phase::DataEnd);
        assert!(matches!(
            of_session_error(&mid_data).outcome,
            Outcome::Retry {
                scope: RetryScope::Message,
                ..
            }
        ));
        assert!(matches!(
            of_session_error(&SessionError::StartTlsNotOffered).outcome,
            Outcome::Retry {
                scope: RetryScope::Tenant,
                ..
            }
        ));
    }

    #[test]
    fn a_session_lost_after_the_final_dot_retries_and_warns_of_a_duplicate() {
        let closed = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        for lost in [
            SessionError::Timeout(Phase::DataEnd),
            SessionError::Protocol(Phase::DataEnd, "connection closed by the relay".into()),
            SessionError::Io(Phase::DataEnd, closed),
        ] {
            let outcome = of_session_error(&lost).outcome;
            assert!(
                matches!(
                    outcome,
                    Outcome::Retry {
                        scope: RetryScope::Message,
                        unconfirmed: true,
                        ..
                    }
                ),
                "{lost}"
            );
            assert_eq!(
                outcome.warning(),
                Some("the message may be delivered more than once")
            );
        }
        // Before the end of the message, or answered at its end: no warning.
        for answered in [
            SessionError::Timeout(Phase::Body),
            SessionError::Timeout(Phase::Data),
            SessionError::Rejected(Phase::DataEnd, reply(421)),
        ] {
            assert_eq!(
                of_session_error(&answered).outcome.warning(),
                None,
                "{answered}"
            );
        }
        assert_eq!(of_reply(&reply(451)).outcome.warning(), None);
    }

    #[test]
    fn a_login_the_relay_offers_no_mechanism_for_defers_the_tenant_with_advice() {
        let error = SessionError::NoUsableAuth {
            wanted: "PLAIN or LOGIN",
            offered: vec!["CRAM-MD5".into()],
        };
        let verdict = of_session_error(&error);
        assert!(verdict.outcome.refuses_tenant());
        assert_eq!(verdict.advice, Some(Advice::NoUsableAuth));
        assert!(
            verdict
                .outcome
                .reason()
                .contains("offers AUTH CRAM-MD5 but not PLAIN or LOGIN"),
            "{}",
            verdict.outcome.reason()
        );
        assert!(!forgets_token(&error));
    }

    /// Issue 14 (14): a message the relay cannot carry (8-bit content it
    /// cannot take, 5.6.3; a non-ASCII address without SMTPUTF8, 5.6.7)
    /// bounces at once with advice, whether the refusal is ours or the relay's.
    #[test]
    fn content_the_relay_cannot_carry_bounces_with_advice() {
        for (reply, advice) in [
            (
                reply_saying(554, "5.6.3 the relay does not offer 8BITMIME; not sent"),
                Advice::EightBitUnsupported,
            ),
            (
                reply_saying(553, "5.6.7 non-ASCII address; not sent"),
                Advice::SmtpUtf8Unsupported,
            ),
        ] {
            let verdict = of_reply(&reply);
            assert_eq!(verdict.outcome.status(), "bounced", "{reply}");
            assert_eq!(verdict.advice, Some(advice), "{reply}");
        }
        // A temporary refusal stays a retry.
        let later = reply_saying(451, "4.6.3 try later");
        assert_eq!(of_reply(&later).outcome.status(), "deferred");
    }

    #[test]
    fn a_452_after_an_accepted_recipient_is_sent_again_not_judged() {
        let judged = of_transaction(&[reply(250), reply(452), reply(550)]);
        assert!(matches!(&judged[0], RcptJudgement::Final(v) if v.outcome.status() == "sent"));
        assert_eq!(judged[1], RcptJudgement::SendAgain);
        assert!(matches!(&judged[2], RcptJudgement::Final(v) if v.outcome.status() == "bounced"));
    }

    #[test]
    fn a_452_with_nothing_accepted_is_a_recipient_retry() {
        let judged = of_transaction(&[reply(452), reply(452)]);
        for judgement in judged {
            let RcptJudgement::Final(verdict) = judgement else {
                panic!("a 452 with nothing accepted must not be sent again at once");
            };
            assert!(matches!(
                verdict.outcome,
                Outcome::Retry {
                    scope: RetryScope::Recipient,
                    ..
                }
            ));
        }
    }

    #[test]
    fn a_retry_past_the_queue_lifetime_bounces_with_4_4_7() {
        let lifetime = Duration::from_secs(3600);
        let retry = of_reply(&reply(451)).outcome;
        assert_eq!(retry.clone().expire(3_600_000, lifetime), retry);
        let expired = retry.expire(3_600_001, lifetime);
        assert_eq!(expired.status(), "bounced");
        assert!(expired.reason().starts_with("4.4.7 gave up after"));
        assert!(expired.reason().ends_with("last error: 451 text"));
        // What was delivered or bounced stays so.
        let sent = of_reply(&reply(250)).outcome;
        assert_eq!(sent.clone().expire(u64::MAX, lifetime), sent);
    }

    #[test]
    fn tenant_scope_retries_refuse_the_tenant_and_others_do_not() {
        assert!(of_reply(&reply(535)).outcome.refuses_tenant());
        assert!(
            of_session_error(&SessionError::Rejected(Phase::Rcpt, reply(421)))
                .outcome
                .refuses_tenant()
        );
        assert!(!of_reply(&reply(451)).outcome.refuses_tenant());
        assert!(!of_reply(&reply(550)).outcome.refuses_tenant());
        assert!(!of_session_error(&SessionError::Timeout(Phase::Body))
            .outcome
            .refuses_tenant());
        assert!(of_unavailable_session("no token").refuses_tenant());
        // A session that could not be opened backs the tenant off even where
        // the same error mid-session would only defer the message.
        assert!(of_failed_open(&SessionError::Local("x".into())).refuses_tenant());
    }

    #[test]
    fn only_a_refused_auth_forgets_the_oauth_token() {
        assert!(forgets_token(&SessionError::Rejected(
            Phase::Auth,
            reply(535)
        )));
        assert!(!forgets_token(&SessionError::Rejected(
            Phase::Ehlo,
            reply(554)
        )));
        assert!(!forgets_token(&SessionError::Timeout(Phase::Auth)));
    }

    #[test]
    fn the_verdict_carries_the_advice_key() {
        assert_eq!(
            of_reply(&reply_saying(550, "5.1.1 no such user")).advice,
            Some(Advice::NoSuchUser)
        );
        assert_eq!(of_reply(&reply(250)).advice, None);
        assert_eq!(
            of_session_error(&SessionError::Timeout(Phase::Greeting)).advice,
            Some(Advice::Silent)
        );
        assert_eq!(
            of_session_error(&SessionError::Rejected(
                Phase::Auth,
                reply_saying(535, "5.7.8 Username and Password not accepted")
            ))
            .advice,
            Some(Advice::PasswordNotAccepted)
        );
    }
}
