//! Taking mail in: the sendmail interface and local SMTP submission on
//! `listen` (the protocol in smtp/, the sockets in server.rs, the disk
//! work on writer.rs's threads), both through one cleanup step (cleanup.rs).

pub mod cleanup;
pub mod message;
#[cfg(test)]
mod mutate;
pub mod sendmail;
pub mod server;
pub mod smtp;
pub mod writer;
