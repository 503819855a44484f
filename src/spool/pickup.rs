//! Hints from submitters to a running daemon over `pickup.sock`: "TENANT ID"
//! datagrams, only ever a shortcut, since the daemon rescans the spool anyway.

use super::{MessageId, Spool};
use crate::base::names::TenantName;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

impl Spool {
    pub fn pickup_socket(&self) -> PathBuf {
        self.root.join("pickup.sock")
    }

    /// Tells a running daemon that a message is waiting. Only a hint: if no
    /// daemon listens, it finds the message when it starts.
    pub fn notify(&self, tenant: &TenantName, id: &MessageId) {
        let Ok(socket) = UnixDatagram::unbound() else {
            return;
        };
        let _ = socket.set_nonblocking(true);
        let _ = socket.send_to(format!("{tenant} {id}").as_bytes(), self.pickup_socket());
    }
}
