//! sendmail for a PBX process outside the pbxmail group, as the packages
//! install it: the binary setgid to the mail group, the configuration
//! 0640 root:group, the spool 2770 group-writable. Needs root (CI runs as
//! root) for the setgid copy, a mount namespace and to switch users. The
//! group is an existing one without members (`spare_group`).

use crate::support::harness::{spare_group, wait_until};
use crate::support::smtp_server::{ServerOptions, TestServer};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const DAEMON_USER: &str = "daemon";
const SUBMITTER: &str = "nobody";

/// The mail group of this install: an existing group that lists no members
/// (none is added to /etc/group: no test writes outside its temp dir).
fn group() -> String {
    spare_group()
        .map(|(name, _)| name)
        .expect("a group in /etc/group that lists no members")
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn is_root() -> bool {
    String::from_utf8_lossy(&sh("id", &["-u"]).stdout).trim() == "0"
}

/// Runs `bin args` as `user` (primary group `group`, no supplementary groups).
fn as_user(user: &str, group: &str, bin: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", user, "--regid", group, "--clear-groups", "--"])
        .arg(bin)
        .args(args);
    run_with_stdin(cmd, stdin)
}

/// Like `as_user`, in a private mount namespace whose /etc is the host's with
/// `etc.upper` laid over it (overlayfs): there /etc/pbxmail/pbxmail.ini is
/// this test's file, and whatever the command writes under /etc lands in the
/// test's dir. The host's /etc is never written.
fn as_user_in(
    etc: &EtcOverlay,
    user: &str,
    group: &str,
    bin: &Path,
    args: &[&str],
    stdin: &[u8],
) -> Output {
    let script = "mount -t overlay pbxmail-test -o \"lowerdir=/etc,upperdir=$1,workdir=$2\" /etc \
                    || { echo 'cannot lay an overlay over /etc' >&2; exit 90; }\n\
                  user=$3 group=$4 bin=$5\n\
                  shift 5\n\
                  exec setpriv --reuid \"$user\" --regid \"$group\" --clear-groups -- \"$bin\" \"$@\"";
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(script)
        .arg("sh")
        .arg(&etc.upper)
        .arg(&etc.work)
        .args([user, group])
        .arg(bin)
        .args(args);
    let out = run_with_stdin(cmd, stdin);
    assert_ne!(
        out.status.code(),
        Some(90),
        "this test needs a private mount namespace with overlayfs over /etc (run as root): {out:?}"
    );
    out
}

/// Spawns `cmd` without `PBXMAIL_CONFIG`, feeds it `stdin`, returns its output.
fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .env_remove("PBXMAIL_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    use std::io::Write;
    // A command that exits before reading (the overlay refused, a config
    // error) closes the pipe: its exit code and stderr, which the callers
    // assert on, say why, so a broken pipe here is not the failure to report.
    let written = child.stdin.take().expect("stdin").write_all(stdin);
    let out = child.wait_with_output().expect("wait");
    if let Err(e) = written {
        assert!(
            !out.status.success(),
            "the command succeeded without reading its input ({e}): {out:?}"
        );
    }
    out
}

/// The test's layer over /etc (see `as_user_in`): `upper` holds
/// `pbxmail/pbxmail.ini`; `work` is overlayfs's scratch folder.
struct EtcOverlay {
    upper: PathBuf,
    work: PathBuf,
}

/// Puts a copy of `config` (0640 root:`group()`) at `pbxmail/pbxmail.ini` of a
/// new overlay layer in `dir`.
fn etc_overlay(dir: &Path, config: &Path) -> EtcOverlay {
    let upper = dir.join("etc-upper");
    let work = dir.join("etc-work");
    fs::create_dir_all(upper.join("pbxmail")).unwrap();
    fs::create_dir_all(&work).unwrap();
    fs::set_permissions(upper.join("pbxmail"), fs::Permissions::from_mode(0o755)).unwrap();
    let installed = upper.join("pbxmail").join("pbxmail.ini");
    fs::copy(config, &installed).unwrap();
    sh(
        "chown",
        &[&format!("root:{}", group()), installed.to_str().unwrap()],
    );
    fs::set_permissions(&installed, fs::Permissions::from_mode(0o640)).unwrap();
    EtcOverlay { upper, work }
}

struct Setup {
    dir: PathBuf,
    bin: PathBuf,
    sendmail: PathBuf,
    config: PathBuf,
    spool: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn setup(name: &str, server: &TestServer) -> Setup {
    assert!(
        is_root(),
        "this test installs a setgid binary and switches users: run it as root (CI does)"
    );
    // Under /var/tmp, not a temp dir mounted nosuid.
    let dir = PathBuf::from(format!(
        "/var/tmp/pbxmail-priv-{name}-{}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("pbxmail");
    fs::copy(env!("CARGO_BIN_EXE_pbxmail"), &bin).unwrap();
    sh(
        "chown",
        &[&format!("root:{}", group()), bin.to_str().unwrap()],
    );
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o2755)).unwrap();
    let sendmail = dir.join("sendmail");
    std::os::unix::fs::symlink(&bin, &sendmail).unwrap();

    let spool = dir.join("spool");
    fs::create_dir(&spool).unwrap();
    sh(
        "chown",
        &[&format!("root:{}", group()), spool.to_str().unwrap()],
    );
    fs::set_permissions(&spool, fs::Permissions::from_mode(0o2770)).unwrap();
    let config = dir.join("pbxmail.ini");
    fs::write(
        &config,
        format!(
            "[daemon]\nspool_dir = {}\ncontrol_socket = {}/control.sock\nhostname = pbx.test\nretry_min = 1s\n\
             [tenant:acme]\ndomains = acme.test\nrelay = 127.0.0.1:{}\ntls = none\n\
             password = not-for-nobody\nusername = u\nauth = none\n",
            spool.display(),
            spool.display(),
            server.port()
        ),
    )
    .unwrap();
    sh(
        "chown",
        &[&format!("root:{}", group()), config.to_str().unwrap()],
    );
    fs::set_permissions(&config, fs::Permissions::from_mode(0o640)).unwrap();
    Setup {
        dir,
        bin,
        sendmail,
        config,
        spool,
    }
}

#[test]
fn a_user_outside_the_group_submits_and_the_daemon_delivers() {
    let server = TestServer::start(ServerOptions::default(), None);
    let s = setup("submit", &server);
    let config = s.config.to_str().unwrap();
    // Choosing a config drops the group first (a setgid -C could otherwise
    // read any file the group may read), so nobody gets EX_CONFIG here.
    let out = as_user(
        SUBMITTER,
        "nogroup",
        &s.sendmail,
        &["-C", config, "-i", "a@example.com"],
        b"From: 101@acme.test\nSubject: from nobody\n\nhello\n",
    );
    // -C chooses a config: the group is dropped first, so nobody cannot read it.
    assert_eq!(
        out.status.code(),
        Some(78),
        "-C must not read a group-only file: {out:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not-for-nobody"));

    // The installed way: the default config path. A setgid run keeps the group
    // for it. The path is compiled in, so the commands that use it run in a
    // mount namespace where /etc/pbxmail/pbxmail.ini is this test's file.
    let etc = etc_overlay(&s.dir, &s.config);
    let out = as_user_in(
        &etc,
        SUBMITTER,
        "nogroup",
        &s.sendmail,
        &["-i", "a@example.com"],
        b"From: 101@acme.test\nSubject: from nobody\n\nhello\n",
    );
    assert_eq!(out.status.code(), Some(0), "sendmail as nobody: {out:?}");

    // Spooled 0660 in the group, owned by the submitter.
    let tenant_dir = s.spool.join("queue/acme");
    let entries: Vec<_> = fs::read_dir(&tenant_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    for path in &entries {
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{}", path.display());
    }

    // mailq keeps the group to list; other commands drop it.
    let out = as_user_in(&etc, SUBMITTER, "nogroup", &s.bin, &["queue"], b"");
    assert_eq!(out.status.code(), Some(0), "queue as nobody: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("101@acme.test"));
    let out = as_user_in(&etc, SUBMITTER, "nogroup", &s.bin, &["check-config"], b"");
    assert_eq!(
        out.status.code(),
        Some(78),
        "check-config as nobody must not read the config: {out:?}"
    );

    // The daemon as an unprivileged member of the group delivers it.
    let mut daemon = Command::new("setpriv")
        .args([
            "--reuid",
            DAEMON_USER,
            "--regid",
            &group(),
            "--clear-groups",
            "--",
        ])
        .arg(&s.bin)
        .args(["daemon", "-c", config])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let got = server.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "the daemon delivered nobody's message");
    assert!(wait_until(Duration::from_secs(5), || fs::read_dir(
        &tenant_dir
    )
    .map(|d| d.count() == 0)
    .unwrap_or(false)));
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
}
