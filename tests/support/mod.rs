//! Shared helpers for the integration tests (tests/it), written once: the
//! daemon harness, the scripted SMTP relay, the OAuth token endpoint.

pub mod harness;
pub mod mail;
pub mod oauth_server;
pub mod observed;
pub mod rng;
pub mod smtp_server;
