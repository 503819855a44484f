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
    let orphan = spool
        .tenant_dir(&TenantName::parse("acme").unwrap())
        .join("0000BEEF.msg");
    fs::write(&orphan, b"orphan").unwrap();

    assert_eq!(spool.remove_abandoned().unwrap(), 2);
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
