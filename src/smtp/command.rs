//! The commands the client sends, as values: `Display` is a command's whole
//! wire line (without its CRLF) and `redacted()` what a transcript may show
//! of the same value, so credentials are hidden by type, never by re-reading
//! a line. Choosing which command to send is the session's job.

use super::Phase;
use crate::base::secret::Secret;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use std::fmt;

/// Password mechanisms (RFC 4954; PLAIN is RFC 4616).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    Plain,
    Login,
}

/// OAuth 2.0 bearer-token mechanisms: OAUTHBEARER (RFC 7628) and the
/// XOAUTH2 that Google and Microsoft offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerMechanism {
    XOAuth2,
    OAuthBearer,
}

/// The SASL mechanism an AUTH command names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sasl {
    Password(AuthMechanism),
    Bearer(BearerMechanism),
}

impl Sasl {
    pub fn as_str(self) -> &'static str {
        match self {
            Sasl::Password(AuthMechanism::Plain) => "PLAIN",
            Sasl::Password(AuthMechanism::Login) => "LOGIN",
            Sasl::Bearer(BearerMechanism::XOAuth2) => "XOAUTH2",
            Sasl::Bearer(BearerMechanism::OAuthBearer) => "OAUTHBEARER",
        }
    }
}

/// A MAIL FROM parameter, in the order the session adds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailParameter {
    /// RFC 1870: the message's size in octets.
    Size(u64),
    /// RFC 6152: `BODY=8BITMIME`.
    EightBitMime,
    /// RFC 6531: the envelope carries UTF-8 addresses.
    SmtpUtf8,
}

impl fmt::Display for MailParameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MailParameter::Size(octets) => write!(f, "SIZE={octets}"),
            MailParameter::EightBitMime => f.write_str("BODY=8BITMIME"),
            MailParameter::SmtpUtf8 => f.write_str("SMTPUTF8"),
        }
    }
}

/// One client command. `Debug` shows no credential (they are `Secret`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    StartTls,
    /// `AUTH <mechanism> [initial response]` (RFC 4954 §4); the response is
    /// base64 already.
    Auth {
        mechanism: Sasl,
        initial: Option<Secret>,
    },
    /// A line answering a 334 challenge, base64 already. Always redacted:
    /// it carries a user name, a password or ends a bearer exchange.
    AuthResponse(Secret),
    Mail {
        from: String,
        parameters: Vec<MailParameter>,
    },
    Rcpt(String),
    Data,
    /// RFC 3030: `size` octets of the message follow the line.
    Bdat {
        size: usize,
        last: bool,
    },
    Rset,
    Quit,
}

impl Command {
    /// `AUTH PLAIN` with its initial response: authzid empty, then the
    /// user name and password (RFC 4616 §2).
    pub fn auth_plain(username: &str, password: &Secret) -> Command {
        let token = BASE64.encode(format!("\0{username}\0{}", password.expose()));
        Command::Auth {
            mechanism: Sasl::Password(AuthMechanism::Plain),
            initial: Some(Secret::new(token)),
        }
    }

    /// `AUTH LOGIN`, which the relay answers with a 334 asking for the user name.
    pub fn auth_login() -> Command {
        Command::Auth {
            mechanism: Sasl::Password(AuthMechanism::Login),
            initial: None,
        }
    }

    /// A LOGIN step: the user name or the password, base64-encoded.
    pub fn login_response(text: &str) -> Command {
        Command::AuthResponse(Secret::new(BASE64.encode(text)))
    }

    /// `AUTH OAUTHBEARER` (RFC 7628 §3.1, GS2 header with the relay's host
    /// and port) or `AUTH XOAUTH2` with the bearer token as initial response.
    pub fn auth_bearer(
        mechanism: BearerMechanism,
        username: &str,
        token: &Secret,
        host: &str,
        port: u16,
    ) -> Command {
        let token = token.expose();
        let payload = match mechanism {
            BearerMechanism::XOAuth2 => format!("user={username}\x01auth=Bearer {token}\x01\x01"),
            BearerMechanism::OAuthBearer => {
                format!(
                    "n,a={username},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
                )
            }
        };
        Command::Auth {
            mechanism: Sasl::Bearer(mechanism),
            initial: Some(Secret::new(BASE64.encode(payload))),
        }
    }

    /// The client's answer to a bearer refusal's 334, which ends the
    /// exchange so the relay sends its final reply: `AQ==` (a lone 0x01,
    /// RFC 7628 §3.2.3) for OAUTHBEARER, an empty line for XOAUTH2.
    pub fn bearer_end(mechanism: BearerMechanism) -> Command {
        let line = match mechanism {
            BearerMechanism::XOAuth2 => "",
            BearerMechanism::OAuthBearer => "AQ==",
        };
        Command::AuthResponse(Secret::new(line.to_string()))
    }

    /// Where in the conversation this command belongs, for errors and replies.
    pub fn phase(&self) -> Phase {
        match self {
            Command::Ehlo(_) | Command::Helo(_) => Phase::Ehlo,
            Command::StartTls => Phase::StartTls,
            Command::Auth { .. } | Command::AuthResponse(_) => Phase::Auth,
            Command::Mail { .. } => Phase::Mail,
            Command::Rcpt(_) => Phase::Rcpt,
            Command::Data => Phase::Data,
            Command::Bdat { last: true, .. } => Phase::DataEnd,
            Command::Bdat { last: false, .. } => Phase::Body,
            Command::Rset => Phase::Reset,
            Command::Quit => Phase::Quit,
        }
    }

    /// The command as a transcript shows it: the wire line, credentials hidden.
    pub fn redacted(&self) -> Redacted<'_> {
        Redacted(self)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ehlo(name) => write!(f, "EHLO {name}"),
            Command::Helo(name) => write!(f, "HELO {name}"),
            Command::StartTls => f.write_str("STARTTLS"),
            Command::Auth {
                mechanism,
                initial: None,
            } => write!(f, "AUTH {}", mechanism.as_str()),
            Command::Auth {
                mechanism,
                initial: Some(response),
            } => write!(f, "AUTH {} {}", mechanism.as_str(), response.expose()),
            Command::AuthResponse(response) => f.write_str(response.expose()),
            Command::Mail { from, parameters } => {
                write!(f, "MAIL FROM:<{from}>")?;
                for parameter in parameters {
                    write!(f, " {parameter}")?;
                }
                Ok(())
            }
            Command::Rcpt(to) => write!(f, "RCPT TO:<{to}>"),
            Command::Data => f.write_str("DATA"),
            Command::Bdat { size, last: false } => write!(f, "BDAT {size}"),
            Command::Bdat { size, last: true } => write!(f, "BDAT {size} LAST"),
            Command::Rset => f.write_str("RSET"),
            Command::Quit => f.write_str("QUIT"),
        }
    }
}

/// `Display` of a command with its credentials replaced.
pub struct Redacted<'a>(&'a Command);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Command::Auth {
                mechanism,
                initial: Some(_),
            } => write!(f, "AUTH {} <credentials redacted>", mechanism.as_str()),
            Command::AuthResponse(_) => f.write_str("<credentials redacted>"),
            other => write!(f, "{other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_string())
    }

    /// The wire line and the transcript line of each command.
    fn lines(command: &Command) -> (String, String) {
        (command.to_string(), command.redacted().to_string())
    }

    fn same(line: &str) -> (String, String) {
        (line.to_string(), line.to_string())
    }

    #[test]
    fn session_commands_render_their_line_and_show_it_whole() {
        assert_eq!(
            lines(&Command::Ehlo("pbx.example".into())),
            same("EHLO pbx.example")
        );
        assert_eq!(
            lines(&Command::Helo("pbx.example".into())),
            same("HELO pbx.example")
        );
        assert_eq!(lines(&Command::StartTls), same("STARTTLS"));
        assert_eq!(lines(&Command::Rset), same("RSET"));
        assert_eq!(lines(&Command::Quit), same("QUIT"));
    }

    #[test]
    fn mail_renders_its_parameters_in_order() {
        let bare = Command::Mail {
            from: "a@x".into(),
            parameters: Vec::new(),
        };
        assert_eq!(lines(&bare), same("MAIL FROM:<a@x>"));
        let null = Command::Mail {
            from: String::new(),
            parameters: vec![MailParameter::Size(0)],
        };
        assert_eq!(lines(&null), same("MAIL FROM:<> SIZE=0"));
        let all = Command::Mail {
            from: "jörg@x".into(),
            parameters: vec![
                MailParameter::Size(1234),
                MailParameter::EightBitMime,
                MailParameter::SmtpUtf8,
            ],
        };
        assert_eq!(
            lines(&all),
            same("MAIL FROM:<jörg@x> SIZE=1234 BODY=8BITMIME SMTPUTF8")
        );
    }

    #[test]
    fn transaction_commands_render_their_line() {
        assert_eq!(lines(&Command::Rcpt("b@y".into())), same("RCPT TO:<b@y>"));
        assert_eq!(lines(&Command::Data), same("DATA"));
        let chunk = Command::Bdat {
            size: 65536,
            last: false,
        };
        assert_eq!(lines(&chunk), same("BDAT 65536"));
        let last = Command::Bdat {
            size: 4,
            last: true,
        };
        assert_eq!(lines(&last), same("BDAT 4 LAST"));
    }

    #[test]
    fn auth_plain_sends_authzid_user_and_password_but_shows_none() {
        let command = Command::auth_plain("u", &secret("p"));
        let (wire, shown) = lines(&command);
        assert_eq!(wire, format!("AUTH PLAIN {}", BASE64.encode("\0u\0p")));
        assert_eq!(shown, "AUTH PLAIN <credentials redacted>");
    }

    #[test]
    fn auth_login_steps_are_base64_and_hidden() {
        assert_eq!(lines(&Command::auth_login()), same("AUTH LOGIN"));
        let user = Command::login_response("u");
        assert_eq!(
            lines(&user),
            ("dQ==".to_string(), "<credentials redacted>".to_string())
        );
        let password = Command::login_response("hunter2");
        assert_eq!(
            lines(&password),
            (
                "aHVudGVyMg==".to_string(),
                "<credentials redacted>".to_string()
            )
        );
    }

    #[test]
    fn xoauth2_carries_user_and_token() {
        let command = Command::auth_bearer(
            BearerMechanism::XOAuth2,
            "pbx@acme",
            &secret("tok"),
            "h",
            587,
        );
        let expected = BASE64.encode("user=pbx@acme\x01auth=Bearer tok\x01\x01");
        assert_eq!(
            lines(&command),
            (
                format!("AUTH XOAUTH2 {expected}"),
                "AUTH XOAUTH2 <credentials redacted>".to_string()
            )
        );
        assert_eq!(
            lines(&Command::bearer_end(BearerMechanism::XOAuth2)),
            (String::new(), "<credentials redacted>".to_string())
        );
    }

    #[test]
    fn oauthbearer_carries_the_gs2_header_host_and_port() {
        let command = Command::auth_bearer(
            BearerMechanism::OAuthBearer,
            "u",
            &secret("t"),
            "smtp.example",
            465,
        );
        let expected =
            BASE64.encode("n,a=u,\x01host=smtp.example\x01port=465\x01auth=Bearer t\x01\x01");
        assert_eq!(
            lines(&command),
            (
                format!("AUTH OAUTHBEARER {expected}"),
                "AUTH OAUTHBEARER <credentials redacted>".to_string()
            )
        );
        assert_eq!(
            Command::bearer_end(BearerMechanism::OAuthBearer).to_string(),
            "AQ=="
        );
    }

    #[test]
    fn debug_shows_no_credential() {
        for command in [
            Command::auth_plain("u", &secret("hunter2")),
            Command::login_response("hunter2"),
            Command::auth_bearer(BearerMechanism::XOAuth2, "u", &secret("hunter2"), "h", 1),
        ] {
            let debug = format!("{command:?}");
            let wire = command.to_string();
            let token = wire.rsplit(' ').next().unwrap_or_default();
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(!debug.contains(token), "{debug}");
        }
    }

    #[test]
    fn each_command_names_its_phase() {
        assert_eq!(Command::Helo("h".into()).phase(), Phase::Ehlo);
        assert_eq!(Command::login_response("u").phase(), Phase::Auth);
        assert_eq!(Command::Rcpt("b@y".into()).phase(), Phase::Rcpt);
        let chunk = Command::Bdat {
            size: 1,
            last: false,
        };
        assert_eq!(chunk.phase(), Phase::Body);
        let last = Command::Bdat {
            size: 1,
            last: true,
        };
        assert_eq!(last.phase(), Phase::DataEnd);
        assert_eq!(Command::Rset.phase(), Phase::Reset);
    }
}
