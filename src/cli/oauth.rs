//! `pbxmail oauth login --tenant T [--flow device|code]`: signs a tenant's
//! mailbox in and stores the refresh token (0600, atomically; run as root,
//! owned as its folder is) where `oauth_token_file` says; the running daemon
//! picks it up at its next try.
//! The flow is the tenant's own (the code grant where `oauth_auth_url` is set,
//! else the device grant) unless `--flow` names one; the grants themselves
//! are in `crate::oauth`.

use super::{Exit, Flags, Invocation};
use crate::base::relay::AuthMode;
use crate::oauth::{self, Endpoints, LoginFlow, OAuthError};

const USAGE: &str = "usage: pbxmail oauth login --tenant T [--flow device|code] [-c FILE]";

pub fn run(args: &[String]) -> Exit {
    Invocation::run("oauth", args, login)
}

fn login(cmd: &Invocation) -> Result<Exit, Exit> {
    let (tenant_name, flow) =
        cmd.parse(|rest| parse_login_args(rest).map_err(|e| format!("{e}\n{USAGE}")))?;
    let config = cmd.config()?;
    let tenant = cmd.tenant(&config, &tenant_name)?;
    if tenant.auth != AuthMode::XOAuth2 {
        return Err(cmd.fail(
            Exit::Config,
            format!("tenant {tenant_name} does not use auth = xoauth2"),
        ));
    }
    let result = Endpoints::for_tenant(tenant).and_then(|endpoints| {
        let flow = match flow {
            Some(flow) => flow,
            None => LoginFlow::for_endpoints(&endpoints)?,
        };
        let agent = oauth::http_agent(tenant.ca_file.as_deref())?;
        let say = |line: &str| println!("{line}");
        match flow {
            LoginFlow::Device => oauth::device_login(&endpoints, &agent, say),
            LoginFlow::Code => oauth::code_login(
                &endpoints,
                &agent,
                tenant.username.as_deref(),
                &mut std::io::stdin().lock(),
                say,
            ),
        }
    });
    result.map(|()| Exit::Ok).map_err(|e| {
        let code = match e {
            OAuthError::Config(_) => Exit::Config,
            OAuthError::Temporary(_) => Exit::TempFail,
            OAuthError::SignInNeeded(_) | OAuthError::Denied(_) => Exit::DataErr,
        };
        cmd.fail(code, failure_text(&e, &tenant_name))
    })
}

/// What the admin reads when the sign-in fails. The error's own text is the
/// daemon's ("will retry"); here nothing retries, so it says what to do.
fn failure_text(e: &OAuthError, tenant: &str) -> String {
    match e {
        OAuthError::Temporary(why) => format!(
            "the provider's sign-in endpoint could not be reached or failed: {why}. Check the \
             network (DNS, firewall, proxy) and the endpoint URLs in the tenant's oauth_* \
             settings, then run `pbxmail oauth login --tenant {tenant}` again"
        ),
        other => other.to_string(),
    }
}

/// `login --tenant T [--flow device|code]`, options in any order.
fn parse_login_args(args: &[String]) -> Result<(String, Option<LoginFlow>), String> {
    let mut flags = Flags::new(args);
    if flags.next() != Some("login") {
        return Err("the only subcommand is login".into());
    }
    let (mut tenant, mut flow) = (None, None);
    while let Some(arg) = flags.next() {
        match arg {
            "--tenant" if tenant.is_none() => tenant = Some(flags.value()?),
            "--flow" if flow.is_none() => flow = Some(LoginFlow::parse(&flags.value()?)?),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let tenant = tenant.ok_or("--tenant T is required")?;
    Ok((tenant, flow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args;

    #[test]
    fn login_takes_a_tenant_and_an_optional_flow_in_any_order() {
        assert_eq!(
            parse_login_args(&args(&["login", "--tenant", "acme"])),
            Ok(("acme".into(), None))
        );
        assert_eq!(
            parse_login_args(&args(&["login", "--flow", "code", "--tenant", "acme"])),
            Ok(("acme".into(), Some(LoginFlow::Code)))
        );
        assert_eq!(
            parse_login_args(&args(&["login", "--tenant", "acme", "--flow", "device"])),
            Ok(("acme".into(), Some(LoginFlow::Device)))
        );
    }

    #[test]
    fn an_unreachable_endpoint_says_what_to_do_not_that_it_will_retry() {
        let e = OAuthError::Temporary("https://idp.example/token: connection refused".into());
        let text = failure_text(&e, "acme");
        assert!(!text.contains("will retry"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
        assert!(text.contains("Check the network"), "{text}");
        assert!(
            text.contains("run `pbxmail oauth login --tenant acme` again"),
            "{text}"
        );
        let denied = OAuthError::Denied("sign-in was declined".into());
        assert_eq!(failure_text(&denied, "acme"), denied.to_string());
    }

    #[test]
    fn bad_login_arguments_are_refused() {
        for bad in [
            &["login"][..],
            &["logout", "--tenant", "acme"],
            &["login", "--tenant"],
            &["login", "--tenant", "acme", "--flow", "browser"],
            &["login", "--tenant", "acme", "--tenant", "other"],
            &["login", "--tenant", "acme", "extra"],
        ] {
            assert!(parse_login_args(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
