//! The one privilege pbxmail has: installed setgid `pbxmail` (like Postfix's
//! postdrop), so a PBX process outside the pbxmail group can submit mail into
//! the group-writable spool and read the configuration. Only submission and
//! queue listing keep it; every other command gives it up before doing
//! anything, and so does a submission pointed at another config file (which
//! could otherwise be used to read files only the group may read).

use rustix::process::{getegid, getgid};
use rustix::thread::set_thread_res_gid;

/// True when running with a group that is not the caller's own.
pub fn is_elevated() -> bool {
    getegid() != getgid()
}

/// Drops the setgid group for good (real, effective and saved). Called while
/// the process is still single-threaded, so one thread's IDs are the process's.
pub fn drop_group() -> std::io::Result<()> {
    if !is_elevated() {
        return Ok(());
    }
    let gid = getgid();
    set_thread_res_gid(gid, gid, gid)?;
    Ok(())
}

/// Whether this invocation may keep the group: `sendmail` and `mailq`.
pub fn keeps_group(program: &str, command: Option<&str>) -> bool {
    matches!(program, "sendmail" | "mailq")
        || matches!(command, Some("sendmail" | "queue" | "mailq"))
}
