//! pbxmail: a multi-tenant mail delivery agent for PBX appliances.
//! One binary; argv[0] `sendmail` or `mailq` selects those personalities.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod accounts;
mod advice;
mod archive;
mod base;
mod bounce;
mod cli;
mod config;
mod control;
mod daemon;
mod dispatch;
mod intake;
mod oauth;
mod outcome;
mod privilege;
mod smtp;
mod spool;
mod tenant;
mod tls;

fn main() {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    std::process::exit(cli::run(args) as i32);
}
