#!/usr/bin/env bash
# Part of `make bench` (figures B, issue 4, and C, issue 5): pbxmail's memory,
# start-up and idle cost. A benchmark, not a test: it prints figures and
# asserts no timing or size; it fails only when the bench cannot run.
#
# B1. RSS while delivering one large message (MEM_BIG_MB, default 50 MB of
#     base64-like text lines) versus one of 10 KB: the message is spooled with
#     the daemon stopped, then the daemon starts against a Postfix smtp-sink on
#     127.0.0.1; its VmRSS is sampled every 20 ms from exec until the queue is
#     empty (the maximum is reported) and VmHWM read at the end. Goal: under
#     2 MB apart.
# B2. Start-up with 10,000 queued (MEM_QUEUED): one tenant whose relay is a
#     closed port on 127.0.0.1 (its first session is refused at once, then it
#     backs off for retry_min = 10m), log_level = debug. Times from exec to
#     SPOOL/pickup.sock and to the debug line "tenant bulk: 10000 messages
#     queued" (the index loaded), the log file polled every 10 ms; then, 1 s
#     later, VmRSS, Pss, VmHWM and threads; then the CPU time (utime+stime)
#     spent over 5 s of idling. The same with 0 queued; per-message index cost =
#     (VmRSS with 10,000 - VmRSS with 0) / 10,000.
# C.  Idle tenants: 1,000 tenants configured (each its own domain, relay a
#     closed port, nothing queued) versus 1: start-up to pickup.sock and to all
#     1,000 "0 messages queued" lines, VmRSS, threads, idle CPU over 5 s (goal
#     ~0: no polling), and how long SIGTERM takes to stop it.
# D.  A tenant thread's stack: the resident part of its 512 KiB mapping after
#     STARTTLS+AUTH and implicit-TLS sessions (what a session needs).
#
# Everything listens and connects on 127.0.0.1 only; every wait is bounded.
# Stops every sink and daemon it started (by PID) on every exit.
#
# Environment: MEM_BIG_MB (default 50), MEM_QUEUED (default 10000),
# MEM_TENANTS (default 1000), BENCH_KEEP=1 keeps the work dir, BENCH_PBXMAIL
# (binary; default target/release/pbxmail).
set -euo pipefail
BENCH_NAME=memory
# shellcheck source=tests/bench/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

BIG_MB=${MEM_BIG_MB:-50}
QUEUED=${MEM_QUEUED:-10000}
NTEN=${MEM_TENANTS:-1000}
for v in BIG_MB QUEUED NTEN; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer"
done
((BIG_MB <= 500 && QUEUED <= 50000 && NTEN <= 5000)) || die "sizes too large for a bounded run"
[[ -x $PBXMAIL ]] || die "$PBXMAIL is missing; run 'make bench' (it builds first)"
ensure_packages
stop_system_postfix

WORK=$(mktemp -d /tmp/pbxmem.XXXXXX)
PIDS=()
DAEMON_PIDFILE=$WORK/daemon.pid
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

cleanup() {
    local status=$? pid
    set +e
    trap - EXIT INT TERM
    [[ -s $DAEMON_PIDFILE ]] && kill -TERM "$(cat "$DAEMON_PIDFILE")" 2>/dev/null
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if [[ ${BENCH_KEEP:-} == 1 || $status != 0 ]]; then
        echo "$BENCH_NAME: work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

config() { # FILE SPOOL PORT LOGLEVEL TENANT_COUNT
    local file=$1 spool=$2 port=$3 level=$4 n=$5 i name
    {
        cat <<EOF
[daemon]
spool_dir = $spool
control_socket = $(dirname "$file")/control.sock
hostname = bench.test
retry_min = 10m
retry_max = 1h
log_level = $level
EOF
        for ((i = 1; i <= n; i++)); do
            if ((n == 1)); then name=bulk; else name=$(printf 'c%04d' "$i"); fi
            cat <<EOF

[tenant:$name]
domains = $name.test
relay = 127.0.0.1:$port
tls = none
auth = none
messages_per_session = 50
connect_timeout = 30s
command_timeout = 30s
data_timeout = 60s
EOF
        done
    } >"$file"
    "$PBXMAIL" check-config -c "$file" >/dev/null ||
        die "configuration refused: $("$PBXMAIL" check-config -c "$file" 2>&1 | head -n 5)"
}

mapfile -t P < <(python3 "$MEASURE" ports 2)
SINK_PORT=${P[0]}
CLOSED_PORT=${P[1]} # nothing ever listens here: connections are refused

# ---------------------------------------------------------------------------
# B1. One large message versus one small
python3 "$HERE/bench.py" message "$WORK/small.txt" 10240
python3 "$MEASURE" bigmessage "$WORK/big.txt" "$((BIG_MB * 1024 * 1024))"

deliver_one() { # LABEL FILE
    local label=$1 file=$2 dir bytes pid
    dir=$WORK/deliver-$(echo "$label" | tr -c 'a-zA-Z0-9\n' '-')
    bytes=$(wc -c <"$file")
    mkdir -p "$dir/sinks"
    config "$dir/pbxmail.ini" "$dir/spool" "$SINK_PORT" warn 1
    PBXMAIL_CONFIG=$dir/pbxmail.ini timeout 300 "$PBXMAIL" sendmail -i -f pbx@bulk.test ext1@sink.test <"$file" ||
        die "sendmail of the $label message failed"
    [[ $(count_env "$dir/spool/queue/bulk") == 1 ]] || die "the $label message is not queued"
    "$SINK" -u nobody -c "127.0.0.1:$SINK_PORT" 256 >"$dir/sinks/bulk.out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$SINK_PORT"
    python3 "$MEASURE" watch --system pbxmail --run "$label" --tenants bulk --healthy bulk \
        --sinks "$dir/sinks" --expect 1 --spool "$dir/spool" --pidfile "$DAEMON_PIDFILE" \
        --log "$dir/daemon.log" --sample 0.02 --poll 0.005 --deadline 300 \
        --extra "{\"kind\": \"deliver\", \"bytes\": $bytes}" --out "$RESULTS" \
        -- "$PBXMAIL" daemon -c "$dir/pbxmail.ini" >"$dir/watch.json" ||
        { cat "$dir/watch.json"; tail -n 20 "$dir/daemon.log"; die "the $label message was not delivered"; }
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PIDS=()
    [[ -s $dir/daemon.log ]] && { log "$label: the daemon logged:"; sed 's/^/  | /' "$dir/daemon.log" | head -n 5; }
    log "$label message ($bytes bytes): delivered"
    rm -rf "$dir/spool"
}
deliver_one "10 KB" "$WORK/small.txt"
deliver_one "$BIG_MB MB" "$WORK/big.txt"
rm -f "$WORK/big.txt"

# ---------------------------------------------------------------------------
# B2. Start-up and index with 0 and with QUEUED messages
startup() { # CASE DIR TENANTS QUEUED REGEX COUNT
    local case=$1 dir=$2 n=$3 queued=$4 regex=$5 count=$6
    python3 "$MEASURE" startup --case "$case" --spool "$dir/spool" --log "$dir/daemon-$n-$queued.log" \
        --pidfile "$DAEMON_PIDFILE" --wait-log "$regex" --wait-count "$count" --tenants "$n" \
        --queued "$queued" --deadline 300 --out "$RESULTS" -- "$PBXMAIL" daemon -c "$dir/pbxmail.ini" \
        >"$dir/startup.json" || { cat "$dir/startup.json"; tail -n 20 "$dir/daemon-$n-$queued.log"; die "$case: start-up failed"; }
    log "$case: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("loaded in %.3f s, VmRSS %.1f MB, %d threads" % (r["loaded_s"], r["rss_kb"]/1024, r["threads"]))' "$dir/startup.json")"
}

D0=$WORK/queued-0
mkdir -p "$D0"
config "$D0/pbxmail.ini" "$D0/spool" "$CLOSED_PORT" debug 1
startup "1 tenant, 0 queued" "$D0" 1 0 'tenant bulk: 0 messages queued' 1

DQ=$WORK/queued-$QUEUED
mkdir -p "$DQ"
config "$DQ/pbxmail.ini" "$DQ/spool" "$CLOSED_PORT" debug 1
t=$SECONDS
seq 1 "$QUEUED" | PBXMAIL_CONFIG=$DQ/pbxmail.ini MSG=$WORK/small.txt PBX=$PBXMAIL timeout 600 \
    xargs -P 8 -n 1 sh -c '"$PBX" sendmail -i -f pbx@bulk.test "ext$0@sink.test" <"$MSG"' ||
    die "pbxmail sendmail failed"
[[ $(count_env "$DQ/spool/queue/bulk") == "$QUEUED" ]] || die "spooled $QUEUED but $(count_env "$DQ/spool/queue/bulk") are queued"
log "spooled $QUEUED messages of 10 KB for one tenant (daemon stopped) in $((SECONDS - t))s"
startup "1 tenant, $QUEUED queued" "$DQ" 1 "$QUEUED" "tenant bulk: $QUEUED messages queued" 1
# Once more: the first start deferred one batch (refused connection), so the
# spool now also holds attempt records; and the page cache is warm for both.
startup "1 tenant, $QUEUED queued, again" "$DQ" 1 "$QUEUED" "tenant bulk: $QUEUED messages queued" 1
rm -rf "$DQ/spool"

# ---------------------------------------------------------------------------
# C. Many idle tenants
DT=$WORK/tenants-$NTEN
mkdir -p "$DT"
config "$DT/pbxmail.ini" "$DT/spool" "$CLOSED_PORT" debug "$NTEN"
startup "$NTEN tenants, 0 queued" "$DT" "$NTEN" 0 'tenant c[0-9]+: 0 messages queued' "$NTEN"

# ---------------------------------------------------------------------------
# D. What a session needs of a tenant thread's 512 KiB stack: one tenant
#    sending over STARTTLS with AUTH, one over implicit TLS, to the demo sink
#    (examples/smtp_sink, its own test CA); then the resident part of each
#    512 KiB stack mapping in /proc/PID/smaps, the deepest reported.
TLS_SINK=$ROOT/target/debug/examples/smtp_sink
[[ -x $TLS_SINK ]] || die "$TLS_SINK is missing; run 'make bench' (it builds it)"
DS=$WORK/stack
mkdir -p "$DS"
"$TLS_SINK" --dir "$DS/sink" >"$DS/sink.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do [[ -s $DS/sink/ports ]] && break; sleep 0.05; done
[[ -s $DS/sink/ports ]] || die "the demo sink did not start: $(cat "$DS/sink.log")"
STARTTLS_PORT=$(sed -n 's/^starttls=//p' "$DS/sink/ports")
IMPLICIT_PORT=$(sed -n 's/^implicit=//p' "$DS/sink/ports")
printf 'demo-secret\n' >"$DS/password"
cat >"$DS/pbxmail.ini" <<INI
[daemon]
spool_dir = $DS/spool
control_socket = $DS/control.sock
hostname = bench.test

[tenant:starttls]
domains = starttls.test
relay = localhost:$STARTTLS_PORT
tls = starttls
ca_file = $DS/sink/ca.pem
username = demo
password_file = $DS/password

[tenant:implicit]
domains = implicit.test
relay = localhost:$IMPLICIT_PORT
tls = implicit
ca_file = $DS/sink/ca.pem
username = demo
password_file = $DS/password
INI
"$PBXMAIL" daemon -c "$DS/pbxmail.ini" >"$DS/daemon.log" 2>&1 &
STACK_PID=$!
PIDS+=("$STACK_PID")
for _ in $(seq 200); do [[ -S $DS/spool/pickup.sock ]] && break; sleep 0.05; done
for t in starttls implicit; do
    for i in 1 2 3; do
        PBXMAIL_CONFIG=$DS/pbxmail.ini "$PBXMAIL" sendmail -i -f "pbx@$t.test" "ext$i@sink.test" <"$WORK/small.txt" ||
            die "sendmail for $t failed"
    done
done
queued_tls() { echo $(($(count_env "$DS/spool/queue/starttls") + $(count_env "$DS/spool/queue/implicit"))); }
for _ in $(seq 300); do [[ $(queued_tls) == 0 ]] && break; sleep 0.05; done
[[ $(queued_tls) == 0 ]] || die "the TLS sessions did not deliver: $(tail -n 5 "$DS/daemon.log")"
# Mappings of exactly 512 KiB, read-write and anonymous: the tenant threads'
# stacks (the intake thread's is 256 KiB, the main thread's 8 MiB).
STACK_KB=$(awk '
    /^[0-9a-f]+-[0-9a-f]+ / { rw_anon = ($2 ~ /^rw/ && NF == 5); size = 0; next }
    $1 == "Size:" { size = $2; next }
    $1 == "Rss:" && rw_anon && size == 512 { if ($2 > max) max = $2; found = 1 }
    END { if (found) print max; else print "none" }
' "/proc/$STACK_PID/smaps")
kill -TERM "$STACK_PID" 2>/dev/null || true
wait "$STACK_PID" 2>/dev/null || true
[[ $STACK_KB != none ]] || die "no 512 KiB stack mapping found in /proc/$STACK_PID/smaps"
log "tenant thread stack after STARTTLS+AUTH and implicit-TLS sessions: $STACK_KB KiB resident of 512 KiB"

echo
echo "B/C. pbxmail memory, start-up and idle cost (one run each; Linux /proc figures of the daemon process)"
echo
python3 "$MEASURE" table-memory "$RESULTS"
echo
echo "D. a tenant thread's stack after STARTTLS+AUTH and implicit-TLS sessions: $STACK_KB KiB resident of 512 KiB reserved"
echo
log "done"
