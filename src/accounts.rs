//! Local users and groups, read from /etc/passwd and /etc/group. No NSS
//! lookups: appliances keep their accounts local, and a name lookup must
//! not hang on a network directory.

use std::fs;
use std::io;

/// A user ID's name; None if it has none or the file cannot be read (the
/// uid alone still says who).
pub fn user_name(uid: u32) -> Option<String> {
    let users = fs::read_to_string("/etc/passwd").ok()?;
    users.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

/// The ID of the group `archive_group` names.
pub fn group_id(name: &str) -> io::Result<u32> {
    let groups = fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (group == name).then_some(gid)
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("archive_group {name:?} does not exist in /etc/group"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_id_and_group() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(group_id("root").ok(), Some(0));
        assert!(group_id("no-such-group-pbxmail").is_err());
    }
}
