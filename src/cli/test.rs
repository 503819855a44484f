//! `pbxmail test --tenant T --to ADDR [--from ADDR]`: one live SMTP session to
//! the tenant's relay with the tenant's own settings, printing the transcript
//! (credentials redacted) and, when it fails, what to do about it: the
//! judge's verdict (outcome.rs), worded by advice.rs.
//! Exit 0 only when the relay accepted the test message (250 to its data).

use super::{load_config, take_config_flag, Exit};
use crate::advice;
use crate::base::address;
use crate::base::text::{printable, printable_lines};
use crate::base::time;
use crate::outcome;
use crate::smtp::client;
use crate::smtp::session::Trace;
use crate::smtp::transaction::Outgoing;
use crate::tls;

struct Args {
    tenant: String,
    to: String,
    from: Option<String>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let (mut tenant, mut to, mut from) = (None, None, None);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || iter.next().cloned().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--tenant" => tenant = Some(value()?),
            "--to" => to = Some(value()?),
            "--from" => from = Some(value()?),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    let to = to.ok_or("--to ADDR is required")?;
    if !address::is_valid(&to) {
        return Err(format!("--to {to:?} is not an address"));
    }
    if let Some(from) = from.as_deref().filter(|f| !address::is_valid(f)) {
        return Err(format!("--from {from:?} is not an address"));
    }
    Ok(Args {
        tenant: tenant.ok_or("--tenant T is required")?,
        to,
        from,
    })
}

pub fn run(args: &[String]) -> Exit {
    let (path, rest) = match take_config_flag(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pbxmail test: {e}");
            return Exit::Usage;
        }
    };
    let args = match parse(&rest) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("pbxmail test: {e}\nusage: pbxmail test --tenant T --to ADDR [--from ADDR]");
            return Exit::Usage;
        }
    };
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let tenant = match super::find_tenant(&config, &args.tenant, "test") {
        Ok(tenant) => tenant,
        Err(code) => return code,
    };
    let mut settings =
        match crate::tenant::client_settings(tenant, &config.daemon, &tls::system_roots()) {
            Ok(settings) => settings,
            Err(e) => {
                eprintln!("pbxmail test: tenant {}: {e}", tenant.name);
                return Exit::Config;
            }
        };
    if tenant.auth == crate::base::relay::AuthMode::XOAuth2 {
        println!("-- fetching an OAuth access token");
        match crate::tenant::Tokens::for_tenant(tenant).access_token() {
            Ok(token) => settings.bearer = Some(token),
            Err(e) => return failed(&e.why, None),
        }
    }
    // The sender the relay will see: what the tenant's mail would carry.
    let from = args
        .from
        .or_else(|| tenant.envelope_from.clone())
        .or_else(|| tenant.username.clone().filter(|u| address::is_valid(u)))
        .unwrap_or_else(|| format!("pbxmail-test@{}", config.daemon.hostname));
    let relay_host = settings.relay.host.clone();
    let advice_for = advice::Tenant {
        relay_host: &relay_host,
        auth: settings.auth,
    };

    // Relay replies are in the transcript: escaped, so none drives the terminal.
    let trace: Trace = Box::new(|line: &str| println!("{}", printable(line)));
    let mut connected = match client::open_traced(&settings, Some(trace)) {
        Ok(connected) => connected,
        Err(failure) => {
            let verdict = outcome::of_session_error(&failure.error);
            return failed(
                &failure.error.to_string(),
                advice::for_verdict(&verdict, advice_for),
            );
        }
    };
    let message = test_message(
        &from,
        &args.to,
        tenant.name.as_str(),
        &config.daemon.hostname,
    );
    let recipients = [args.to.clone()];
    let outgoing = Outgoing {
        mail_from: &from,
        recipients: &recipients,
        size: message.len() as u64,
        eight_bit: false,
    };
    let result = connected
        .session
        .transaction(&outgoing, &mut std::io::Cursor::new(message.as_slice()));
    match result {
        Ok(result) => {
            connected.session.quit();
            match result.per_recipient.first() {
                // Only 250 for the message passes: any other reply, even
                // another 2yz, is shown to the admin as not plain success.
                Some(reply) if reply.code.0 == 250 => {
                    let reply = reply.to_string();
                    println!(
                        "OK: {} accepted the test message for <{}> ({})",
                        connected.peer,
                        args.to,
                        printable(&reply)
                    );
                    Exit::Ok
                }
                Some(reply) => failed(
                    &reply.summary(),
                    advice::for_verdict(&outcome::of_reply(reply), advice_for),
                ),
                None => failed("no reply for the recipient", None),
            }
        }
        Err(e) => failed(
            &e.to_string(),
            advice::for_verdict(&outcome::of_session_error(&e), advice_for),
        ),
    }
}

fn failed(what: &str, advice: Option<String>) -> Exit {
    // `what` and the advice may quote the relay.
    println!("FAILED: {}", printable(what));
    if let Some(advice) = advice {
        println!("What to do: {}", printable_lines(&advice));
    }
    Exit::Unavailable
}

fn test_message(from: &str, to: &str, tenant: &str, hostname: &str) -> Vec<u8> {
    let now = crate::base::clock::now_ms() / 1000;
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: pbxmail test message (tenant {tenant})\r\n\
         Date: {}\r\nMessage-ID: <{}.test@{hostname}>\r\nAuto-Submitted: auto-generated\r\n\r\n\
         This message was sent by `pbxmail test` to check tenant {tenant}'s relay.\r\n",
        time::rfc5322(now),
        crate::base::names::MessageId::generate()
    )
    .into_bytes()
}
