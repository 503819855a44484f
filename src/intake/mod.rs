//! Taking mail in: the sendmail interface, and local SMTP submission on
//! `listen` (the protocol in smtp.rs, the sockets in server.rs).

pub mod message;
pub mod sendmail;
pub mod server;
pub mod smtp;
