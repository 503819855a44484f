//! Integration tests of the journal archive: the real daemon delivers to a
//! scripted relay on 127.0.0.1 with `archive = yes`, and the tests look at
//! what it left under `archive_dir` (Maildir files, modes, owners, the
//! hash-chained journal) and at what `pbxmail archive verify | usage | prune`
//! say about it, after tampering and after crashes.
//!
//! Ownership checks need root: the tests then hand the archive to an existing
//! group that lists no members (`spare_group`; none is added to /etc/group);
//! otherwise they say so and check modes only.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::harness::{
    files_under, framed, spare_group, str_of, wait_until, Daemon, Run, Running,
};
use crate::support::rng::Rng;
use crate::support::smtp_server::{Received, ServerOptions, TestServer};
use serde_json::Value;

/// The archive group the tests give the archiving tenant.
/// Upper bound for mail that should go out now; generous for a loaded CI box.
const ARRIVAL: Duration = Duration::from_secs(15);
/// The daemon's `hostname`: the last part of every archived file's name.
const HOSTNAME: &str = "pbx.test";
/// A recipient the relay refuses with 550, so that bounces are made.
const REFUSED: &str = "nobody@example.com";

/// The archive group's ID (`spare_group`) when running as root; None (with
/// a note) when not root, and ownership is then not checked.
fn archive_group() -> Option<u32> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("note: not root, so file ownership is not checked");
        return None;
    }
    let (_, gid) = spare_group().expect("a group in /etc/group that lists no members");
    Some(gid)
}

/// The name of the group `archive_group` returned the gid of.
fn group_name() -> String {
    spare_group()
        .map(|(name, _)| name)
        .expect("a group in /etc/group that lists no members")
}

/// The daemon's INI: this test's spool and archive, `tenants` after it.
fn write_config(d: &Daemon, tenants: &str) {
    let keys = format!(
        "archive_dir = {}\nhostname = {HOSTNAME}\nretry_max = 2s",
        archive_dir(d).display()
    );
    d.configure_with(&keys, tenants);
}

fn archive_dir(d: &Daemon) -> PathBuf {
    d.dir().join("archive")
}

/// A plain-SMTP tenant relaying to `server`; `extra` holds further keys.
fn tenant(name: &str, server: &TestServer, extra: &str) -> String {
    format!(
        "[tenant:{name}]\ndomains = {name}.test\nrelay = 127.0.0.1:{}\ntls = none\n\
         command_timeout = 10s\ndata_timeout = 10s\n{extra}\n",
        server.port()
    )
}

/// The archiving tenant's keys; `users` is the value of `archive_users`.
fn archiving(users: &str, group: Option<u32>) -> String {
    let group = match group {
        Some(_) => format!("archive_group = {}\n", group_name()),
        None => String::new(),
    };
    format!("archive = yes\narchive_users = {users}\n{group}")
}

/// A message with Message-ID `<tag@pbx.test>`; `tag` is also its subject.
fn message(from: &str, to: &[&str], tag: &str) -> Vec<u8> {
    format!(
        "From: {from}\nTo: {}\nSubject: {tag}\nMessage-ID: <{tag}@pbx.test>\n\n\
         Voicemail {tag} from {from}.\n.a line that needs dot-stuffing\n",
        to.join(", ")
    )
    .into_bytes()
}

/// `sendmail -i -f FROM TO...`, asserting exit 0 (durably spooled).
fn submit(d: &Daemon, from: &str, to: &[&str], tag: &str) {
    let mut args = vec!["-i", "-f", from];
    args.extend_from_slice(to);
    let run = d.sendmail(&args, &message(from, to, tag));
    assert_eq!(run.code, 0, "sendmail {tag}: {}", run.stderr);
}

/// `pbxmail archive ARGS... -c CONFIG`.
fn archive_cmd(d: &Daemon, args: &[&str]) -> Run {
    let config = d.config_path().to_string_lossy().into_owned();
    let mut full = vec!["archive"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-c", &config]);
    d.run(&full, b"")
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The Message-ID header's tag (`<tag@pbx.test>`) of a message's bytes.
fn tag_of(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let headers = text.split("\r\n\r\n").next()?;
    headers.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        (name.eq_ignore_ascii_case("Message-ID") && value.ends_with("@pbx.test>")).then(|| {
            value
                .trim_start_matches('<')
                .trim_end_matches("@pbx.test>")
                .to_string()
        })
    })
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The journal's records, parsed and with their framing checked.
fn journal(d: &Daemon, tenant: &str) -> Vec<Value> {
    let path = archive_dir(d).join(tenant).join("journal");
    let text = fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let (len, crc, json) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            assert_eq!(len, json.len().to_string(), "length field of {line:?}");
            assert_eq!(
                crc,
                format!("{:08x}", crc32c::crc32c(json.as_bytes())),
                "CRC32C field of {line:?}"
            );
            serde_json::from_str(json).unwrap_or_else(|e| panic!("record {line:?}: {e}"))
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Waits until the relay has `n` messages and the queue is empty.
fn wait_delivered(d: &Daemon, server: &TestServer, n: usize) -> Vec<Received> {
    let got = server.wait_for_messages(n, ARRIVAL);
    let left = d.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert_eq!(got.len(), n, "relay got {} of {n}: {got:#?}", got.len());
    assert!(left.is_empty(), "still queued: {left:#?}");
    got
}

// ---------------------------------------------------------------------------
// Required by the issue.
// ---------------------------------------------------------------------------

/// Two tenants, one archiving: the archive holds exactly the messages that
/// reached a recipient (and the bounces that were delivered), byte for byte
/// as the relay got them, per user, with the modes and group the design
/// gives them; `usage` adds up to the bytes on disk; `verify` passes.
#[test]
fn two_tenants_archive_exactly_the_delivered_mail_with_modes_and_usage() {
    let gid = archive_group();
    let server = TestServer::start(
        ServerOptions {
            rcpt_reply_for: vec![(REFUSED.into(), "550 5.1.1 no such user".into())],
            ..ServerOptions::default()
        },
        None,
    );
    let mut d = Daemon::bare("archive_two_tenants");
    write_config(
        &d,
        &format!(
            "{}{}",
            tenant("acme", &server, &archiving("*", gid)),
            tenant("beta", &server, "")
        ),
    );
    d.start();
    submit(&d, "101@acme.test", &["a@example.com"], "a1");
    submit(&d, "101@acme.test", &["b@example.com"], "a2");
    submit(&d, "102@acme.test", &["a@example.com"], "a3");
    // Reaches one of two recipients: archived, and its bounce (to 102) too.
    submit(&d, "102@acme.test", &["a@example.com", REFUSED], "a4");
    // Reaches nobody: not archived; its bounce to 103 is.
    submit(&d, "103@acme.test", &[REFUSED], "a5");
    submit(&d, "201@beta.test", &["a@example.com"], "b1");
    submit(&d, "202@beta.test", &["c@example.com"], "b2");
    // a1..a4, b1, b2 and two bounces.
    let got = wait_delivered(&d, &server, 8);
    let status = d.stop();
    assert!(status.success(), "daemon stop: {status}");

    // What acme's archive must hold: every message acme sent that arrived,
    // by user (the sender's local part; a bounce's recipient's).
    let mut expected: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for m in &got {
        let address = if m.mail_from.is_empty() {
            m.rcpt_to.first().cloned().unwrap_or_default()
        } else {
            m.mail_from.clone()
        };
        let Some((user, "acme.test")) = address.split_once('@') else {
            continue;
        };
        expected
            .entry(user.to_string())
            .or_default()
            .push(m.data.clone());
    }
    assert_eq!(
        expected.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["101", "102", "103"])
    );
    assert_eq!(expected["101"].len(), 2);
    assert_eq!(expected["102"].len(), 3, "a3, a4 and a4's bounce");
    assert_eq!(expected["103"].len(), 1, "only a5's bounce");
    // a4's bounce goes to 102 as well.
    let bounces_to_102 = got
        .iter()
        .filter(|m| m.mail_from.is_empty() && m.rcpt_to == ["102@acme.test"])
        .count();
    assert_eq!(bounces_to_102, 1);

    let root = archive_dir(&d);
    assert_eq!(
        names_in(&root),
        set(&["acme"]),
        "only the archiving tenant has a folder"
    );
    let acme = root.join("acme");
    assert_eq!(names_in(&acme), set(&["journal", "101", "102", "103"]));

    let mut on_disk_bytes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (user, messages) in &expected {
        let user_dir = acme.join(user);
        assert_eq!(names_in(&user_dir), set(&["tmp", "new", "cur"]), "{user}");
        assert!(names_in(&user_dir.join("tmp")).is_empty(), "{user}/tmp");
        assert!(names_in(&user_dir.join("cur")).is_empty(), "{user}/cur");
        let mut archived: Vec<Vec<u8>> = Vec::new();
        for name in names_in(&user_dir.join("new")) {
            let path = user_dir.join("new").join(&name);
            // QUEUEDSECS.PQUEUEID.HOSTNAME
            let parts: Vec<&str> = name.splitn(2, '.').collect();
            assert!(
                parts.len() == 2
                    && parts[0].parse::<u64>().is_ok()
                    && parts[1].starts_with('P')
                    && parts[1].ends_with(&format!(".{HOSTNAME}")),
                "Maildir name {name:?}"
            );
            let data = fs::read(&path).expect("read archived file");
            let sum = on_disk_bytes.entry(user.clone()).or_default();
            sum.0 += 1;
            sum.1 += data.len() as u64;
            archived.push(data);
        }
        let mut want = messages.clone();
        want.sort();
        archived.sort();
        assert!(
            archived == want,
            "{user}: archived files differ from what the relay received:\narchived: {:#?}\nrelay: {:#?}",
            archived.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect::<Vec<_>>(),
            want.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect::<Vec<_>>()
        );
    }
    let archived_tags: BTreeSet<String> = files_under(&acme)
        .iter()
        .filter(|p| p.parent().is_some_and(|p| p.ends_with("new")))
        .filter_map(|p| tag_of(&fs::read(p).ok()?))
        .filter(|tag| !tag.ends_with(".bounce"))
        .collect();
    assert_eq!(
        archived_tags,
        set(&["a1", "a2", "a3", "a4"]),
        "a5 reached nobody"
    );

    // Modes and group: folders 2750, files 0640, all in the archive group.
    let mut folders = vec![acme.clone()];
    for user in expected.keys() {
        folders.push(acme.join(user));
        for sub in ["tmp", "new", "cur"] {
            folders.push(acme.join(user).join(sub));
        }
    }
    for folder in &folders {
        assert_eq!(mode(folder), 0o2750, "{}", folder.display());
    }
    let files = files_under(&acme);
    assert_eq!(files.len(), 7, "journal and six messages: {files:#?}");
    for file in &files {
        assert_eq!(mode(file), 0o640, "{}", file.display());
    }
    if let Some(gid) = gid {
        for path in folders.iter().chain(&files) {
            let meta = fs::metadata(path).expect("stat");
            assert_eq!(meta.gid(), gid, "group of {}", path.display());
        }
    }

    // The journal: one record per file, chained, naming the right file.
    let records = journal(&d, "acme");
    assert_eq!(records.len(), 6, "{records:#?}");
    let mut prev = "0".repeat(64);
    for (n, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], n as u64 + 1);
        assert_eq!(str_of(r, "type"), "archived");
        assert_eq!(str_of(r, "prev"), prev, "chain at record {}", n + 1);
        prev = str_of(r, "hash").to_string();
        let file = acme.join(str_of(r, "file"));
        let data = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(r["size"], data.len() as u64);
        assert_eq!(str_of(r, "sha256"), sha256_hex(&data));
        assert!(str_of(r, "file").starts_with(&format!("{}/new/", str_of(r, "user"))));
        assert!(str_of(r, "file").contains(&format!(".P{}.", str_of(r, "queue_id"))));
        if let Some(tag) = tag_of(&data) {
            assert_eq!(str_of(r, "message_id"), format!("<{tag}@pbx.test>"));
        }
    }

    // Usage: per user and month, the bytes on disk; the total adds up.
    let run = archive_cmd(&d, &["usage", "--format", "json"]);
    assert_eq!(run.code, 0, "usage: {}", run.stderr);
    let usage: Value = serde_json::from_str(&run.stdout).expect("usage JSON");
    let rows = usage["usage"].as_array().expect("usage rows");
    let from_usage: BTreeMap<String, (u64, u64)> = rows
        .iter()
        .map(|r| {
            assert_eq!(str_of(r, "tenant"), "acme", "beta archives nothing: {r}");
            (
                str_of(r, "user").to_string(),
                (
                    r["messages"].as_u64().unwrap_or(0),
                    r["bytes"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect();
    assert_eq!(from_usage, on_disk_bytes);
    let total_bytes: u64 = on_disk_bytes.values().map(|v| v.1).sum();
    assert_eq!(usage["total"]["messages"], 6);
    assert_eq!(usage["total"]["bytes"], total_bytes);
    let run = archive_cmd(&d, &["usage"]);
    assert_eq!(run.code, 0, "usage csv: {}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"tenant,month,user,messages,bytes"));
    assert_eq!(
        lines.last().copied(),
        Some(format!("TOTAL,,,6,{total_bytes}").as_str())
    );
    assert_eq!(lines.len(), 2 + on_disk_bytes.len(), "{}", run.stdout);
    let run = archive_cmd(&d, &["usage", "--tenant", "beta", "--format", "json"]);
    assert_eq!(run.code, 0, "usage beta: {}", run.stderr);
    let beta: Value = serde_json::from_str(&run.stdout).expect("usage JSON");
    assert_eq!(beta["total"]["messages"], 0, "{beta}");

    let run = archive_cmd(&d, &["verify"]);
    assert_eq!(
        (run.code, run.stdout.trim()),
        (0, "acme: ok"),
        "{}",
        run.stderr
    );
}

/// `verify` passes on an intact archive, then fails, naming the message,
/// after each of: one byte changed, a file deleted, a file added, a journal
/// record removed (the middle one and the last one); and it passes again
/// once each is undone. Also: `archive_users` limits whose mail is kept,
/// records moved, altered or damaged are named, and `prune` is journaled.
#[test]
fn verify_names_the_message_after_each_kind_of_tampering() {
    let gid = archive_group();
    let server = TestServer::start(ServerOptions::default(), None);
    let mut d = Daemon::bare("archive_verify");
    write_config(&d, &tenant("acme", &server, &archiving("101, 102", gid)));
    d.start();
    submit(&d, "101@acme.test", &["a@example.com"], "v1");
    submit(&d, "102@acme.test", &["a@example.com"], "v2");
    submit(&d, "101@acme.test", &["b@example.com"], "v3");
    submit(&d, "103@acme.test", &["a@example.com"], "v4");
    wait_delivered(&d, &server, 4);
    let status = d.stop();
    assert!(status.success(), "daemon stop: {status}");

    let acme = archive_dir(&d).join("acme");
    assert_eq!(
        names_in(&acme),
        set(&["journal", "101", "102"]),
        "103 is not in archive_users"
    );
    let records = journal(&d, "acme");
    assert_eq!(records.len(), 3, "{records:#?}");
    let file_of = |n: usize| str_of(&records[n], "file").to_string();
    let mid_of = |n: usize| str_of(&records[n], "message_id").to_string();
    let journal_path = acme.join("journal");
    let journal_text = fs::read_to_string(&journal_path).expect("read journal");
    let journal_lines: Vec<&str> = journal_text.lines().collect();

    let verify_ok = |when: &str| {
        let run = archive_cmd(&d, &["verify", "--tenant", "acme"]);
        assert_eq!(
            (run.code, run.stdout.trim()),
            (0, "acme: ok"),
            "{when}: {}",
            run.stderr
        );
    };
    // Exit 1, a line `acme: PROBLEM: ...` naming each of `names`, and the
    // same finding in --json.
    let verify_fails = |when: &str, problem: &str, json_problem: &str, names: &[&str]| {
        let run = archive_cmd(&d, &["verify", "--tenant", "acme"]);
        assert_eq!(
            run.code, 1,
            "{when}: exit code; {}{}",
            run.stdout, run.stderr
        );
        let prefix = format!("acme: {problem}: ");
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{when}: no {problem} line in {:?}", run.stdout));
        for name in names {
            assert!(line.contains(name), "{when}: {line:?} does not name {name}");
        }
        let run = archive_cmd(&d, &["verify", "--tenant", "acme", "--json"]);
        assert_eq!(run.code, 1, "{when}: --json exit code");
        let report: Value = serde_json::from_str(&run.stdout).expect("verify --json");
        assert_eq!(report[0]["tenant"], "acme");
        let findings = report[0]["findings"].as_array().expect("findings");
        assert!(
            findings.iter().any(|f| str_of(f, "problem") == json_problem
                && names.iter().all(|n| str_of(f, "what").contains(n))),
            "{when}: --json lacks {json_problem} naming {names:?}: {report}"
        );
        run.stdout
    };
    verify_ok("intact");

    // One byte changed.
    let victim = acme.join(file_of(1));
    let original = fs::read(&victim).expect("read");
    let mut changed = original.clone();
    let last = changed.len() - 3;
    changed[last] ^= 0x01;
    // The file is 0640 and the test may not be root: make it writable first.
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::write(&victim, &changed).expect("change a byte");
    verify_fails(
        "byte changed",
        "Modified",
        "modified",
        &[&file_of(1), &mid_of(1)],
    );
    fs::write(&victim, &original).expect("restore");
    verify_ok("byte restored");

    // A file deleted.
    let victim = acme.join(file_of(0));
    let original = fs::read(&victim).expect("read");
    fs::remove_file(&victim).expect("delete");
    verify_fails(
        "file deleted",
        "Deleted",
        "deleted",
        &[&file_of(0), &mid_of(0)],
    );
    fs::write(&victim, &original).expect("restore");
    verify_ok("file restored");

    // A file added (a forged "archived" message).
    let forged = acme.join("102/new/1700000000.Pforged.pbx.test");
    fs::write(
        &forged,
        message("102@acme.test", &["x@example.com"], "forged"),
    )
    .expect("add");
    verify_fails(
        "file added",
        "Added",
        "added",
        &["102/new/1700000000.Pforged.pbx.test"],
    );
    fs::remove_file(&forged).expect("remove");
    verify_ok("added file removed");

    // A journal record removed: the middle one (the chain breaks, and its
    // file is no longer accounted for), then the last one (only the file shows).
    let without = |skip: usize| -> String {
        journal_lines
            .iter()
            .enumerate()
            .filter(|(n, _)| *n != skip)
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    };
    fs::write(&journal_path, without(1)).expect("remove record 2");
    verify_fails(
        "record 2 removed",
        "RemovedRecord",
        "removed_record",
        &["record 3"],
    );
    verify_fails("record 2 removed", "Added", "added", &[&file_of(1)]);
    fs::write(&journal_path, without(2)).expect("remove record 3");
    verify_fails("record 3 removed", "Added", "added", &[&file_of(2)]);
    fs::write(&journal_path, &journal_text).expect("restore journal");
    verify_ok("journal restored");

    // Records swapped.
    let swapped = format!(
        "{}\n{}\n{}\n",
        journal_lines[0], journal_lines[2], journal_lines[1]
    );
    fs::write(&journal_path, swapped).expect("swap");
    verify_fails("records swapped", "Reordered", "reordered", &["record 2"]);
    // A record altered and re-framed (valid CRC, wrong hash).
    let mut altered: Value =
        serde_json::from_str(journal_lines[1].splitn(3, ' ').nth(2).expect("json part"))
            .expect("record json");
    altered["size"] = Value::from(1);
    let text = format!(
        "{}\n{}{}\n",
        journal_lines[0],
        framed(&altered),
        journal_lines[2]
    );
    fs::write(&journal_path, text).expect("alter");
    verify_fails(
        "record altered",
        "ChangedRecord",
        "changed_record",
        &["record 2"],
    );
    // A record damaged (its CRC no longer matches).
    let damaged = journal_text.replacen("\"user\":\"102\"", "\"user\":\"10X\"", 1);
    assert_ne!(damaged, journal_text);
    fs::write(&journal_path, damaged).expect("damage");
    verify_fails(
        "record damaged",
        "DamagedRecord",
        "damaged_record",
        &["journal line 2"],
    );
    fs::write(&journal_path, &journal_text).expect("restore journal");
    verify_ok("journal restored again");

    // Prune: nothing before 2000; everything before 2100, journaled; verify passes.
    let run = archive_cmd(&d, &["prune", "--tenant", "acme", "--before", "2000-01-01"]);
    assert_eq!(run.code, 0, "prune: {}", run.stderr);
    assert_eq!(
        journal(&d, "acme").len(),
        3,
        "nothing pruned, nothing journaled"
    );
    let run = archive_cmd(&d, &["prune", "--tenant", "acme", "--before", "2100-01-01"]);
    assert_eq!(run.code, 0, "prune: {}", run.stderr);
    // Who ran it is journaled, and the one summary line says so.
    let uid = fs::metadata("/proc/self").expect("stat /proc/self").uid();
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert!(
        run.stdout.starts_with(
            "acme: pruned 3 messages archived before 2100-01-01, journal record 4, by uid "
        ) && run.stdout.contains(&format!("by uid {uid}")),
        "{}",
        run.stdout
    );
    let records = journal(&d, "acme");
    assert_eq!(records.len(), 4);
    assert_eq!(str_of(&records[3], "type"), "pruned");
    assert_eq!(records[3]["uid"], uid, "{}", records[3]);
    let mut seqs: Vec<u64> = records[3]["seqs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3]);
    let left: Vec<PathBuf> = files_under(&acme)
        .into_iter()
        .filter(|p| !p.ends_with("journal"))
        .collect();
    assert!(left.is_empty(), "pruned files remain: {left:#?}");
    verify_ok("after prune");
}

/// `usage --month` takes YYYY-MM only: anything else is exit 64 naming the
/// form, not an empty report that reads as "nothing archived".
#[test]
fn usage_refuses_a_month_that_is_not_yyyy_mm() {
    let server = TestServer::start(ServerOptions::default(), None);
    let d = Daemon::bare("archive_usage_month");
    write_config(&d, &tenant("acme", &server, &archiving("*", None)));
    for bad in [
        "garbage",
        "2026-13",
        "2026-00",
        "2026-1",
        "26-11",
        "2026-11-01",
        "",
    ] {
        let run = archive_cmd(&d, &["usage", "--month", bad]);
        assert_eq!(
            run.code, 64,
            "--month {bad:?}: {}{}",
            run.stdout, run.stderr
        );
        assert!(run.stdout.is_empty(), "--month {bad:?}: {}", run.stdout);
        assert!(
            run.stderr.contains("YYYY-MM"),
            "--month {bad:?}: {}",
            run.stderr
        );
    }
    let run = archive_cmd(&d, &["usage", "--month", "2026-11"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout, "tenant,month,user,messages,bytes\nTOTAL,,,0,0\n",
        "nothing archived yet"
    );
}

/// The crash window between journaling and removing the spool entry (and
/// the one between the file landing in new/ and its record), built exactly:
/// the delivered, archived message's spool entry is put back with its
/// recipient recorded as sent, and the daemon restarts. Exactly one file
/// and one record, and the relay does not get it again.
#[test]
fn crash_between_journaling_and_spool_removal_leaves_one_archived_copy() {
    let server = TestServer::start(ServerOptions::default(), None);
    let mut d = Daemon::bare("archive_crash_window");
    write_config(&d, &tenant("acme", &server, &archiving("*", None)));
    let queue = d.spool_dir().join("queue").join("acme");
    let saved = d.dir().join("saved");
    fs::create_dir_all(&saved).expect("mkdir saved");
    let acme = archive_dir(&d).join("acme");
    let journal_path = acme.join("journal");

    for (round, tag) in ["w1", "w2"].iter().enumerate() {
        submit(&d, "101@acme.test", &["a@example.com"], tag);
        // The entry as queued, before the daemon touches it.
        let entry: Vec<PathBuf> = files_under(&queue);
        assert_eq!(entry.len(), 2, "{entry:#?}");
        for f in &entry {
            fs::copy(f, saved.join(f.file_name().expect("name"))).expect("save entry");
        }
        let journal_before = fs::read(&journal_path).unwrap_or_default();
        d.start();
        wait_delivered(&d, &server, round + 1);
        assert!(d.stop().success());
        assert!(files_under(&queue).is_empty());
        if round == 1 {
            // Second window: the file is in new/, its record not yet written.
            fs::write(&journal_path, &journal_before).expect("drop the last record");
        }
        // Back to "relay took it, archived, spool entry still there".
        for f in &entry {
            fs::copy(saved.join(f.file_name().expect("name")), f).expect("restore entry");
        }
        let env = entry
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "env"))
            .expect("envelope");
        let sent = serde_json::json!({
            "type": "attempt",
            "at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "results": [{"rcpt": 0, "status": "sent", "reply": "250 2.0.0 Ok"}],
            "next_attempt_ms": null,
            "error": null,
        });
        let mut f = File::options().append(true).open(env).expect("open env");
        f.write_all(framed(&sent).as_bytes()).expect("append sent");
        f.sync_all().expect("fsync");
        drop(f);

        d.start();
        let left = d.wait_for_queue(ARRIVAL, |q| q.is_empty());
        assert!(d.stop().success());
        assert!(left.is_empty(), "round {round}: still queued: {left:#?}");
        assert_eq!(server.messages().len(), round + 1, "sent again");
        let records = journal(&d, "acme");
        assert_eq!(records.len(), round + 1, "round {round}: {records:#?}");
        let files = files_under(&acme.join("101"));
        assert_eq!(files.len(), round + 1, "round {round}: {files:#?}");
        let ids: BTreeSet<&str> = records.iter().map(|r| str_of(r, "queue_id")).collect();
        assert_eq!(
            ids.len(),
            round + 1,
            "a queue ID journaled twice: {records:#?}"
        );
        let run = archive_cmd(&d, &["verify"]);
        assert_eq!(
            (run.code, run.stdout.trim()),
            (0, "acme: ok"),
            "{}",
            run.stderr
        );
    }
}

/// SIGKILL at random moments while archived mail goes out (20 kills, every
/// other one aimed at the moment the journal grows), then an undisturbed run: every message the relay got is in the journal
/// exactly once, with exactly one Maildir file, and `verify` passes.
#[test]
fn daemon_killed_at_random_moments_archives_each_message_once() {
    const KILLS: usize = 20;
    let server = TestServer::start(ServerOptions::default(), None);
    let mut d = Daemon::bare("archive_crash_kill");
    write_config(
        &d,
        &tenant(
            "acme",
            &server,
            &format!("messages_per_session = 3\n{}", archiving("*", None)),
        ),
    );
    let mut rng = Rng::from_env("daemon_killed_at_random_moments_archives_each_message_once");
    let mut below = |n: u64| rng.below(n);
    let queue = d.spool_dir().join("queue").join("acme");
    let journal_path = archive_dir(&d).join("acme").join("journal");
    let mut next = 0;
    let mut windows_seen = 0;
    for kill in 0..KILLS {
        for _ in 0..1 + below(5) {
            let user = if next % 2 == 0 { "101" } else { "102" };
            submit(
                &d,
                &format!("{user}@acme.test"),
                &["a@example.com"],
                &format!("k{next}"),
            );
            next += 1;
        }
        let journal_before = fs::metadata(&journal_path).map_or(0, |m| m.len());
        let _ = fs::remove_file(d.spool_dir().join("pickup.sock"));
        // Odd kills aim at the window; the daemon holds each journaled
        // message in the spool a moment so that the aim can land.
        let mut daemon = if kill % 2 == 0 {
            Running::start(&d)
        } else {
            Running::start_with_env(&d, &[("PBXMAIL_DEBUG_JOURNALED_PAUSE_MS", "50")])
        };
        if kill % 2 == 0 {
            thread::sleep(Duration::from_millis(below(200)));
        } else {
            // Aim at the window: kill as soon as the journal has grown, while
            // the daemon syncs the record and before it removes the spool entry.
            let deadline = Instant::now() + ARRIVAL;
            while fs::metadata(&journal_path).map_or(0, |m| m.len()) == journal_before
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_micros(20));
            }
        }
        let status = daemon.kill9();
        assert_eq!(
            status.signal(),
            Some(9),
            "the daemon ended before it was killed ({status})"
        );
        // The window this test is about: journaled, spool entry still there.
        let journaled = fs::read_to_string(&journal_path).unwrap_or_default();
        windows_seen += names_in(&queue)
            .iter()
            .filter_map(|n| n.strip_suffix(".env"))
            .filter(|id| journaled.contains(&format!("\"queue_id\":\"{id}\"")))
            .count();
    }
    // The window this test is about was hit, judged by what the kills left:
    // a message in the journal whose spool entry was still there.
    assert!(
        windows_seen > 0,
        "no kill landed between journaling a message and removing its spool entry"
    );
    let _ = fs::remove_file(d.spool_dir().join("pickup.sock"));
    d.start();
    let left = d.wait_for_queue(Duration::from_secs(60), |q| q.is_empty());
    assert!(d.stop().success());
    assert!(left.is_empty(), "still queued: {left:#?}");
    eprintln!(
        "archive kill test: {next} messages, {KILLS} kills, {windows_seen} kills left a journaled message in the spool, relay got {}",
        server.messages().len()
    );

    let sent: BTreeSet<String> = server
        .messages()
        .iter()
        .filter_map(|m| tag_of(&m.data))
        .collect();
    assert_eq!(sent.len(), next, "every message reached the relay");
    let records = journal(&d, "acme");
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_tag: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *per_id.entry(str_of(r, "queue_id").to_string()).or_default() += 1;
        let tag = str_of(r, "message_id")
            .trim_start_matches('<')
            .trim_end_matches("@pbx.test>");
        *per_tag.entry(tag.to_string()).or_default() += 1;
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "queue IDs journaled more than once: {twice:?}"
    );
    assert_eq!(
        per_tag.keys().cloned().collect::<BTreeSet<_>>(),
        sent,
        "journal vs relay"
    );
    assert!(per_tag.values().all(|n| *n == 1), "{per_tag:?}");
    let files: Vec<PathBuf> = files_under(&archive_dir(&d).join("acme"))
        .into_iter()
        .filter(|p| !p.ends_with("journal"))
        .collect();
    let in_tmp: Vec<_> = files
        .iter()
        .filter(|p| p.parent().is_some_and(|p| p.ends_with("tmp")))
        .collect();
    assert!(in_tmp.is_empty(), "left in tmp/: {in_tmp:#?}");
    assert_eq!(
        files.len(),
        records.len(),
        "one Maildir file per record: {files:#?}"
    );
    for id in per_id.keys() {
        let matching = files
            .iter()
            .filter(|p| p.to_string_lossy().contains(&format!(".P{id}.")))
            .count();
        assert_eq!(matching, 1, "files for queue ID {id}");
    }
    let run = archive_cmd(&d, &["verify"]);
    assert_eq!(
        (run.code, run.stdout.trim()),
        (0, "acme: ok"),
        "{}",
        run.stderr
    );
}

/// The archive cannot be written (its folder is in the way): the delivered
/// message stays in the spool, `status` says why, and once the folder can be
/// written it is archived exactly once and leaves the spool.
#[test]
fn unwritable_archive_keeps_the_message_and_status_says_why() {
    let server = TestServer::start(ServerOptions::default(), None);
    let d = Daemon::bare("archive_unwritable");
    write_config(&d, &tenant("acme", &server, &archiving("*", None)));
    // A file where the archive's folder should be: even root cannot write there.
    fs::write(archive_dir(&d), "not a folder").expect("block the archive folder");
    let _running = Running::start(&d);
    submit(&d, "101@acme.test", &["a@example.com"], "blocked");
    assert_eq!(server.wait_for_messages(1, ARRIVAL).len(), 1);

    let status = || {
        let run = d.run(&["status", "--json"], b"");
        let parsed: Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        parsed["tenants"][0].clone()
    };
    let mut acme = Value::Null;
    let told = wait_until(ARRIVAL, || {
        acme = status();
        str_of(&acme, "last_error").contains("cannot archive")
    });
    assert!(told, "status: {acme:#}");
    let spooled = fs::read_dir(d.spool_dir().join("queue").join("acme"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert!(spooled > 0, "the unarchived message left the spool");

    fs::remove_file(archive_dir(&d)).expect("unblock");
    let left = d.wait_for_queue(ARRIVAL, |q| q.is_empty());
    assert!(left.is_empty(), "{left:#?}");
    let emptied = wait_until(ARRIVAL, || {
        fs::read_dir(d.spool_dir().join("queue").join("acme"))
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(true)
    });
    assert!(emptied, "archived, yet still in the spool");
    let records = journal(&d, "acme");
    let archived = records
        .iter()
        .filter(|r| str_of(r, "type") == "archived")
        .count();
    assert_eq!(archived, 1, "{records:#?}");
    assert_eq!(server.messages().len(), 1, "delivered once, not again");
}
