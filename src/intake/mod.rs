//! Taking mail in: the sendmail interface (and, later, loopback SMTP).

pub mod message;
pub mod sendmail;
