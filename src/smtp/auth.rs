//! SASL exchanges (RFC 4954) over a session's commands: PLAIN and LOGIN
//! with a password, OAUTHBEARER and XOAUTH2 with an OAuth 2.0 token. Only
//! talks; what a refusal means is decided elsewhere.

use super::command::{AuthMechanism, BearerMechanism, Command};
use super::session::Session;
use super::{Phase, SessionError};
use crate::base::secret::Secret;
use crate::base::stream::Transport;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

impl<S: Transport> Session<S> {
    /// SASL PLAIN or LOGIN (RFC 4954). A refusal is `Rejected(Auth, reply)`.
    pub fn authenticate(
        &mut self,
        mechanism: AuthMechanism,
        username: &str,
        password: &Secret,
    ) -> Result<(), SessionError> {
        let reply = match mechanism {
            AuthMechanism::Plain => self.command(&Command::auth_plain(username, password))?,
            AuthMechanism::Login => {
                for step in [Command::auth_login(), Command::login_response(username)] {
                    let reply = self.command(&step)?;
                    if reply.code.0 != 334 {
                        return Err(SessionError::Rejected(Phase::Auth, reply));
                    }
                }
                self.command(&Command::login_response(password.expose()))?
            }
        };
        if reply.code.0 != 235 {
            return Err(SessionError::Rejected(Phase::Auth, reply));
        }
        Ok(())
    }

    /// SASL with an OAuth 2.0 bearer token: OAUTHBEARER (RFC 7628) or
    /// Google's and Microsoft's XOAUTH2. A refusal comes as a 334 carrying
    /// error details; the client ends the exchange (RFC 7628 §3.2.3) and the
    /// relay's final reply is returned in `Rejected(Auth, ..)`.
    pub fn authenticate_bearer(
        &mut self,
        mechanism: BearerMechanism,
        username: &str,
        token: &Secret,
        host: &str,
        port: u16,
    ) -> Result<(), SessionError> {
        let auth = Command::auth_bearer(mechanism, username, token, host, port);
        let reply = self.command(&auth)?;
        if reply.code.0 == 334 {
            // The challenge is the provider's reason, base64 JSON, e.g. Google's
            // {"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}.
            let reason = reply
                .lines
                .first()
                .and_then(|l| BASE64.decode(l.trim()).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            let mut refusal = self.command(&Command::bearer_end(mechanism))?;
            if let Some(reason) = reason {
                refusal
                    .lines
                    .push(format!("(OAuth error from the relay: {reason})"));
            }
            return Err(SessionError::Rejected(Phase::Auth, refusal));
        }
        if reply.code.0 != 235 {
            return Err(SessionError::Rejected(Phase::Auth, reply));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::script::{session, written};

    #[test]
    fn transcript_shows_both_sides_but_no_credentials() {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = std::sync::Arc::clone(&lines);
        let mut s = session(&[
            "",
            "334 VXNlcm5hbWU6\r\n",
            "334 UGFzc3dvcmQ6\r\n",
            "235 ok\r\n",
            "250 p\r\n",
        ])
        .with_trace(Some(Box::new(move |l: &str| {
            sink.lock().unwrap().push(l.to_string())
        })));
        s.authenticate(
            AuthMechanism::Login,
            "user@x",
            &Secret::new("hunter2".into()),
        )
        .unwrap();
        s.authenticate(
            AuthMechanism::Plain,
            "user@x",
            &Secret::new("hunter2".into()),
        )
        .unwrap_err();
        let text = lines.lock().unwrap().join("\n");
        assert!(
            text.contains("C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6\nC: <credentials redacted>"),
            "{text}"
        );
        assert!(
            text.contains("C: AUTH PLAIN <credentials redacted>"),
            "{text}"
        );
        for secret in ["hunter2", "aHVudGVyMg", "dXNlckB4"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[test]
    fn xoauth2_sends_the_bearer_string_and_ends_a_refusal() {
        let mut s = session(&["", "235 2.7.0 Accepted\r\n"]);
        s.authenticate_bearer(
            BearerMechanism::XOAuth2,
            "pbx@acme.example",
            &Secret::new("tok".into()),
            "h",
            587,
        )
        .unwrap();
        let expected = BASE64.encode("user=pbx@acme.example\x01auth=Bearer tok\x01\x01");
        assert_eq!(written(s), format!("AUTH XOAUTH2 {expected}\r\n"));

        let mut s = session(&[
            "",
            "334 eyJzdGF0dXMiOiI0MDEifQ==\r\n",
            "535 5.7.8 bad token\r\n",
        ]);
        let err = s
            .authenticate_bearer(
                BearerMechanism::OAuthBearer,
                "u",
                &Secret::new("t".into()),
                "h",
                587,
            )
            .unwrap_err();
        assert!(
            matches!(&err, SessionError::Rejected(Phase::Auth, r) if r.code.0 == 535 && r.summary().contains(r#"{"status":"401"}"#)),
            "{err:?}"
        );
        assert!(written(s).ends_with("\r\nAQ==\r\n"));
    }

    #[test]
    fn auth_login_sends_base64_steps() {
        let mut s = session(&[
            "",
            "334 VXNlcm5hbWU6\r\n",
            "334 UGFzc3dvcmQ6\r\n",
            "235 ok\r\n",
        ]);
        s.authenticate(AuthMechanism::Login, "u", &Secret::new("p".into()))
            .unwrap();
        assert_eq!(written(s), "AUTH LOGIN\r\ndQ==\r\ncA==\r\n");
    }

    #[test]
    fn rejected_auth_is_an_error_with_the_reply() {
        let mut s = session(&["", "535 5.7.8 bad\r\n"]);
        let err = s
            .authenticate(AuthMechanism::Plain, "u", &Secret::new("p".into()))
            .unwrap_err();
        assert!(matches!(err, SessionError::Rejected(Phase::Auth, r) if r.code.0 == 535));
    }
}
