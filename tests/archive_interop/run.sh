#!/usr/bin/env bash
# `make archive-interop`: a real Dovecot (Debian's dovecot-imapd) serves
# pbxmail's journal archive over IMAP with the shipped configuration
# (packaging/dovecot/pbxmail-archive.conf and .acl), and Python's imaplib,
# logged in as the tenant's administrator, lists and fetches the archived
# messages and cannot delete, expunge or change them.
#
#  1. Installs dovecot-imapd and python3 from Debian's packages when missing
#     (as root; one apt-get update). Docker's policy-rc.d keeps the package's
#     own system instance from starting; a system instance elsewhere is left
#     alone (the private one below listens on a port of its own).
#  2. Creates, when missing, the group pbxtest-admins (the tenant's
#     archive_group) and the user pbxtest-imap (Dovecot's "pbxarchive"), and
#     removes what it created on exit.
#  3. Starts the test SMTP sink (target/debug/examples/smtp_sink) as the
#     relay and pbxmail's daemon with tenant acme archiving everyone; sends
#     mail from 101 and 102; waits (bounded) until all three are archived.
#  4. Starts a private Dovecot: its own base_dir, logs and state under the
#     work dir, IMAP on 127.0.0.1 and a free port, plaintext login allowed
#     (loopback, test only), plus the shipped snippet with its paths
#     substituted; the passwd-file made with `doveadm pw` as the README says.
#  5. helper.py runs the IMAP checks and prints PASS/FAIL per check; then the
#     archive must be byte for byte as before and `pbxmail archive verify`
#     must pass (Dovecot wrote nothing into it).
#  6. Stops what it started (by PID) on every exit; keeps the work dir on
#     failure or with ARCHIVE_INTEROP_KEEP=1.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/tests/archive_interop
PBXMAIL=$ROOT/target/debug/pbxmail
SINK=$ROOT/target/debug/examples/smtp_sink
GROUP=pbxtest-admins
IMAP_USER=pbxtest-imap
T0=$SECONDS

log() { printf '[archive-interop %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { echo "archive-interop: FAIL: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (packages, a group and a user, Dovecot's privilege drop)"

# ---------------------------------------------------------------------------
# 1. Packages
if [[ -x /usr/sbin/dovecot ]] && command -v doveadm >/dev/null && command -v python3 >/dev/null; then
    log "packages: already installed (Dovecot $(dovecot --version))"
else
    log "packages: installing dovecot-imapd python3"
    APT_TMP=$(mktemp -d)
    chmod 1777 "$APT_TMP"
    TMPDIR=$APT_TMP DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -q >"$APT_TMP/update.log" 2>&1 ||
        { cat "$APT_TMP/update.log" >&2; die "apt-get update failed"; }
    TMPDIR=$APT_TMP DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold dovecot-imapd python3 \
        >"$APT_TMP/install.log" 2>&1 || { tail -n 40 "$APT_TMP/install.log" >&2; die "apt-get install failed"; }
    rm -rf "$APT_TMP"
    [[ -x /usr/sbin/dovecot ]] || die "dovecot-imapd installed but /usr/sbin/dovecot is missing"
    log "packages: Dovecot $(dovecot --version)"
fi
[[ -x $PBXMAIL && -x $SINK ]] || die "build first: cargo build --bin pbxmail --example smtp_sink (make archive-interop does)"

# ---------------------------------------------------------------------------
# Work dir and the clean-up
WORK=$(mktemp -d /tmp/pbxarchive-interop.XXXXXX)
# Dovecot's login and mail processes (dovenull, pbxtest-imap) must reach
# their parts of it.
chmod 0755 "$WORK"
PIDS=()
MADE_GROUP=
MADE_USER=
DOVECOT_CONF=$WORK/dovecot/dovecot.conf

cleanup() {
    local status=$? pid
    if [[ -s $WORK/dovecot/run/master.pid ]]; then
        pid=$(cat "$WORK/dovecot/run/master.pid")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [[ -n $MADE_USER ]] && userdel "$IMAP_USER" 2>/dev/null || true
    [[ -n $MADE_GROUP ]] && groupdel "$GROUP" 2>/dev/null || true
    if [[ ${ARCHIVE_INTEROP_KEEP:-} == 1 || $status != 0 ]]; then
        echo "archive-interop: work dir kept: $WORK"
        if [[ $status != 0 && -f $WORK/dovecot/dovecot.log ]]; then
            echo "--- dovecot log (tail):"; tail -n 30 "$WORK/dovecot/dovecot.log"
        fi
        if [[ $status != 0 && -f $WORK/daemon.log ]]; then
            echo "--- pbxmail log (tail):"; tail -n 20 "$WORK/daemon.log"
        fi
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# 2. The tenant's archive group and Dovecot's unprivileged reader
if ! getent group "$GROUP" >/dev/null; then
    groupadd "$GROUP"
    MADE_GROUP=1
fi
if ! getent passwd "$IMAP_USER" >/dev/null; then
    # A UID from the normal range: Dovecot refuses mail UIDs below
    # first_valid_uid (500), which system accounts are.
    useradd --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --no-user-group --gid nogroup "$IMAP_USER"
    MADE_USER=1
fi
log "reader: user $IMAP_USER (uid $(id -u "$IMAP_USER")), archive group $GROUP (gid $(getent group "$GROUP" | cut -d: -f3))"

# ---------------------------------------------------------------------------
# 3. Relay, daemon, mail
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what (waited ${limit}s)"
}

mkdir -p "$WORK/sink"
"$SINK" --dir "$WORK/sink" >"$WORK/sink.log" 2>&1 &
PIDS+=($!)
wait_for 10 "the SMTP sink did not write its ports" test -s "$WORK/sink/ports"
RELAY_PORT=$(sed -n 's/^plain=//p' "$WORK/sink/ports")

ARCHIVE=$WORK/archive
# As packaging/dovecot/README.md asks: the archive root lets tenant groups
# through (search only) to their own 2750 folders.
install -d -m 0711 "$ARCHIVE"
cat >"$WORK/pbxmail.ini" <<INI
[daemon]
spool_dir = $WORK/spool
control_socket = $WORK/control.sock
archive_dir = $ARCHIVE
hostname = pbx.interop
retry_min = 1s
retry_max = 2s

[tenant:acme]
domains = acme.example
relay = 127.0.0.1:$RELAY_PORT
tls = none
archive = yes
archive_users = *
archive_group = $GROUP
INI
"$PBXMAIL" check-config -c "$WORK/pbxmail.ini" >/dev/null || die "pbxmail configuration refused"
"$PBXMAIL" daemon -c "$WORK/pbxmail.ini" 2>"$WORK/daemon.log" &
PIDS+=($!)
wait_for 10 "the daemon did not start" test -S "$WORK/spool/pickup.sock"

send() { # FROM TAG
    printf 'From: %s\nTo: office@example.com\nSubject: Voicemail %s\nMessage-ID: <%s@pbx.interop>\n\nA voicemail (%s).\n' \
        "$1" "$2" "$2" "$2" |
        PBXMAIL_CONFIG=$WORK/pbxmail.ini "$PBXMAIL" sendmail -i -f "$1" office@example.com ||
        die "sendmail $2 failed"
}
send 101@acme.example vm-101-a
send 101@acme.example vm-101-b
send 102@acme.example vm-102-a
archived() { [[ $(wc -l <"$ARCHIVE/acme/journal") == 3 ]] && [[ $("$PBXMAIL" queue -c "$WORK/pbxmail.ini" --json | tr -d ' \n') == "[]" ]]; }
wait_for 30 "three messages were not archived" archived
log "pbxmail: 3 messages delivered to the sink and archived"
"$PBXMAIL" archive verify -c "$WORK/pbxmail.ini" >/dev/null || die "archive verify fails before Dovecot ran"
snapshot() { (cd "$ARCHIVE" && find . -printf '%p %m %u:%g %s\n' | sort && find . -type f -exec sha256sum {} + | sort); }
snapshot >"$WORK/archive.before"

# ---------------------------------------------------------------------------
# 4. A private Dovecot with the shipped snippet
DC=$WORK/dovecot
mkdir -p "$DC/run" "$DC/users"
chmod 0755 "$DC"
chown "$IMAP_USER" "$DC/users"
chmod 0700 "$DC/users"
IMAP_PORT=$(free_port)
PASSWORD=archive-secret
# What the README tells the administrator to run:
HASH=$(doveadm pw -s SHA512-CRYPT -p "$PASSWORD")
echo "admin@acme:$HASH::$GROUP::::" >"$DC/pbxmail-archive.passwd"
chmod 0640 "$DC/pbxmail-archive.passwd"
chgrp dovecot "$DC/pbxmail-archive.passwd"
cp packaging/dovecot/pbxmail-archive.acl "$DC/pbxmail-archive.acl"
sed -e "s|/etc/dovecot/pbxmail-archive.passwd|$DC/pbxmail-archive.passwd|g" \
    -e "s|/etc/dovecot/pbxmail-archive.acl|$DC/pbxmail-archive.acl|g" \
    -e "s|/var/lib/pbxmail/archive|$ARCHIVE|g" \
    -e "s|/var/lib/dovecot-pbxmail|$DC/users|g" \
    -e "s|uid=pbxarchive|uid=$IMAP_USER|g" \
    packaging/dovecot/pbxmail-archive.conf >"$DC/pbxmail-archive.conf"
cat >"$DOVECOT_CONF" <<CONF
# Private instance for make archive-interop: nothing of the system's
# /etc/dovecot is read.
base_dir = $DC/run
state_dir = $DC/state
instance_name = pbxarchive-interop
log_path = $DC/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
# Loopback and a test password only.
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
mail_debug = no
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $IMAP_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    port = 0
  }
}
service submission-login {
  inet_listener submission {
    port = 0
  }
}
!include $DC/pbxmail-archive.conf
CONF
doveconf -c "$DOVECOT_CONF" -n >"$DC/doveconf.out" 2>&1 || { cat "$DC/doveconf.out" >&2; die "doveconf rejects the configuration"; }
dovecot -c "$DOVECOT_CONF" || die "dovecot did not start"
wait_for 10 "Dovecot does not listen on 127.0.0.1:$IMAP_PORT" \
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $IMAP_PORT), 1).close()"
log "dovecot: private instance on 127.0.0.1:$IMAP_PORT"

# ---------------------------------------------------------------------------
# 5. The IMAP checks, then the archive must be untouched
FAILED=0
CHECKS=$WORK/checks.log
python3 "$HERE/imap_check.py" --port "$IMAP_PORT" --user admin@acme --password "$PASSWORD" \
    --archive "$ARCHIVE/acme" --expect 101=vm-101-a,vm-101-b --expect 102=vm-102-a | tee "$CHECKS" ||
    FAILED=1
((${PIPESTATUS[0]} == 0)) || FAILED=1

snapshot >"$WORK/archive.after"
if diff -u "$WORK/archive.before" "$WORK/archive.after"; then
    echo "PASS archive unchanged: same files, modes, owners, sizes and SHA-256 as before Dovecot ran" | tee -a "$CHECKS"
else
    echo "FAIL archive changed while Dovecot served it (diff above)" | tee -a "$CHECKS"
    FAILED=1
fi
if out=$("$PBXMAIL" archive verify -c "$WORK/pbxmail.ini" 2>&1); then
    echo "PASS pbxmail archive verify: $out" | tee -a "$CHECKS"
else
    echo "FAIL pbxmail archive verify: $out" | tee -a "$CHECKS"
    FAILED=1
fi
if grep -E 'Error|Fatal|Panic' "$DC/dovecot.log" | grep -v 'acl' >"$WORK/dovecot.errors"; then
    echo "note: Dovecot logged errors:"
    sed 's/^/  | /' "$WORK/dovecot.errors"
fi
npass=$(grep -c '^PASS' "$CHECKS" || true)
nfail=$(grep -c '^FAIL' "$CHECKS" || true)
((FAILED == 0)) || { echo "archive-interop: $npass passed, $nfail failed"; die "some checks failed"; }
log "PASS: all checks"
echo "archive-interop: $npass passed, $nfail failed"
