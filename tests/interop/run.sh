#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions run from traps and wait_for
# `make interop`: pbxmail against a mail server nobody here wrote.
#
#  1. Installs Postfix, Cyrus SASL's sasldb tools and OpenSSL from Debian's
#     packages when they are missing (as root; skipped when present).
#  2. Makes a throwaway CA and a server certificate for "localhost", a sasldb
#     with two users, and a PRIVATE Postfix instance: its own config, queue and
#     data directories under a fresh work dir, listening only on 127.0.0.1 with
#     STARTTLS (required; CHUNKING withheld, so DATA) on one port and implicit
#     TLS (CHUNKING offered) on another, both demanding SMTP AUTH, delivering
#     pbx@interop.test into a Maildir.
#  3. Runs the pbxmail daemon with a tenant per port; sends two messages
#     back-to-back per tenant through `pbxmail sendmail -t -i`; waits for four
#     Maildir files and compares them with what was sent (body bytes, Subject,
#     Message-ID; exactly once each). Two more tenants check that Postfix's
#     refusals come back as refusals: no AUTH (relay denied, 5xx) and a wrong
#     password.
#  4. Postfix's smtp-sink with its fault flags (-f hard reject, -r soft reject,
#     -q disconnect, -Q 421, -A abort during DATA) and a healthy one: a tenant
#     per sink, and pbxmail's queue state checked for each.
#  5. Prints PASS/FAIL per case and exits non-zero on any failure, with the
#     tails of pbxmail's and Postfix's logs.
#  6. Stops Postfix, the sinks and the daemon (by PID) on every exit.
#
# The machine's own Postfix, if any, is never touched: everything here uses
# `postfix -c PRIVATE_DIR` and ports picked free on 127.0.0.1.
#
# Environment: INTEROP_DIR (work dir; default a new /tmp/mailinterop.*),
# INTEROP_KEEP=1 keeps the work dir after a passing run (a failing run always
# keeps it), INTEROP_WAIT (seconds per wait, default 60).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/tests/interop
PBXMAIL=$ROOT/target/debug/pbxmail
HELPER=$HERE/helper.py
WAIT=${INTEROP_WAIT:-60}
T0=$SECONDS

log() { printf '[interop %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { echo "interop: $*" >&2; exit 1; }

[[ -x $PBXMAIL ]] || die "$PBXMAIL is missing; run 'make interop' (it builds first)"
# Postfix's master starts as root (it binds, then drops to user postfix).
[[ $(id -u) == 0 ]] || die "needs root: Postfix's master runs as root (CI does)"

# ---------------------------------------------------------------------------
# 1. Packages
PKGS=(postfix sasl2-bin libsasl2-modules libsasl2-modules-db openssl python3 ca-certificates)
have_tools() {
    command -v postfix >/dev/null && command -v postconf >/dev/null &&
        [[ -x /usr/sbin/smtp-sink ]] && command -v saslpasswd2 >/dev/null &&
        command -v openssl >/dev/null && command -v python3 >/dev/null &&
        compgen -G '/usr/lib/*/sasl2/libsasldb.so*' >/dev/null &&
        compgen -G '/usr/lib/*/sasl2/libplain.so*' >/dev/null &&
        compgen -G '/usr/lib/*/sasl2/liblogin.so*' >/dev/null
}
if have_tools; then
    log "packages: already installed ($(postconf -d -h mail_version 2>/dev/null | sed 's/^/Postfix /'))"
else
    log "packages: installing ${PKGS[*]}"
    # apt's signature check runs as _apt and writes its temporary files to
    # $TMPDIR; give it one it can write to whatever the mode of /tmp is.
    APT_TMP=$(mktemp -d)
    chmod 1777 "$APT_TMP"
    # "No configuration": the package installs without a system main.cf, so
    # it starts no system instance; ours is private anyway.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    t=$SECONDS
    TMPDIR=$APT_TMP DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -q >"$APT_TMP/update.log" 2>&1 ||
        { cat "$APT_TMP/update.log" >&2; die "apt-get update failed"; }
    TMPDIR=$APT_TMP DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PKGS[@]}" \
        >"$APT_TMP/install.log" 2>&1 || { tail -n 40 "$APT_TMP/install.log" >&2; die "apt-get install failed"; }
    rm -rf "$APT_TMP"
    have_tools || die "packages installed but the tools are still missing"
    log "packages: installed in $((SECONDS - t))s ($(postconf -d -h mail_version | sed 's/^/Postfix /'))"
fi

# ---------------------------------------------------------------------------
# Work dir and cleanup
if [[ -n ${INTEROP_DIR:-} ]]; then
    W=$INTEROP_DIR
    rm -rf "$W"
    mkdir -p "$W"
else
    W=$(mktemp -d /tmp/mailinterop.XXXXXX)
fi
# Postfix's daemons (user postfix) and virtual(8) (user nobody) must reach it.
chmod 755 "$W"
W=$(cd "$W" && pwd -P)
CONF=$W/postfix/etc
QUEUE=$W/postfix/queue
DATA=$W/postfix/data
PFLOG=$W/postfix.log
MAILBOX=$W/mailboxes
SPOOL=$W/pbxmail/spool
CONFIG=$W/pbxmail/pbxmail.ini
DAEMON_LOG=$W/pbxmail/daemon.log
SENT=$W/sent

POSTFIX_STARTED=0
DAEMON_PID=
SINK_PIDS=()
RESULTS=()
FAILED=0

pass() { RESULTS+=("PASS  $*"); log "PASS $*"; }
fail() { RESULTS+=("FAIL  $*"); log "FAIL $*"; FAILED=1; }

show_logs() {
    echo
    echo "--- last 40 lines of pbxmail's log ($DAEMON_LOG) ---"
    tail -n 40 "$DAEMON_LOG" 2>/dev/null || true
    echo "--- last 40 lines of Postfix's log ($PFLOG) ---"
    tail -n 40 "$PFLOG" 2>/dev/null || true
    local f
    for f in "$W"/sinks/*.log; do
        [[ -s $f ]] || continue
        echo "--- last 10 lines of $f ---"
        tail -n 10 "$f"
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $DAEMON_PID ]]; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        for _ in $(seq 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && { echo "interop: pbxmail ignored SIGTERM; killing it" >&2; kill -KILL "$DAEMON_PID"; }
        wait "$DAEMON_PID" 2>/dev/null
    fi
    local pid
    for pid in "${SINK_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${SINK_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if ((POSTFIX_STARTED)); then
        timeout 30 postfix -c "$CONF" stop >/dev/null 2>&1 ||
            { echo "interop: 'postfix stop' failed; aborting the private master" >&2; timeout 10 postfix -c "$CONF" abort; }
        # master leaves when its children have; wait for the pid file to free.
        local master
        master=$(tr -d ' ' <"$QUEUE/pid/master.pid" 2>/dev/null)
        for _ in $(seq 100); do
            if [[ -z $master ]] || ! kill -0 "$master" 2>/dev/null; then break; fi
            sleep 0.1
        done
    fi
    if ((rc != 0 || FAILED)); then
        ((rc != 0)) || rc=1
        show_logs
        echo "interop: work dir kept for inspection: $W"
    elif [[ ${INTEROP_KEEP:-0} == 1 ]]; then
        echo "interop: work dir kept: $W"
    else
        rm -rf "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for WHAT SECS CMD...: polls every 0.2 s until CMD succeeds, at most SECS.
wait_for() {
    local what=$1 secs=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

mapfile -t PORTS < <(python3 "$HELPER" ports 10)
P_STARTTLS=${PORTS[0]}
P_IMPLICIT=${PORTS[1]}
log "work dir $W; Postfix ports: STARTTLS 127.0.0.1:$P_STARTTLS, implicit TLS 127.0.0.1:$P_IMPLICIT"

# ---------------------------------------------------------------------------
# 2. Certificates, SASL users, the private Postfix instance
mkdir -p "$CONF/tls" "$CONF/sasl" "$QUEUE" "$DATA" "$MAILBOX" "$SPOOL" "$SENT" "$W/sinks"
TLS=$CONF/tls
openssl_q() { openssl "$@" >>"$W/openssl.log" 2>&1 || { cat "$W/openssl.log" >&2; die "openssl $1 failed"; }; }
openssl_q req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=pbxmail interop throwaway CA" -keyout "$TLS/ca.key" -out "$TLS/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl_q req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=localhost" -keyout "$TLS/server.key" -out "$TLS/server.csr"
cat >"$TLS/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
EOF
openssl_q x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial \
    -days 2 -extfile "$TLS/server.ext" -out "$TLS/server.pem"
chmod 600 "$TLS"/*.key
log "TLS: throwaway CA and a certificate for localhost/127.0.0.1 (valid 2 days) in $TLS"

SASLDB=$CONF/sasl/sasldb2
STARTTLS_PASS="st-$RANDOM$RANDOM"
IMPLICIT_PASS="im-$RANDOM$RANDOM"
printf '%s' "$STARTTLS_PASS" | saslpasswd2 -c -p -f "$SASLDB" -u interop.test starttls
printf '%s' "$IMPLICIT_PASS" | saslpasswd2 -c -p -f "$SASLDB" -u interop.test implicit
chown root:postfix "$SASLDB"
chmod 640 "$SASLDB"
cat >"$CONF/sasl/smtpd.conf" <<EOF
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: PLAIN LOGIN
sasldb_path: $SASLDB
EOF
log "SASL: sasldb users $(sasldblistusers2 -f "$SASLDB" | cut -d: -f1 | tr '\n' ' ')"

echo "pbx@interop.test pbx/" >"$CONF/vmailbox"
chown nobody:nogroup "$MAILBOX"
subst() {
    sed -e "s|@CONF@|$CONF|g" -e "s|@QUEUE@|$QUEUE|g" -e "s|@DATA@|$DATA|g" \
        -e "s|@LOG@|$PFLOG|g" -e "s|@MAILBOX_BASE@|$MAILBOX|g" \
        -e "s|@VUID@|$(id -u nobody)|g" -e "s|@VGID@|$(id -g nobody)|g" \
        -e "s|@P_STARTTLS@|$P_STARTTLS|g" -e "s|@P_IMPLICIT@|$P_IMPLICIT|g" "$1"
}
subst "$HERE/main.cf.in" >"$CONF/main.cf"
subst "$HERE/master.cf.in" >"$CONF/master.cf"
# Debian's Postfix looks for its map plugins' list in the config directory.
[[ -f /etc/postfix/dynamicmaps.cf ]] && cp /etc/postfix/dynamicmaps.cf "$CONF/"
chown postfix:postfix "$DATA"
touch "$PFLOG"

# `postfix check` creates the queue's subdirectories with their owners and
# reports what it dislikes; then start the master and wait for both ports.
# postfix(1) writes its complaints to stderr only when that is a terminal
# (else to the maillog), so it runs under script(1).
postfix_cmd() {
    local what=$1
    if ! timeout 60 script -qec "postfix -c '$CONF' $what" /dev/null >"$W/postfix-$what.log" 2>&1; then
        cat "$W/postfix-$what.log" >&2
        die "postfix $what failed"
    fi
}
postfix_cmd check
postfix_cmd start
POSTFIX_STARTED=1
port_open() { python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$1" 2>/dev/null; }
wait_for "Postfix on 127.0.0.1:$P_STARTTLS" 30 port_open "$P_STARTTLS"
wait_for "Postfix on 127.0.0.1:$P_IMPLICIT" 30 port_open "$P_IMPLICIT"
log "Postfix $(postconf -c "$CONF" -h mail_version) running (master PID $(tr -d ' ' <"$QUEUE/pid/master.pid")), log $PFLOG"

# ---------------------------------------------------------------------------
# 4 (set-up). smtp-sink fault servers, each on its own port, each bounded.
# name|flags|expected pbxmail queue state for its mail
SINK_CASES=(
    "sink-ok||gone"
    "sink-rcpt-5xx|-f RCPT|bounced"
    "sink-rcpt-4xx|-r RCPT|deferred"
    "sink-dot-5xx|-f .|bounced"
    "sink-dot-4xx|-r .|deferred"
    "sink-data-drop|-q DATA|deferred"
    "sink-mail-421|-Q MAIL|deferred"
    # -A 0 sends 550 right behind its 354, unasked: a reply already there
    # when the body would go ends the session as a protocol error (deferred,
    # issue 14); one that comes later answers the final dot (bounced, and
    # the bounce meets the same sink). Either way nothing is taken as sent.
    "sink-data-abort|-A 0|undelivered"
)
declare -A SINK_PORT
i=2
for c in "${SINK_CASES[@]}"; do
    IFS='|' read -r name flags _ <<<"$c"
    port=${PORTS[$i]}
    i=$((i + 1))
    SINK_PORT[$name]=$port
    mkdir -p "$W/sinks/$name"
    chown nobody:nogroup "$W/sinks/$name"
    # -u: smtp-sink refuses to run as root; -t: per-command time limit;
    # timeout: the sink never outlives the test.
    # shellcheck disable=SC2086
    timeout 600 /usr/sbin/smtp-sink -u nobody -t 30 -h "$name.sink.test" $flags \
        -d "$W/sinks/$name/%H%M%S." "127.0.0.1:$port" 16 >"$W/sinks/$name.log" 2>&1 &
    SINK_PIDS+=($!)
done
for c in "${SINK_CASES[@]}"; do
    name=${c%%|*}
    wait_for "smtp-sink $name on 127.0.0.1:${SINK_PORT[$name]}" 20 port_open "${SINK_PORT[$name]}"
done
log "smtp-sink: ${#SINK_CASES[@]} servers up ($(for c in "${SINK_CASES[@]}"; do IFS='|' read -r n f _ <<<"$c"; printf '%s[%s]:%s ' "$n" "${f:-healthy}" "${SINK_PORT[$n]}"; done))"

# ---------------------------------------------------------------------------
# 3. pbxmail: configuration and daemon
mkdir -p "$W/pbxmail"
{
    cat <<EOF
; Generated by tests/interop/run.sh
[daemon]
spool_dir = $SPOOL
hostname = pbx.interop.test
retry_min = 1s
retry_max = 5s
log_level = debug

; Postfix, STARTTLS port, SMTP AUTH with the sasldb user starttls@interop.test
[tenant:pf-starttls]
domains = pf-starttls.pbx.test
relay = localhost:$P_STARTTLS
tls = starttls
ca_file = $TLS/ca.pem
auth = auto
username = starttls@interop.test
password = $STARTTLS_PASS
messages_per_session = 20
connect_timeout = 10s
command_timeout = 30s
data_timeout = 30s

; Postfix, implicit TLS port, AUTH LOGIN forced
[tenant:pf-implicit]
domains = pf-implicit.pbx.test
relay = localhost:$P_IMPLICIT
tls = implicit
ca_file = $TLS/ca.pem
auth = login
username = implicit@interop.test
password = $IMPLICIT_PASS
messages_per_session = 20
connect_timeout = 10s
command_timeout = 30s
data_timeout = 30s

; Postfix without AUTH: relay access is refused (5xx)
[tenant:pf-noauth]
domains = pf-noauth.pbx.test
relay = localhost:$P_STARTTLS
tls = starttls
ca_file = $TLS/ca.pem
auth = none
connect_timeout = 10s
command_timeout = 30s
data_timeout = 30s

; Postfix with a wrong password: AUTH fails (535)
[tenant:pf-badauth]
domains = pf-badauth.pbx.test
relay = localhost:$P_IMPLICIT
tls = implicit
ca_file = $TLS/ca.pem
auth = plain
username = implicit@interop.test
password = not-$IMPLICIT_PASS
connect_timeout = 10s
command_timeout = 30s
data_timeout = 30s
EOF
    for c in "${SINK_CASES[@]}"; do
        IFS='|' read -r name flags _ <<<"$c"
        cat <<EOF

; smtp-sink ${flags:-(healthy)}
[tenant:$name]
domains = $name.pbx.test
relay = 127.0.0.1:${SINK_PORT[$name]}
tls = none
auth = none
messages_per_session = 20
connect_timeout = 5s
command_timeout = 10s
data_timeout = 10s
EOF
    done
} >"$CONFIG"
chmod 600 "$CONFIG"
export PBXMAIL_CONFIG=$CONFIG

if ! "$PBXMAIL" check-config -c "$CONFIG" >"$W/check-config.log" 2>&1; then
    cat "$W/check-config.log" >&2
    die "pbxmail check-config rejected the generated configuration"
fi
"$PBXMAIL" daemon -c "$CONFIG" >"$DAEMON_LOG" 2>&1 &
DAEMON_PID=$!
wait_for "the daemon's pickup socket" 30 bash -c "[[ -S '$SPOOL/pickup.sock' ]] || ! kill -0 $DAEMON_PID 2>/dev/null"
kill -0 "$DAEMON_PID" 2>/dev/null || die "pbxmail daemon exited at start"
log "pbxmail daemon PID $DAEMON_PID, config $CONFIG, log $DAEMON_LOG"

# make_message FILE TENANT N RCPT: a message whose body has the lines SMTP
# transparency (RFC 5321 4.5.2) is about, a 990-octet line and trailing blanks.
make_message() {
    local file=$1 tenant=$2 n=$3 rcpt=$4 long
    long=$(printf 'L%.0s' $(seq 980))
    {
        printf 'From: PBX %s <100@%s.pbx.test>\n' "$tenant" "$tenant"
        printf 'To: <%s>\n' "$rcpt"
        printf 'Subject: interop %s message %s of 2 (%s)\n' "$tenant" "$n" "$RUN_ID"
        printf 'Message-ID: <%s.%s.%s@pbx.interop.test>\n' "$RUN_ID" "$tenant" "$n"
        printf 'MIME-Version: 1.0\n'
        printf 'Content-Type: text/plain; charset=us-ascii\n'
        printf '\n'
        printf 'Voicemail notification %s for tenant %s.\n' "$n" "$tenant"
        printf '.\n'
        printf '..\n'
        printf '.x\n'
        printf '...three dots\n'
        printf ' .leading space then dot\n'
        printf 'From the start of a line, like an mbox separator\n'
        printf '%s-%s\n' "$long" "$n"
        printf 'trailing blanks   \n'
        printf '\ttab-indented line\n'
        printf '\n'
        printf '.\n'
        printf 'end of message %s\n' "$n"
    } >"$file"
}
RUN_ID="$(date +%s).$$"

# submit TENANT N RCPT: one message through sendmail -t -i (a lone dot is data).
submit() {
    local tenant=$1 n=$2 rcpt=$3 file=$SENT/$1.$2.eml
    make_message "$file" "$tenant" "$n" "$rcpt"
    if ! "$PBXMAIL" sendmail -t -i <"$file" >>"$W/sendmail.log" 2>&1; then
        fail "$tenant: pbxmail sendmail refused message $n (exit $?; see $W/sendmail.log)"
        return 1
    fi
}

# ---------------------------------------------------------------------------
# 3. Postfix: two messages back-to-back per tenant, then compare the Maildir.
log "submitting 2 messages back-to-back for pf-starttls and pf-implicit, 1 each for pf-noauth and pf-badauth"
submit pf-starttls 1 pbx@interop.test
submit pf-starttls 2 pbx@interop.test
submit pf-implicit 1 pbx@interop.test
submit pf-implicit 2 pbx@interop.test
submit pf-noauth 1 pbx@interop.test
submit pf-badauth 1 pbx@interop.test
# ... and the smtp-sink cases at the same time: one tenant never waits for another.
for c in "${SINK_CASES[@]}"; do
    name=${c%%|*}
    submit "$name" 1 "rcpt@$name.sink.test"
    [[ $name == sink-ok ]] && submit "$name" 2 "rcpt@$name.sink.test"
done

MAILDIR=$MAILBOX/pbx
maildir_has() { (($(python3 "$HELPER" count "$MAILDIR" 2>/dev/null || echo 0) >= $1)); }
wait_for "4 files in $MAILDIR" "$WAIT" maildir_has 4 || true
# The Maildir is compared once nothing can add to it: a duplicate could only
# come from mail pbxmail still holds or Postfix still has queued.
for t in pf-starttls pf-implicit; do
    echo "--- pbxmail queue, $t ---"
    if python3 "$HELPER" queue "$PBXMAIL" "$CONFIG" "100@$t.pbx.test" gone 15; then
        pass "$t: both messages delivered and gone from pbxmail's spool"
    else
        fail "$t: pbxmail still holds mail that Postfix should have taken"
    fi
done
postfix_queue_empty() {
    [[ -z $(find "$QUEUE"/{maildrop,incoming,active,deferred} -type f 2>/dev/null | head -1) ]]
}
wait_for "Postfix's queue to empty" 30 postfix_queue_empty || true
echo "--- Maildir $MAILDIR ---"
if python3 "$HELPER" maildir "$MAILDIR" "$SENT"/pf-starttls.*.eml "$SENT"/pf-implicit.*.eml; then
    pass "postfix: 4 messages (STARTTLS x2, implicit TLS x2) stored exactly once, bodies byte-identical, ESMTPSA"
else
    fail "postfix: Maildir contents differ from what was sent (see above)"
fi
# What Postfix saw: the sessions that carried mail on each port (both
# messages may ride one session), with the commands smtpd counted.
for t in starttls implicit; do
    grep "postfix-interop/$t/smtpd.*disconnect from.* mail=[1-9]" "$PFLOG" | grep -v "rcpt=0/" |
        sed -e "s/.*disconnect from [^ ]* /  postfix $t port session: /" || true
done

echo "--- pbxmail queue, pf-noauth (no AUTH: Postfix refuses the recipient) ---"
if python3 "$HELPER" queue "$PBXMAIL" "$CONFIG" "100@pf-noauth.pbx.test" bounced "$WAIT"; then
    pass "pf-noauth: Postfix's 5xx relay refusal bounced the message (not delivered)"
else
    fail "pf-noauth: expected the message bounced after Postfix's 5xx"
fi
echo "--- pbxmail queue, pf-badauth (wrong password: AUTH fails with 535) ---"
if python3 "$HELPER" queue "$PBXMAIL" "$CONFIG" "100@pf-badauth.pbx.test" kept "$WAIT"; then
    pass "pf-badauth: refused AUTH kept the message in the queue, not delivered"
else
    fail "pf-badauth: expected the message to stay queued (deferred or failed) after AUTH failed"
fi

# ---------------------------------------------------------------------------
# 4. smtp-sink fault cases
for c in "${SINK_CASES[@]}"; do
    IFS='|' read -r name flags expect <<<"$c"
    echo "--- pbxmail queue, $name (smtp-sink ${flags:-healthy}; expect: $expect) ---"
    sender="100@$name.pbx.test"
    case $expect in
    gone)
        if python3 "$HELPER" queue "$PBXMAIL" "$CONFIG" "$sender" gone "$WAIT" &&
            python3 "$HELPER" dumps "$W/sinks/$name" "$SENT/$name".*.eml; then
            pass "$name: healthy smtp-sink took both messages, bodies byte-identical"
        else
            fail "$name: expected both messages delivered to the healthy smtp-sink"
        fi
        ;;
    kept)
        if python3 "$HELPER" queue "$PBXMAIL" "$CONFIG" "$sender" kept "$WAIT"; then
            pass "$name (smtp-sink $flags): message kept, not delivered"
        else
            fail "$name (smtp-sink $flags): expected the message kept as failed or deferred"
        fi
        ;;
    *)
        if python3 "$HELPER" queue "$PBXMAIL" "$CONFIG" "$sender" "$expect" "$WAIT"; then
            pass "$name (smtp-sink $flags): state $expect"
        else
            fail "$name (smtp-sink $flags): expected state $expect"
        fi
        ;;
    esac
done
kill -0 "$DAEMON_PID" 2>/dev/null || fail "pbxmail daemon died during the test"

# ---------------------------------------------------------------------------
# 5. Summary
echo
echo "=== make interop: summary ($((SECONDS - T0))s) ==="
printf '%s\n' "${RESULTS[@]}"
npass=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^PASS' || true)
nfail=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL' || true)
echo "interop: $npass passed, $nfail failed"
exit "$FAILED"
