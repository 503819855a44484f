#!/usr/bin/env bash
# Part of `make bench` (figures A, issue 5): tenant isolation and throughput,
# pbxmail beside Postfix 3.7 on the same machine in the same run. A benchmark,
# not a test: it prints figures and asserts no timing; it fails only when the
# bench cannot run (a tool missing, mail not delivered, a daemon dying).
#
# Work: 10 tenants (t01..t10, domains tNN.test) x 200 messages of ~10 KB,
# each tenant relaying to its own Postfix smtp-sink on 127.0.0.1. Two runs per
# system: all healthy; then t10's relay is a black hole (measure.py blackhole:
# accepts TCP, never greets), both systems waiting up to 30 s for a greeting.
#
# pbxmail: the 2,000 messages are spooled once with the daemon stopped
# (`pbxmail sendmail`, 8 in parallel) and the spool copied per run; the clock
# starts when the daemon is exec'd (start-up and index loading included) and a
# tenant is done when its sink has counted 200 messages and its queue folder
# has no .env left. messages_per_session = 50; one session per tenant at a
# time (pbxmail's design).
#
# Postfix: a private instance per run (own config, queue and data directories
# under the work dir; no inet listener at all; Debian's defaults otherwise:
# default_process_limit 100, destination concurrency 20). The messages are
# submitted with Postfix's sendmail -C (8 in parallel) and parked in the hold
# queue by a header_checks HOLD rule, so submission is outside the clock. The
# clock starts at `postsuper -H ALL; postqueue -f` (release, flush); a tenant is
# done when its sink has counted 200 messages. Each sender domain is relayed
# to its sink by sender_dependent_relayhost_maps (hash:), `@tNN.test
# [127.0.0.1]:PORT`; smtp_connect_timeout = smtp_helo_timeout = 30s. Afterwards
# `postqueue -j` must show no healthy tenant's mail left.
#
# Memory: every 50 ms the sum of VmRSS (and of Pss, which splits shared pages
# between processes) over the system's processes: pbxmail's daemon; Postfix's
# master and all its descendants (qmgr, smtp, cleanup, ...). The maximum of
# the sums is reported; for pbxmail also its VmHWM at the end.
#
# Everything listens and connects on 127.0.0.1 only; every wait is bounded.
# Stops every sink, black hole, daemon and Postfix master it started (by PID /
# `postfix -c DIR stop`) on every exit; never touches a system Postfix.
#
# Every case runs ISO_ROUNDS times (default 3), the four interleaved; the
# table shows each case's median run and the range.
#
# Environment: ISO_MESSAGES (per tenant, default 200), ISO_ROUNDS, ISO_SIZE (bytes,
# default 10240), ISO_DEADLINE (seconds per run, default 300), BENCH_KEEP=1
# keeps the work dir, BENCH_PBXMAIL (binary; default target/release/pbxmail).
set -euo pipefail
BENCH_NAME=isolation
# shellcheck source=tests/bench/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

PER=${ISO_MESSAGES:-200}
ROUNDS=${ISO_ROUNDS:-3}
SIZE=${ISO_SIZE:-10240}
DEADLINE=${ISO_DEADLINE:-300}
NT=10
for v in PER SIZE DEADLINE ROUNDS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer"
done
((PER <= 2000 && SIZE <= 10000000 && DEADLINE <= 1200 && ROUNDS <= 10)) || die "counts too large for a bounded run"
[[ -x $PBXMAIL ]] || die "$PBXMAIL is missing; run 'make bench' (it builds first)"
[[ $(id -u) == 0 ]] || die "needs root: Postfix's master starts as root"
ensure_packages
stop_system_postfix

TENANTS=()
for ((i = 1; i <= NT; i++)); do TENANTS+=("$(printf 't%02d' "$i")"); done
ALL=$(IFS=,; echo "${TENANTS[*]}")
NINE=$(IFS=,; echo "${TENANTS[*]:0:NT-1}")
BH_TENANT=${TENANTS[NT - 1]}

WORK=$(mktemp -d /tmp/pbxiso.XXXXXX)
chmod 755 "$WORK" # Postfix's daemons (user postfix) must reach their dirs
PIDS=()
PF_DIRS=()
DAEMON_PIDFILE=$WORK/daemon.pid
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

pf_stop() { # DIR: stops a private instance, waits for its master to go
    local dir=$1 master i
    master=$(tr -d ' ' <"$dir/queue/pid/master.pid" 2>/dev/null || true)
    timeout 30 postfix -c "$dir/etc" stop >/dev/null 2>&1 ||
        timeout 10 postfix -c "$dir/etc" abort >/dev/null 2>&1 || true
    for ((i = 0; i < 150; i++)); do
        [[ -z $master ]] || ! kill -0 "$master" 2>/dev/null && break
        sleep 0.1
    done
}

cleanup() {
    local status=$? pid dir
    set +e
    trap - EXIT INT TERM
    [[ -s $DAEMON_PIDFILE ]] && kill -TERM "$(cat "$DAEMON_PIDFILE")" 2>/dev/null
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    for dir in "${PF_DIRS[@]}"; do
        [[ -f $dir/queue/pid/master.pid ]] && pf_stop "$dir"
    done
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

python3 "$HERE/bench.py" message "$WORK/message.txt" "$SIZE"
BYTES=$(wc -c <"$WORK/message.txt")

# start_sinks DIR BLACKHOLE(yes|no): one smtp-sink per tenant (or a black hole
# for the last); sets PORT_OF[tenant] and BH_PID.
declare -A PORT_OF
BH_PID=
start_sinks() {
    local dir=$1 bh=$2 i t pid
    mkdir -p "$dir/sinks"
    mapfile -t ports < <(python3 "$MEASURE" ports "$NT")
    BH_PID=
    for ((i = 0; i < NT; i++)); do
        t=${TENANTS[i]}
        PORT_OF[$t]=${ports[i]}
        if [[ $bh == yes && $t == "$BH_TENANT" ]]; then
            python3 "$MEASURE" blackhole "${ports[i]}" "$((DEADLINE + 60))" >"$dir/sinks/blackhole.log" 2>&1 &
            BH_PID=$!
        else
            "$SINK" -u nobody -c "127.0.0.1:${ports[i]}" 256 >"$dir/sinks/$t.out" 2>&1 &
        fi
        pid=$!
        PIDS+=("$pid")
    done
    for ((i = 0; i < NT; i++)); do wait_port "${ports[i]}"; done
}
stop_sinks() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
check_sinks() { # DIR RUN: every healthy sink got exactly PER messages
    local dir=$1 run=$2 t got
    for t in "${TENANTS[@]}"; do
        [[ $run == bh && $t == "$BH_TENANT" ]] && continue
        got=$(tr '\r' '\n' <"$dir/sinks/$t.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
        [[ ${got:-0} == "$PER" ]] || die "$dir: the sink of $t counted ${got:-0} messages, expected $PER"
    done
}

# ---------------------------------------------------------------------------
# pbxmail
pbx_config() { # FILE SPOOL: tenants relay to PORT_OF (or port 9 when unset)
    {
        cat <<EOF
[daemon]
spool_dir = $2
control_socket = $(dirname "$1")/control.sock
hostname = bench.test
retry_min = 1m
retry_max = 1h
log_level = warn
EOF
        local t
        for t in "${TENANTS[@]}"; do
            cat <<EOF

[tenant:$t]
domains = $t.test
relay = 127.0.0.1:${PORT_OF[$t]:-9}
tls = none
auth = none
messages_per_session = 50
connect_timeout = 30s
command_timeout = 30s
data_timeout = 30s
EOF
        done
    } >"$1"
}

TPL=$WORK/pbxmail-template
mkdir -p "$TPL"
pbx_config "$TPL/pbxmail.ini" "$TPL/spool"
"$PBXMAIL" check-config -c "$TPL/pbxmail.ini" >/dev/null ||
    die "configuration refused: $("$PBXMAIL" check-config -c "$TPL/pbxmail.ini" 2>&1)"
t=$SECONDS
for tn in "${TENANTS[@]}"; do
    for ((i = 1; i <= PER; i++)); do echo "$tn $i"; done
done | PBXMAIL_CONFIG=$TPL/pbxmail.ini MSG=$WORK/message.txt PBX=$PBXMAIL timeout 600 \
    xargs -P 8 -n 2 sh -c '"$PBX" sendmail -i -f "pbx@$0.test" "ext$1@sink.test" <"$MSG"' ||
    die "pbxmail sendmail failed"
for tn in "${TENANTS[@]}"; do
    [[ $(count_env "$TPL/spool/queue/$tn") == "$PER" ]] || die "spooled $PER for $tn but $(count_env "$TPL/spool/queue/$tn") are queued"
done
log "pbxmail: spooled $((NT * PER)) messages of $BYTES bytes (daemon stopped) in $((SECONDS - t))s"

pbx_run() { # RUN(healthy|bh)
    local run=$1 dir=$WORK/pbxmail-$1-r$round label healthy bh=no
    [[ $run == bh ]] && bh=yes
    mkdir -p "$dir"
    start_sinks "$dir" "$bh"
    cp -a "$TPL/spool" "$dir/spool"
    pbx_config "$dir/pbxmail.ini" "$dir/spool"
    if [[ $run == bh ]]; then label="one black-holed" healthy=$NINE; else label=healthy healthy=$ALL; fi
    log "pbxmail, $label: daemon started; waiting for the healthy tenants"
    python3 "$MEASURE" watch --system pbxmail --run "$label" --tenants "$ALL" --healthy "$healthy" \
        --compare "$NINE" --sinks "$dir/sinks" --expect "$PER" --spool "$dir/spool" \
        --pidfile "$DAEMON_PIDFILE" --log "$dir/daemon.log" ${BH_PID:+--blackhole-pid "$BH_PID"} \
        --deadline "$DEADLINE" --out "$RESULTS" -- "$PBXMAIL" daemon -c "$dir/pbxmail.ini" >"$dir/watch.json" ||
        { cat "$dir/watch.json"; tail -n 20 "$dir/daemon.log"; die "pbxmail, $label: did not finish"; }
    stop_sinks
    check_sinks "$dir" "$run"
    if [[ -s $dir/daemon.log ]]; then
        # In the black-holed run the black hole is stopped before the daemon
        # (else SIGTERM waits out the stalled greeting), hence t10's
        # "connection closed by the relay".
        log "pbxmail, $label: the daemon logged (warn level; first 5 lines):"
        sed 's/^/  | /' "$dir/daemon.log" | head -n 5
    fi
    log "pbxmail, $label: done ($(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("9 healthy tenants in %.3f s" % r["nine_s"])' "$dir/watch.json"))"
}

# ---------------------------------------------------------------------------
# Postfix: one private instance per run
pf_create() { # DIR: config, queue, data; relays per sender domain to PORT_OF
    local dir=$1 conf=$1/etc t
    mkdir -p "$conf" "$dir/queue" "$dir/data"
    cat >"$conf/main.cf" <<EOF
# Private Postfix instance of tests/bench/isolation.sh: no listener, relays
# each sender domain to its own sink on 127.0.0.1, nothing else.
compatibility_level = 3.6
config_directory = $conf
queue_directory = $dir/queue
data_directory = $dir/data
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
mydestination =
relay_domains =
relayhost =
local_transport = error:5.1.1 no local delivery in the bench instance
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtp_dns_support_level = disabled
smtp_tls_security_level = none
sender_dependent_relayhost_maps = hash:$conf/sender_relay
smtp_connect_timeout = 30s
smtp_helo_timeout = 30s
# Park submitted mail in the hold queue: submission stays outside the clock.
header_checks = regexp:$conf/header_checks
EOF
    cat >"$conf/master.cf" <<'EOF'
# service  type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    echo '/^Subject: pbxmail bench/ HOLD bench: released by the clock start' >"$conf/header_checks"
    for t in "${TENANTS[@]}"; do
        echo "@$t.test [127.0.0.1]:${PORT_OF[$t]}"
    done >"$conf/sender_relay"
    [[ -f /etc/postfix/dynamicmaps.cf ]] && cp /etc/postfix/dynamicmaps.cf "$conf/"
    postmap -c "$conf" "hash:$conf/sender_relay" || die "postmap failed"
    chown postfix:postfix "$dir/data"
    touch "$dir/maillog"
    PF_DIRS+=("$dir")
    timeout 60 postfix -c "$conf" check >"$dir/check.log" 2>&1 ||
        { cat "$dir/check.log" "$dir/maillog" >&2; die "postfix check failed"; }
    timeout 60 postfix -c "$conf" start >"$dir/start.log" 2>&1 ||
        { cat "$dir/start.log" "$dir/maillog" >&2; die "postfix start failed"; }
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $dir/queue/pid/master.pid ]] && break
        sleep 0.1
    done
    [[ -s $dir/queue/pid/master.pid ]] || die "Postfix's master did not start"
}

pf_queue_count() { # DIR SUBQUEUE
    find "$1/queue/$2" -type f 2>/dev/null | wc -l
}

pf_run() { # RUN(healthy|bh)
    local run=$1 dir=$WORK/postfix-$1-r$round label healthy bh=no i t n
    [[ $run == bh ]] && bh=yes
    if [[ $run == bh ]]; then label="one black-holed" healthy=$NINE; else label=healthy healthy=$ALL; fi
    mkdir -p "$dir"
    start_sinks "$dir" "$bh"
    pf_create "$dir"
    t=$SECONDS
    for tn in "${TENANTS[@]}"; do
        for ((i = 1; i <= PER; i++)); do echo "$tn $i"; done
    done | CONF=$dir/etc MSG=$WORK/message.txt timeout 600 \
        xargs -P 8 -n 2 sh -c 'sendmail -C "$CONF" -i -f "pbx@$0.test" "ext$1@sink.test" <"$MSG"' ||
        die "Postfix sendmail failed"
    # Wait (bounded) until pickup and cleanup have put everything on hold.
    for ((i = 0; i < 1200; i++)); do
        n=$(pf_queue_count "$dir" hold)
        [[ $n == $((NT * PER)) ]] && break
        sleep 0.1
    done
    [[ $n == $((NT * PER)) ]] || die "Postfix holds $n messages, expected $((NT * PER)) (see $dir/maillog)"
    log "postfix, $label: $n messages submitted and on hold in $((SECONDS - t))s; releasing"
    local conf=$dir/etc
    python3 "$MEASURE" watch --system postfix --run "$label" --tenants "$ALL" --healthy "$healthy" \
        --compare "$NINE" --sinks "$dir/sinks" --expect "$PER" \
        --master-pidfile "$dir/queue/pid/master.pid" --deadline "$DEADLINE" --out "$RESULTS" \
        -- sh -c "postsuper -c '$conf' -H ALL 2>/dev/null && postqueue -c '$conf' -f" >"$dir/watch.json" ||
        { cat "$dir/watch.json"; tail -n 20 "$dir/maillog"; die "postfix, $label: did not finish"; }
    # No healthy tenant's mail may be left in the queue.
    local left
    left=$(postqueue -c "$conf" -j | python3 -c '
import json, sys
left = {}
for line in sys.stdin:
    if line.strip():
        s = json.loads(line)["sender"]
        left[s] = left.get(s, 0) + 1
print(" ".join(f"{k}={v}" for k, v in sorted(left.items())))')
    [[ -n $BH_PID ]] && kill -TERM "$BH_PID" 2>/dev/null
    pf_stop "$dir"
    stop_sinks
    check_sinks "$dir" "$run"
    local expect_left=""
    [[ $run == bh ]] && expect_left="pbx@$BH_TENANT.test=$PER"
    [[ $left == "$expect_left" ]] || die "postfix, $label: the queue still holds: '$left' (expected '$expect_left')"
    log "postfix, $label: done ($(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("9 healthy tenants in %.3f s" % r["nine_s"])' "$dir/watch.json")); left queued: ${left:-nothing}"
}

# ---------------------------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    pbx_run healthy
    pbx_run bh
    pf_run healthy
    pf_run bh
done

echo
echo "A. Tenant isolation and throughput: $NT tenants x $PER messages of $BYTES bytes, one smtp-sink per"
echo "   tenant on 127.0.0.1; 'one black-holed': $BH_TENANT's relay accepts TCP and never greets (30 s timeouts)."
echo "   pbxmail: clock from daemon exec (mail spooled while stopped); Postfix $(postconf -d -h mail_version):"
echo "   clock from 'postsuper -H ALL; postqueue -f' (mail submitted onto hold first). A tenant is done when"
echo "   its sink has counted all $PER (pbxmail: and its queue folder is empty). 'healthy s' = when the last"
echo "   of t01..t09 was done (the 9 tenants healthy in both runs); 'all 10 s' = all ten (healthy run only);"
echo "   msg/s = $(((NT - 1) * PER)) / healthy s; ratio = black-holed run / healthy run (goal <= 1.05)."
echo "   peak RSS / PSS = maximum over 50 ms samples of the sum over the system's processes (pbxmail: the"
echo "   daemon; Postfix: master and all its children); procs = most processes seen in one sample."
echo "   $ROUNDS rounds, the four cases interleaved; each case's median run (by healthy s) is shown with the"
echo "   range of healthy s; memory columns are the worst of the runs."
echo
python3 "$MEASURE" table-isolation "$RESULTS"
echo
log "done"
