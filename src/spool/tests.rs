//! The spool's tests across its modules: a message's whole life, torn
//! appends, dropped submissions, quarantine and recovery.

use super::envelope::{self, RcptResult, RcptStatus, Record};
use super::layout::list_dir;
use super::*;
use crate::base::names::TenantName;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};

fn temp_spool(name: &str) -> Spool {
    let dir = std::env::temp_dir().join(format!("pbxmail-spool-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let spool = Spool::new(&dir);
    spool.create_layout().unwrap();
    spool
}

#[test]
fn commit_then_load_round_trips() {
    let spool = temp_spool("roundtrip");
    let mut sub = spool.begin_submission().unwrap();
    sub.write_all(b"Subject: hi\r\n\r\nbody\r\n").unwrap();
    let id = sub
        .commit(
            &TenantName::parse("acme").unwrap(),
            "101@acme.example",
            &["a@x.example".into()],
        )
        .unwrap();
    assert_eq!(
        spool
            .message_ids(&TenantName::parse("acme").unwrap())
            .unwrap(),
        vec![id.clone()]
    );
    let env = spool
        .load_envelope(&TenantName::parse("acme").unwrap(), &id)
        .unwrap();
    assert_eq!(env.size, b"Subject: hi\r\n\r\nbody\r\n".len() as u64);
    let mut msg = spool
        .open_message(&TenantName::parse("acme").unwrap(), &id)
        .unwrap();
    assert_eq!(scan_message(&mut msg).unwrap().sha256, env.sha256);
    assert!(list_dir(&spool.tmp_dir()).unwrap().is_empty());

    spool
        .append(
            &TenantName::parse("acme").unwrap(),
            &id,
            &Record::Attempt {
                at_ms: 1,
                results: vec![RcptResult {
                    rcpt: 0,
                    status: RcptStatus::Sent,
                    reply: "250".into(),
                }],
                next_attempt_ms: None,
                error: None,
            },
        )
        .unwrap();
    assert!(spool
        .load_envelope(&TenantName::parse("acme").unwrap(), &id)
        .unwrap()
        .is_done());
    spool
        .remove(&TenantName::parse("acme").unwrap(), &id)
        .unwrap();
    assert!(spool
        .message_ids(&TenantName::parse("acme").unwrap())
        .unwrap()
        .is_empty());
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn append_after_a_torn_tail_cuts_it_first() {
    let spool = temp_spool("torn");
    let mut sub = spool.begin_submission().unwrap();
    sub.write_all(b"x\r\n").unwrap();
    let id = sub
        .commit(
            &TenantName::parse("acme").unwrap(),
            "a@acme.example",
            &["b@x.example".into()],
        )
        .unwrap();
    let env_path = spool.envelope_path(&TenantName::parse("acme").unwrap(), &id);
    let mut f = OpenOptions::new().append(true).open(&env_path).unwrap();
    f.write_all(b"57 0badc0de {\"type\":\"attem").unwrap();
    drop(f);
    let sent = Record::Attempt {
        at_ms: 1,
        results: vec![envelope::RcptResult {
            rcpt: 0,
            status: envelope::RcptStatus::Sent,
            reply: "250".into(),
        }],
        next_attempt_ms: None,
        error: None,
    };
    spool
        .append(&TenantName::parse("acme").unwrap(), &id, &sent)
        .unwrap();
    assert!(spool
        .load_envelope(&TenantName::parse("acme").unwrap(), &id)
        .unwrap()
        .is_done());
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn dropped_submission_leaves_nothing() {
    let spool = temp_spool("drop");
    let mut sub = spool.begin_submission().unwrap();
    sub.write_all(b"partial").unwrap();
    drop(sub);
    assert!(list_dir(&spool.tmp_dir()).unwrap().is_empty());
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn quarantine_keeps_files_and_reason() {
    let spool = temp_spool("quarantine");
    let mut sub = spool.begin_submission().unwrap();
    sub.write_all(b"x\r\n").unwrap();
    let id = sub
        .commit(
            &TenantName::parse("acme").unwrap(),
            "a@acme.example",
            &["b@x.example".into()],
        )
        .unwrap();
    spool
        .quarantine(
            &TenantName::parse("acme").unwrap(),
            &id,
            "checksum mismatch",
        )
        .unwrap();
    assert!(spool
        .message_ids(&TenantName::parse("acme").unwrap())
        .unwrap()
        .is_empty());
    let mut reason = String::new();
    File::open(spool.quarantine_dir().join(format!("acme-{id}.reason")))
        .unwrap()
        .read_to_string(&mut reason)
        .unwrap();
    assert!(reason.contains("checksum"));
    assert!(spool
        .quarantine_dir()
        .join(format!("acme-{id}.msg"))
        .exists());
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn recovery_spares_a_live_submission_and_removes_abandoned_files() {
    let spool = temp_spool("recovery");
    let mut live = spool.begin_submission().unwrap();
    live.write_all(b"still being written").unwrap();
    live.flush().unwrap();
    // A dead submitter's leftovers: no lock held on them.
    let dead = spool.tmp_dir().join("0000DEAD.msg");
    fs::write(&dead, b"partial").unwrap();
    fs::create_dir_all(spool.tenant_dir(&TenantName::parse("acme").unwrap())).unwrap();
    // One that died between its two renames: .msg queued, .env still in tmp/.
    let orphan = spool
        .tenant_dir(&TenantName::parse("acme").unwrap())
        .join("0000BEEF.msg");
    fs::write(&orphan, b"orphan").unwrap();
    write_created(&spool.tmp_dir().join("0000BEEF.env"), "acme");

    assert_eq!(spool.remove_abandoned().unwrap(), 2);
    assert!(!orphan.exists());
    assert_eq!(
        list_dir(&spool.tmp_dir()).unwrap().len(),
        1,
        "the live submission is kept"
    );
    let id = live
        .commit(
            &TenantName::parse("acme").unwrap(),
            "a@acme.example",
            &["b@x.example".into()],
        )
        .unwrap();
    assert_eq!(
        spool
            .message_ids(&TenantName::parse("acme").unwrap())
            .unwrap(),
        vec![id]
    );
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn strays_are_listed_and_quarantined_with_their_reason() {
    let spool = temp_spool("strays");
    let mut sub = spool.begin_submission().unwrap();
    sub.write_all(b"x\r\n").unwrap();
    let id = sub
        .commit(
            &TenantName::parse("acme-eu").unwrap(),
            "a@acme.example",
            &["b@x.example".into()],
        )
        .unwrap();
    let junk = spool
        .tenant_dir(&TenantName::parse("acme-eu").unwrap())
        .join("core-dump.1");
    fs::write(&junk, b"garbage").unwrap();

    assert_eq!(
        spool
            .stray_files(&TenantName::parse("acme-eu").unwrap())
            .unwrap(),
        vec![junk.clone()]
    );
    spool
        .quarantine_stray(
            &TenantName::parse("acme-eu").unwrap(),
            &junk,
            "not a spool file",
        )
        .unwrap();
    spool
        .quarantine(
            &TenantName::parse("acme-eu").unwrap(),
            &id,
            "checksum mismatch",
        )
        .unwrap();
    let listed: Vec<(String, String)> = spool
        .quarantined()
        .unwrap()
        .into_iter()
        .map(|q| (q.tenant, q.id))
        .collect();
    assert!(
        listed.contains(&("acme-eu".into(), "stray.core-dump.1".into())),
        "{listed:?}"
    );
    assert!(
        listed.contains(&("acme-eu".into(), id.to_string())),
        "{listed:?}"
    );
    let _ = fs::remove_dir_all(spool.root());
}

fn acme() -> TenantName {
    TenantName::parse("acme").unwrap()
}

/// A first envelope record naming `tenant`, as a submitter writes to tmp/.
fn write_created(path: &std::path::Path, tenant: &str) {
    let mut file = File::create(path).unwrap();
    let record = Record::Created {
        version: envelope::FORMAT_VERSION,
        tenant: tenant.into(),
        sender: "a@acme.example".into(),
        recipients: vec!["b@x.example".into()],
        queued_at_ms: 1,
        size: 3,
        sha256: String::new(),
        bounce: None,
    };
    envelope::write_record(&mut file, &record).unwrap();
}

fn committed(spool: &Spool) -> MessageId {
    let mut sub = spool.begin_submission().unwrap();
    sub.write_all(b"x\r\n").unwrap();
    sub.commit(&acme(), "a@acme.example", &["b@x.example".into()])
        .unwrap()
}

#[test]
fn only_bad_content_is_damage_every_io_error_is_for_later() {
    let path = std::path::PathBuf::from("/spool/queue/acme/X.env");
    let corrupt = SpoolError::Envelope {
        path: path.clone(),
        source: envelope::EnvelopeError::Corrupt("record 2: bad CRC".into()),
    };
    assert!(corrupt.is_damage());
    assert!(!corrupt.is_not_found());
    for errno in [
        rustix::io::Errno::MFILE,
        rustix::io::Errno::NFILE,
        rustix::io::Errno::NOMEM,
        rustix::io::Errno::AGAIN,
        rustix::io::Errno::IO,
        rustix::io::Errno::ACCESS,
    ] {
        let e = || std::io::Error::from_raw_os_error(errno.raw_os_error());
        let opening = SpoolError::Io {
            path: path.clone(),
            source: e(),
        };
        let reading = SpoolError::Envelope {
            path: path.clone(),
            source: envelope::EnvelopeError::Io(e()),
        };
        for err in [opening, reading] {
            assert!(!err.is_damage(), "{err}");
            assert!(!err.is_not_found(), "{err}");
        }
    }
    let gone = SpoolError::Io {
        path,
        source: std::io::ErrorKind::NotFound.into(),
    };
    assert!(gone.is_not_found() && !gone.is_damage());
}

#[test]
fn a_message_whose_envelope_was_lost_after_commit_is_an_orphan_not_a_leftover() {
    let spool = temp_spool("orphan");
    let id = committed(&spool);
    fs::remove_file(spool.envelope_path(&acme(), &id)).unwrap();

    let found = spool.sweep_unpaired(&acme()).unwrap();
    assert_eq!(found.removed, 0);
    assert_eq!(found.orphans, vec![id.clone()]);
    assert_eq!(spool.remove_abandoned().unwrap(), 0, "start-up keeps it");
    assert!(spool.message_path(&acme(), &id).exists());

    spool
        .quarantine(&acme(), &id, recovery::ORPHAN_REASON)
        .unwrap();
    let listed = spool.quarantined().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id.to_string());
    assert_eq!(listed[0].reason, recovery::ORPHAN_REASON);
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn a_submitter_between_its_renames_is_spared_and_once_dead_swept() {
    let spool = temp_spool("between-renames");
    fs::create_dir_all(spool.tenant_dir(&acme())).unwrap();
    let msg = spool.tenant_dir(&acme()).join("0000CAFE.msg");
    let env = spool.tmp_dir().join("0000CAFE.env");
    fs::write(&msg, b"x\r\n").unwrap();
    write_created(&env, "acme");
    let holder = File::open(&msg).unwrap();
    holder.lock().unwrap();

    assert_eq!(spool.sweep_tmp().unwrap(), 0);
    let found = spool.sweep_unpaired(&acme()).unwrap();
    assert_eq!((found.removed, found.orphans.len()), (0, 0));
    assert!(
        msg.exists() && env.exists(),
        "a live submitter is not disturbed"
    );

    drop(holder); // killed before its second rename
    assert_eq!(spool.sweep_tmp().unwrap(), 1);
    assert!(!msg.exists() && !env.exists());
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn removal_passes_through_tmp_and_an_interrupted_one_is_finished_not_quarantined() {
    let spool = temp_spool("removal");
    let done = committed(&spool);
    spool.remove(&acme(), &done).unwrap();
    assert!(list_dir(&spool.tenant_dir(&acme())).unwrap().is_empty());
    assert!(list_dir(&spool.tmp_dir()).unwrap().is_empty());

    // A crash right after the envelope left the queue.
    let cut = committed(&spool);
    fs::rename(
        spool.envelope_path(&acme(), &cut),
        spool.tmp_dir().join(format!("{cut}.env")),
    )
    .unwrap();
    let found = spool.sweep_unpaired(&acme()).unwrap();
    assert_eq!((found.removed, found.orphans.len()), (1, 0));
    assert!(list_dir(&spool.tenant_dir(&acme())).unwrap().is_empty());
    assert!(list_dir(&spool.tmp_dir()).unwrap().is_empty());
    // And one whose message went too: the envelope left in tmp/ is swept.
    write_created(&spool.tmp_dir().join("0000F00D.env"), "acme");
    assert_eq!(spool.sweep_tmp().unwrap(), 1);
    assert!(list_dir(&spool.tmp_dir()).unwrap().is_empty());
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn quarantine_that_cannot_move_the_message_rolls_back() {
    let spool = temp_spool("quarantine-rollback");
    let id = committed(&spool);
    // Something in the way of the message's new name.
    let blocker = spool.quarantine_dir().join(format!("acme-{id}.msg"));
    fs::create_dir_all(blocker.join("full")).unwrap();

    assert!(spool.quarantine(&acme(), &id, "checksum mismatch").is_err());
    assert_eq!(spool.message_ids(&acme()).unwrap(), vec![id.clone()]);
    assert!(spool.message_path(&acme(), &id).exists());
    assert!(!spool
        .quarantine_dir()
        .join(format!("acme-{id}.env"))
        .exists());
    let _ = fs::remove_dir_all(spool.root());
}

#[test]
fn every_file_in_quarantine_is_listed_with_or_without_a_reason() {
    let spool = temp_spool("quarantine-list");
    let q = spool.quarantine_dir();
    fs::write(q.join("acme-0000AAAA.msg"), b"x").unwrap();
    fs::write(q.join("acme-0000AAAA.env"), b"x").unwrap();
    fs::write(q.join("acme-0000BBBB.msg"), b"x").unwrap();
    fs::write(q.join("acme-0000BBBB.reason"), b"first\nsecond\n").unwrap();
    fs::write(q.join("acme-stray.core.msg"), b"x").unwrap();
    fs::write(q.join("core.1234"), b"x").unwrap();
    // A note alone: its move never happened, the entry is still queued.
    fs::write(q.join("acme-0000CCCC.reason"), b"never moved\n").unwrap();

    let listed: Vec<(String, String, String)> = spool
        .quarantined()
        .unwrap()
        .into_iter()
        .map(|e| (e.tenant, e.id, e.reason))
        .collect();
    let no_reason = quarantine::NO_REASON.to_string();
    assert_eq!(
        listed,
        vec![
            ("".into(), "core.1234".into(), no_reason.clone()),
            ("acme".into(), "0000AAAA".into(), no_reason.clone()),
            ("acme".into(), "0000BBBB".into(), "first; second".into()),
            ("acme".into(), "stray.core.msg".into(), no_reason),
        ]
    );
    let _ = fs::remove_dir_all(spool.root());
}

/// A sweep lists `tmp/` and looks at each lone envelope later: a commit that
/// finished in between has moved its envelope into the queue, and its
/// message (lock now free, the submitter gone) is queued mail, never a
/// leftover to remove.
#[test]
fn a_commit_that_finished_after_the_sweeps_listing_is_left_alone() {
    let spool = temp_spool("sweep-after-commit");
    let tenant = TenantName::parse("acme").unwrap();
    let mut sub = spool.begin_submission().unwrap();
    sub.write_all(b"Subject: hi\r\n\r\nbody\r\n").unwrap();
    let id = sub
        .commit(&tenant, "101@acme.example", &["a@x.example".into()])
        .unwrap();
    // What the listing saw: tmp/ID.env, then gone by the time it is looked at.
    let listed = spool.tmp_dir().join(format!("{id}.env"));
    assert!(!spool.sweep_lone_envelope(&listed, &id));
    assert!(spool.message_path(&tenant, &id).exists());
    assert!(spool.envelope_path(&tenant, &id).exists());
    assert!(spool.load_envelope(&tenant, &id).is_ok());
}
