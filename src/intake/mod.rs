//! Taking mail in: the sendmail interface and local SMTP submission on
//! `listen` (the protocol in smtp/, the sockets in server.rs, the disk
//! work on writer.rs's threads), both through one cleanup step (cleanup.rs).

pub mod cleanup;
pub mod message;
pub mod sendmail;
pub mod server;
pub mod smtp;
pub mod writer;

/// Test-only: byte strings that mean something to the intake parsers (the
/// sendmail header reader, the listener's conversation), for the property
/// tests' token-level mutations (`base::mutate::mutate_tokens`).
#[cfg(test)]
pub(crate) const MAIL_TOKENS: &[&[u8]] = &[
    b"\r",
    b"\n",
    b"\r\n",
    b".",
    b"\n.\n",
    b"\r\n.\r\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b":",
    b" ",
    b"\t",
    b"<",
    b">",
    b"=",
    b"@",
    b"\"",
    b"(",
    b")",
    b"[",
    b"]",
    b"\\",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xfc",
    b"\x1b[2J",
    b"MAIL FROM:<x@acme.example>\r\n",
    b"RCPT TO:<y@x.example>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"RSET\r\n",
    b"EHLO h\r\n",
    b"SIZE=99999999999999999999",
    b"Bcc: z@x.example\r\n",
    b"From: <>\r\n",
    b"\r\n\r\n",
];

/// Test-only: what the intake property tests' long runs are made of.
#[cfg(test)]
pub(crate) const MAIL_RUNS: &[u8] = b"x: \r\n.";
