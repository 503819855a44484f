//! One plain-language line of what to do, for the relay replies and errors
//! admins meet most (shown by `pbxmail test`). Matching is on the enhanced
//! status code and the provider's wording, which are stable across versions.

use crate::config::AuthMode;
use crate::smtp::reply::Reply;
use crate::smtp::SessionError;
use crate::tls::TlsError;

/// What the advice depends on besides the reply: whom we talked to, and how
/// we signed in (a password refusal and a token refusal need different steps).
#[derive(Debug, Clone, Copy)]
pub struct Tenant<'a> {
    pub relay_host: &'a str,
    pub auth: AuthMode,
}

/// Advice for a refusal from the relay, if we know one.
pub fn for_reply(reply: &Reply, tenant: Tenant) -> Option<String> {
    let text = reply.summary();
    let lower = text.to_ascii_lowercase();
    let enhanced = reply.enhanced().unwrap_or_default();
    let relay_host = tenant.relay_host;
    let gmail = relay_host.ends_with("gmail.com") || relay_host.ends_with("googlemail.com");
    let oauth = tenant.auth == AuthMode::XOAuth2;
    if lower.contains("oauth error from the relay") {
        let advice = if lower.contains("\"status\":\"400\"") {
            "the relay refused the OAuth token for this mailbox or scope (400): check that username \
             is the mailbox that signed in, and oauth_scope (Google: https://mail.google.com/; \
             Microsoft 365: https://outlook.office.com/SMTP.Send)"
        } else {
            "the relay refused the OAuth access token (expired, revoked or for another mailbox): \
             run `pbxmail oauth login --tenant T` again and sign in as the mailbox in username"
        };
        return Some(advice.to_string());
    }
    let advice = match (reply.code.0, enhanced) {
        (_, "5.7.139" | "5.7.30") if oauth => {
            "Microsoft 365 has SMTP AUTH turned off for this mailbox (or the whole organisation), \
             which refuses OAuth sign-ins too: enable Authenticated SMTP for the mailbox in the \
             Microsoft 365 admin center (Users > the mailbox > Mail > Manage email apps), and \
             check that the app registration has the SMTP.Send permission"
        }
        (535, _) if oauth => {
            "the relay refused the OAuth access token: check that username is the mailbox that \
             signed in, and if it still fails run `pbxmail oauth login --tenant T` again"
        }
        (_, "5.7.139" | "5.7.30") => {
            "Microsoft 365 refuses password sign-in (basic authentication) for this mailbox: \
             enable Authenticated SMTP for it in the Microsoft 365 admin center, or switch the \
             tenant to OAuth (auth = xoauth2)"
        }
        (535, "5.7.8") if gmail => {
            "Gmail refuses the password: create an app password for this account \
             (Google Account > Security > App passwords) and use it, or switch to OAuth"
        }
        (535, _) => "the relay refused the login: check username and password (or password_file)",
        (530, _) if lower.contains("starttls") => {
            "the relay requires TLS before anything else: set tls = starttls (or tls = implicit on port 465)"
        }
        (530, _) => "the relay requires a login: set username and password for this tenant",
        _ if lower.contains("sendasdenied") || enhanced == "5.2.0" && lower.contains("send as") => {
            "the mailbox may not send as this sender: set envelope_from to the login's address, \
             or grant it Send As permission for the sender"
        }
        (_, "5.4.5") => {
            "the mailbox has used up its daily sending quota: pbxmail keeps such mail queued and \
             retries, so nothing bounces; set rate_limit below the provider's quota \
             (Gmail: 2000/day for Workspace, 500/day for free accounts)"
        }
        _ if lower.contains("submissionquotaexceeded") => {
            "Exchange Online's sending quota for this mailbox is used up: pbxmail keeps such mail \
             queued and retries; keep rate_limit at 30/min or lower"
        }
        (552, _) | (_, "5.3.4") => "the message is larger than the relay accepts",
        (550 | 553, "5.7.1") if lower.contains("relay") => {
            "the relay will not relay for us: check the login, or allow this PBX's address on the relay"
        }
        (550, "5.1.1") => "the recipient's address does not exist",
        (421, _) | (450..=459, _) => "a temporary refusal: pbxmail retries on its own",
        _ => return None,
    };
    Some(advice.to_string())
}

/// Advice for a failure before any reply could decide.
pub fn for_error(error: &SessionError, tenant: Tenant) -> Option<String> {
    let relay_host = tenant.relay_host;
    let advice = match error {
        SessionError::Connect { .. } => format!(
            "nothing answers at the relay: check relay = host:port, DNS for {relay_host}, \
             and that this network may reach it (firewalls often block port 25)"
        ),
        SessionError::Timeout(_) => {
            "the relay stopped answering: a firewall dropping traffic, or a wrong port (try 587 with \
             tls = starttls, or 465 with tls = implicit)"
                .to_string()
        }
        SessionError::StartTlsNotOffered => {
            "the relay does not offer STARTTLS on this port: use its submission port (587), or \
             tls = implicit on port 465"
                .to_string()
        }
        SessionError::Tls(TlsError::Certificate(_)) => {
            "put the CA that signed the relay's certificate in ca_file (PEM), or fix the name in \
             relay; tls_verify = no is the insecure last resort"
                .to_string()
        }
        SessionError::Tls(TlsError::Handshake(_)) => {
            "the TLS handshake failed: if the relay speaks plain SMTP on this port, use tls = starttls \
             rather than implicit"
                .to_string()
        }
        SessionError::Rejected(_, reply) => return for_reply(reply, tenant),
        _ => return None,
    };
    Some(advice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::ReplyCode;

    fn with_password(relay_host: &str) -> Tenant<'_> {
        Tenant {
            relay_host,
            auth: AuthMode::Auto,
        }
    }

    fn with_oauth(relay_host: &str) -> Tenant<'_> {
        Tenant {
            relay_host,
            auth: AuthMode::XOAuth2,
        }
    }

    fn reply(code: u16, text: &str) -> Reply {
        Reply {
            code: ReplyCode(code),
            lines: vec![text.to_string()],
        }
    }

    #[test]
    fn the_replies_admins_meet() {
        let cases = [
            (
                reply(
                    535,
                    "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
                ),
                "smtp.office365.com",
                "Microsoft 365",
            ),
            (
                reply(535, "5.7.8 Username and Password not accepted"),
                "smtp.gmail.com",
                "app password",
            ),
            (
                reply(
                    554,
                    "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException",
                ),
                "smtp.office365.com",
                "envelope_from",
            ),
            (
                reply(530, "5.7.0 Must issue a STARTTLS command first"),
                "mail.example",
                "tls = starttls",
            ),
            (
                reply(552, "5.3.4 Message size exceeds fixed limit"),
                "mail.example",
                "larger",
            ),
            (
                reply(550, "5.4.5 Daily user sending limit exceeded."),
                "smtp.gmail.com",
                "rate_limit",
            ),
        ];
        let google = reply(535, "5.7.8 Username and Password not accepted");
        let mut google = google;
        google
            .lines
            .push(r#"(OAuth error from the relay: {"status":"401","schemes":"bearer","scope":"https://mail.google.com/"})"#.into());
        assert!(for_reply(&google, with_oauth("smtp.gmail.com"))
            .unwrap_or_default()
            .contains("oauth login"));
        let basic_off = reply(
            535,
            "5.7.30 Basic authentication is not supported for Client Submission",
        );
        assert!(for_reply(&basic_off, with_password("smtp.office365.com"))
            .unwrap_or_default()
            .contains("Microsoft 365"));
        for (reply, host, expected) in cases {
            let advice = for_reply(&reply, with_password(host)).unwrap_or_default();
            assert!(advice.contains(expected), "{reply}: {advice}");
        }
        assert!(for_reply(&reply(250, "ok"), with_password("x")).is_none());
    }

    #[test]
    fn an_oauth_tenant_is_not_told_to_switch_to_oauth_or_check_its_password() {
        let cases = [
            (
                reply(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant"),
                "Authenticated SMTP",
            ),
            (reply(550, "5.7.30 Basic authentication is not supported"), "Authenticated SMTP"),
            (reply(535, "5.7.3 Authentication unsuccessful"), "oauth login"),
        ];
        for (reply, expected) in cases {
            let advice = for_reply(&reply, with_oauth("smtp.office365.com")).unwrap_or_default();
            assert!(advice.contains(expected), "{reply}: {advice}");
            assert!(
                !advice.contains("switch the tenant to OAuth"),
                "{reply}: {advice}"
            );
            assert!(!advice.contains("password"), "{reply}: {advice}");
        }
    }
}
