//! One plain-language line of what to do, for the relay replies and errors
//! admins meet most (shown by `pbxmail test`). The judge (outcome.rs) decides
//! which situation a reply or error is; this file only words it, for the
//! relay we talked to and the way the tenant signs in.

use crate::base::relay::AuthMode;
use crate::outcome::{Advice, CertificateFix, HandshakeFix, Verdict};

/// What the advice depends on besides the reply: whom we talked to, and how
/// we signed in (a password refusal and a token refusal need different steps).
#[derive(Debug, Clone, Copy)]
pub struct Tenant<'a> {
    pub relay_host: &'a str,
    pub auth: AuthMode,
}

/// The advice a verdict carries, worded for this tenant.
pub fn for_verdict(verdict: &Verdict, tenant: Tenant) -> Option<String> {
    verdict.advice.map(|advice| text(advice, tenant))
}

/// The words for one advice key.
pub fn text(advice: Advice, tenant: Tenant) -> String {
    let relay_host = tenant.relay_host;
    let gmail = relay_host.ends_with("gmail.com") || relay_host.ends_with("googlemail.com");
    let oauth = tenant.auth == AuthMode::XOAuth2;
    let text = match advice {
        Advice::OAuthScopeRefused => {
            "the relay refused the OAuth token for this mailbox or scope (400): check that username \
             is the mailbox that signed in, and oauth_scope (Google: https://mail.google.com/; \
             Microsoft 365: https://outlook.office.com/SMTP.Send)"
        }
        Advice::OAuthTokenRefused => {
            "the relay refused the OAuth access token (expired, revoked or for another mailbox): \
             run `pbxmail oauth login --tenant T` again and sign in as the mailbox in username"
        }
        Advice::SmtpAuthDisabled if oauth => {
            "Microsoft 365 has SMTP AUTH turned off for this mailbox (or the whole organisation), \
             which refuses OAuth sign-ins too: enable Authenticated SMTP for the mailbox in the \
             Microsoft 365 admin center (Users > the mailbox > Mail > Manage email apps), and \
             check that the app registration has the SMTP.Send permission"
        }
        Advice::PasswordNotAccepted | Advice::LoginRefused if oauth => {
            "the relay refused the OAuth access token: check that username is the mailbox that \
             signed in, and if it still fails run `pbxmail oauth login --tenant T` again"
        }
        Advice::SmtpAuthDisabled => {
            "Microsoft 365 refuses password sign-in (basic authentication) for this mailbox: \
             enable Authenticated SMTP for it in the Microsoft 365 admin center, or switch the \
             tenant to OAuth (auth = xoauth2)"
        }
        Advice::PasswordNotAccepted if gmail => {
            "Gmail refuses the password: create an app password for this account \
             (Google Account > Security > App passwords) and use it, or switch to OAuth"
        }
        Advice::PasswordNotAccepted | Advice::LoginRefused => {
            "the relay refused the login: check username and password (or password_file)"
        }
        Advice::TlsRequired => {
            "the relay requires TLS before anything else: set tls = starttls (or tls = implicit on port 465)"
        }
        Advice::LoginRequired => "the relay requires a login: set username and password for this tenant",
        Advice::SendAsDenied => {
            "the mailbox may not send as this sender: set envelope_from to the login's address, \
             or grant it Send As permission for the sender"
        }
        Advice::DailyQuota => {
            "the mailbox has used up its daily sending quota: pbxmail keeps such mail queued and \
             retries, so nothing bounces; set rate_limit below the provider's quota \
             (Gmail: 2000/day for Workspace, 500/day for free accounts)"
        }
        Advice::ExchangeQuota => {
            "Exchange Online's sending quota for this mailbox is used up: pbxmail keeps such mail \
             queued and retries; keep rate_limit at 30/min or lower"
        }
        Advice::TooLarge => "the message is larger than the relay accepts",
        Advice::RelayDenied => {
            "the relay will not relay for us: check the login, or allow this PBX's address on the relay"
        }
        Advice::NoSuchUser => "the recipient's address does not exist",
        Advice::Temporary => "a temporary refusal: pbxmail retries on its own",
        Advice::Unreachable => {
            return format!(
                "nothing answers at the relay: check relay = host:port, DNS for {relay_host}, \
                 and that this network may reach it (firewalls often block port 25)"
            )
        }
        Advice::Silent => {
            "the relay stopped answering: a firewall dropping traffic, or a wrong port (try 587 with \
             tls = starttls, or 465 with tls = implicit)"
        }
        Advice::NoStartTls => {
            "the relay does not offer STARTTLS on this port: use its submission port (587), or \
             tls = implicit on port 465"
        }
        Advice::NoUsableAuth if oauth => {
            "the relay does not offer XOAUTH2 or OAUTHBEARER here: check that relay is the \
             provider's submission server (Microsoft 365: smtp.office365.com:587, Gmail: \
             smtp.gmail.com:587) and that tls is on (many relays offer AUTH only inside TLS)"
        }
        Advice::NoUsableAuth => {
            "the relay offers no PLAIN or LOGIN here: many relays offer AUTH only inside TLS \
             (tls = starttls, or implicit on port 465) or only on their submission port (587); \
             if this relay takes mail without a login, set auth = none"
        }
        Advice::EightBitUnsupported => {
            "the relay does not offer 8BITMIME and this message's 8-bit content could not be \
             converted to 7 bits (8-bit octets in a header or an attached message): have the PBX \
             encode its mail (RFC 2047 for headers, quoted-printable or base64 for bodies), or use \
             a relay that offers 8BITMIME"
        }
        Advice::SmtpUtf8Unsupported => {
            "the relay does not offer SMTPUTF8, which a non-ASCII address or UTF-8 header text \
             needs: use ASCII addresses (envelope_from for the sender), have the PBX encode \
             header text (RFC 2047), or use a relay that offers SMTPUTF8"
        }
        Advice::Certificate(CertificateFix::SelfSigned) => {
            "the relay's certificate is self-signed: put that certificate (PEM) in ca_file; \
             tls_verify = no is the insecure last resort"
        }
        Advice::Certificate(CertificateFix::CaAsServer) => {
            "the relay presents a CA certificate as its own, which no TLS client accepts, ca_file \
             or not: its operator must install a server certificate (CA:FALSE), self-signed or \
             signed by that CA (then put the CA in ca_file); tls_verify = no is the insecure last resort"
        }
        Advice::Certificate(CertificateFix::Dates) => {
            "the relay's certificate is outside its validity dates: check this machine's clock \
             (NTP); if the clock is right, the relay's operator must renew the certificate"
        }
        Advice::Certificate(CertificateFix::WrongName) => {
            "set relay to a name the certificate was issued for (the error lists them), not an \
             IP address or an alias"
        }
        Advice::Certificate(CertificateFix::UntrustedIssuer) => {
            "put the CA that signed the relay's certificate in ca_file (PEM), or fix the name in \
             relay; tls_verify = no is the insecure last resort"
        }
        Advice::Certificate(CertificateFix::RelayOperator) => {
            "the relay's certificate itself is unusable: its operator must replace it (a current \
             certificate for TLS servers, signed with SHA-256 or better)"
        }
        Advice::Handshake(HandshakeFix::NotTls) => {
            "the TLS handshake failed: if the relay speaks plain SMTP on this port, use tls = starttls \
             rather than implicit"
        }
        Advice::Handshake(HandshakeFix::OldVersion) => {
            "the relay offers only TLS 1.1 or older, which pbxmail refuses (RFC 8996): its \
             operator must enable TLS 1.2 or 1.3; another tls mode does not help"
        }
        Advice::Handshake(HandshakeFix::NoSharedCipher) => {
            "the relay and pbxmail share no TLS cipher suite: its operator must enable a modern \
             one (ECDHE with AES-GCM or ChaCha20-Poly1305); another tls mode does not help"
        }
        Advice::Handshake(HandshakeFix::Other) => {
            "the relay broke off the TLS handshake: check that relay names its submission port \
             (587 with tls = starttls, 465 with tls = implicit), then ask its operator"
        }
    };
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome;
    use crate::smtp::reply::{Reply, ReplyCode};
    use crate::smtp::SessionError;

    /// The advice `pbxmail test` shows for a reply: the judge's key, worded.
    fn for_reply(reply: &Reply, tenant: Tenant) -> Option<String> {
        for_verdict(&outcome::of_reply(reply), tenant)
    }

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
    fn a_login_without_a_usable_mechanism_is_told_where_auth_is_offered() {
        let verdict = outcome::of_session_error(&SessionError::NoUsableAuth {
            wanted: "PLAIN or LOGIN",
            offered: Vec::new(),
        });
        let advice = for_verdict(&verdict, with_password("mail.example")).unwrap_or_default();
        assert!(advice.contains("tls = starttls"), "{advice}");
        assert!(advice.contains("auth = none"), "{advice}");
        let advice = for_verdict(&verdict, with_oauth("smtp.office365.com")).unwrap_or_default();
        assert!(advice.contains("XOAUTH2"), "{advice}");
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

    #[test]
    fn each_tls_failure_gets_the_fix_that_works_not_another_tls_mode() {
        use crate::tls::{CertificateProblem, HandshakeProblem, Incompatibility, TlsError};
        let advice_for = |tls: TlsError| {
            let verdict = outcome::of_session_error(&SessionError::Tls(tls));
            for_verdict(&verdict, with_password("mail.example")).unwrap_or_default()
        };
        let cases = [
            (
                TlsError::Incompatible(Incompatibility::OldProtocolVersion),
                "TLS 1.2",
            ),
            (
                TlsError::Incompatible(Incompatibility::NoSharedCipher),
                "cipher suite",
            ),
            (
                TlsError::Certificate(CertificateProblem::SelfSigned),
                "put that certificate",
            ),
            (
                TlsError::Certificate(CertificateProblem::CaUsedAsEndEntity),
                "CA:FALSE",
            ),
            (TlsError::Certificate(CertificateProblem::Expired), "clock"),
            (
                TlsError::Certificate(CertificateProblem::UnknownIssuer),
                "ca_file",
            ),
            (
                TlsError::Certificate(CertificateProblem::Revoked),
                "replace it",
            ),
            (
                TlsError::Handshake(HandshakeProblem::NotTls),
                "tls = starttls",
            ),
        ];
        for (tls, expected) in cases {
            let shown = tls.to_string();
            let advice = advice_for(tls);
            assert!(advice.contains(expected), "{shown}: {advice}");
        }
        // An old-version relay is not told to change tls = (the wrong fix).
        let old = advice_for(TlsError::Incompatible(Incompatibility::OldProtocolVersion));
        assert!(!old.contains("use tls ="), "{old}");
    }
}
