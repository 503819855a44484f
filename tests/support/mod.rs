//! Shared helpers for the integration tests; each test binary uses a subset.
#![allow(dead_code)]

pub mod harness;
pub mod oauth_server;
pub mod observed;
pub mod rng;
pub mod smtp_server;
