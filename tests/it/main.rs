//! The integration tests: one binary that drives the real `pbxmail` against
//! scripted relays and token endpoints on loopback, a module per concept. The
//! shared helpers in tests/support are compiled once, here.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod archive;
mod crash;
mod daemon;
mod dispatcher_io;
mod intake;
mod oauth;
mod oauth_crash;
mod policy;
mod privilege;
mod secrets;
mod sendmail;
mod smtp_client;
mod spool_faults;
mod support_selftest;
