#!/usr/bin/env bash
# `make bench`: how fast pbxmail delivers one tenant's mail through one SMTP
# session, with PIPELINING and without, on plain loopback and with an added
# round-trip delay. A benchmark, not a test: it prints figures and asserts no
# timing. It fails only when the bench itself cannot run (a tool is missing,
# mail is not delivered, the daemon dies).
#
#  1. Installs Postfix (for its smtp-sink), iproute2 and python3 from Debian's
#     packages when they are missing (as root; skipped when present). The
#     package is preseeded "No configuration", so no system Postfix starts.
#  2. Spools N messages of about 10 KB for tenant "bench" with the daemon
#     stopped (`pbxmail sendmail`; once, then copied per case), so that on
#     start every message is due at once and, with messages_per_session =
#     1000, rides one session.
#  3. Per case: starts smtp-sink (`-p` withholds PIPELINING), starts the
#     daemon, polls the tenant's queue folder every 5 ms until it is empty,
#     stops the daemon. "steady" is the time from the first delivery seen to
#     the queue being empty: daemon start-up, connect and EHLO are left out
#     (they are in "total").
#  4. Delayed cases: a network namespace made here, whose own loopback gets
#     `tc qdisc ... netem delay D` (RTT = 2·D, each direction passes lo once);
#     the sink and the daemon both run inside it. Where the kernel has no
#     netem (some VMs and sandboxes), a small delaying TCP relay on 127.0.0.1
#     (bench.py proxy, D per direction) stands in, and the table says so. The
#     RTT printed is measured: the median of SMTP NOOP round trips through the
#     same path the daemon uses (plus ping inside the namespace when ping is
#     installed).
#  5. Every case runs BENCH_ROUNDS times, the cases interleaved. Prints one
#     table (each case's median run, its range of msg/s beside it): msg/s,
#     ms per message, and for the delayed cases round trips per message =
#     (time per message) / RTT, raw and net of the loopback case's time per
#     message (local work: spool reads, SHA-256, fsynced envelope records);
#     then the PIPELINING / no PIPELINING ratios.
#  6. Stops every sink, relay and daemon it started (by PID) and deletes its
#     namespace on every exit.
#
# Traffic stays on 127.0.0.1, the host's or the namespace's own.
#
# Environment: BENCH_MESSAGES (loopback cases, default 500),
# BENCH_DELAYED_MESSAGES (default 50), BENCH_DELAY_MS (per direction,
# default 10), BENCH_SIZE (bytes per message, default 10240),
# BENCH_DELAY_MODE (auto | netem | proxy; default auto), BENCH_ROUNDS (each
# case runs this many times, interleaved; the median run is shown with the
# range of msg/s; default 3), BENCH_KEEP=1 keeps
# the work dir, BENCH_DIR (work dir; default a new /tmp/pbxbench.*).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/tests/bench
PBXMAIL=$ROOT/target/release/pbxmail
HELPER=$HERE/bench.py
SINK=/usr/sbin/smtp-sink

N_FAST=${BENCH_MESSAGES:-500}
N_SLOW=${BENCH_DELAYED_MESSAGES:-50}
DELAY_MS=${BENCH_DELAY_MS:-10}
SIZE=${BENCH_SIZE:-10240}
MODE=${BENCH_DELAY_MODE:-auto}
ROUNDS=${BENCH_ROUNDS:-3}
DEADLINE=120 # seconds per case for the queue to drain
T0=$SECONDS

log() { printf '[bench %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { echo "bench: $*" >&2; exit 1; }

for v in N_FAST N_SLOW DELAY_MS SIZE ROUNDS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer"
done
((N_FAST <= 5000 && N_SLOW <= 1000 && DELAY_MS <= 200 && ROUNDS <= 10)) || die "counts or delay too large for a bounded run"
[[ $MODE == auto || $MODE == netem || $MODE == proxy ]] || die "BENCH_DELAY_MODE must be auto, netem or proxy"
[[ -x $PBXMAIL ]] || die "$PBXMAIL is missing; run 'make bench' (it builds first)"

# ---------------------------------------------------------------------------
# 1. Packages
have_tools() {
    [[ -x $SINK ]] && command -v ip >/dev/null && command -v tc >/dev/null &&
        command -v python3 >/dev/null && command -v ss >/dev/null
}
if have_tools; then
    log "packages: already installed"
else
    [[ $(id -u) == 0 ]] || die "tools missing and installing them needs root: apt-get install postfix iproute2 python3"
    PKGS=(postfix iproute2 python3)
    log "packages: installing ${PKGS[*]}"
    APT_TMP=$(mktemp -d)
    chmod 1777 "$APT_TMP"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    TMPDIR=$APT_TMP DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -q >"$APT_TMP/update.log" 2>&1 ||
        { cat "$APT_TMP/update.log" >&2; die "apt-get update failed"; }
    TMPDIR=$APT_TMP DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PKGS[@]}" \
        >"$APT_TMP/install.log" 2>&1 || { tail -n 40 "$APT_TMP/install.log" >&2; die "apt-get install failed"; }
    rm -rf "$APT_TMP"
    # "No configuration" starts no system instance; should one run anyway
    # (a main.cf left from before), stop it: the bench wants no mail server of
    # the machine's own in the way.
    if [[ -f /etc/postfix/main.cf ]] && postfix status >/dev/null 2>&1; then
        log "packages: stopping the system Postfix the package started"
        postfix stop >/dev/null 2>&1 || true
    fi
    have_tools || die "packages installed but the tools are still missing"
fi

# ---------------------------------------------------------------------------
# Work dir, namespace, and the clean-up that undoes both
if [[ -n ${BENCH_DIR:-} ]]; then
    WORK=$BENCH_DIR
    rm -rf "$WORK"
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/pbxbench.XXXXXX)
fi
NS=
PIDS=()
DAEMON_PIDFILE=$WORK/daemon.pid

cleanup() {
    local status=$? pid
    if [[ -s $DAEMON_PIDFILE ]]; then
        pid=$(cat "$DAEMON_PIDFILE")
        kill -TERM "$pid" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $NS ]]; then
        ip netns delete "$NS" 2>/dev/null || true
    fi
    if [[ ${BENCH_KEEP:-} == 1 || $status != 0 ]]; then
        echo "bench: work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# 2. How to delay: netem in a namespace of our own, else the delaying relay
RTT_NOTE=
if [[ $MODE != proxy ]]; then
    [[ $(id -u) == 0 ]] || die "a network namespace needs root (or run with BENCH_DELAY_MODE=proxy)"
    NS=pbxbench$$
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    if err=$(ip netns exec "$NS" tc qdisc add dev lo root netem delay "${DELAY_MS}ms" 2>&1); then
        MODE=netem
        log "delay: netem ${DELAY_MS}ms on lo inside network namespace $NS"
        if command -v ping >/dev/null; then
            ping_rtt=$(ip netns exec "$NS" ping -n -q -c 5 -i 0.2 -W 2 127.0.0.1 2>/dev/null |
                sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p' || true)
            [[ -n $ping_rtt ]] && log "delay: ping 127.0.0.1 inside $NS: average RTT ${ping_rtt} ms"
        fi
    else
        [[ $MODE == netem ]] && die "netem is not available here: $err"
        log "delay: this kernel has no netem ('$err'); using a delaying TCP relay on 127.0.0.1 instead"
        ip netns delete "$NS"
        NS=
        MODE=proxy
    fi
fi
if [[ $MODE == proxy ]]; then
    RTT_NOTE="(delay by a user-space relay holding each chunk ${DELAY_MS} ms per direction; no netem here)"
else
    RTT_NOTE="(delay by netem ${DELAY_MS} ms on the namespace's own lo)"
fi

in_ns() { # runs a command inside the namespace (netem mode), else as is
    if [[ -n $NS ]]; then ip netns exec "$NS" "$@"; else "$@"; fi
}

wait_listening() { # [ns|host] PORT: up to 5 s
    local where=$1 port=$2 i
    for ((i = 0; i < 100; i++)); do
        if [[ $where == ns ]]; then
            ip netns exec "$NS" ss -ltnH "sport = :$port" | grep -q . && return 0
        else
            ss -ltnH "sport = :$port" | grep -q . && return 0
        fi
        sleep 0.05
    done
    die "nothing listens on port $port after 5 s"
}

# ---------------------------------------------------------------------------
# 3. Messages, spooled once per count with the daemon stopped
python3 "$HELPER" message "$WORK/message.txt" "$SIZE"

write_config() { # FILE SPOOL PORT
    cat >"$1" <<EOF
[daemon]
spool_dir = $2
hostname = bench.test
retry_min = 1s
log_level = warn

[tenant:bench]
domains = bench.test
relay = 127.0.0.1:$3
tls = none
auth = none
messages_per_session = 1000
connect_timeout = 10s
command_timeout = 30s
data_timeout = 30s
EOF
}

make_template() { # COUNT
    local n=$1 dir=$WORK/template-$1 i t=$SECONDS
    mkdir -p "$dir"
    write_config "$dir.ini" "$dir/spool" 9
    "$PBXMAIL" check-config -c "$dir.ini" >/dev/null || die "bench configuration refused: $("$PBXMAIL" check-config -c "$dir.ini" 2>&1)"
    for ((i = 1; i <= n; i++)); do
        PBXMAIL_CONFIG=$dir.ini "$PBXMAIL" sendmail -i -f pbx@bench.test "ext$i@sink.test" <"$WORK/message.txt" ||
            die "sendmail failed for message $i"
    done
    local queued
    queued=$(find "$dir/spool/queue/bench" -name '*.env' | wc -l)
    [[ $queued == "$n" ]] || die "spooled $n messages but $queued are queued"
    log "spooled $n messages of $(wc -c <"$WORK/message.txt") bytes in $((SECONDS - t))s"
}
make_template "$N_FAST"
[[ $N_SLOW == "$N_FAST" ]] || make_template "$N_SLOW"
[[ $N_FAST -ge 20 && $N_SLOW -ge 20 ]] && W=20 || W=$N_SLOW
[[ $W == "$N_FAST" || $W == "$N_SLOW" ]] || make_template "$W"

# ---------------------------------------------------------------------------
# 4. The cases
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

run_case() { # NAME COUNT pipelining|plain loopback|delayed RECORD BASELINE
    local name=$1 n=$2 pipe=$3 path=$4 record=$5 baseline=${6:-}
    local dir port relay_port sink_pid proxy_pid= where=host rtt= opts=(-u nobody -c)
    dir=$WORK/case-$(echo "$name" | tr -c 'a-zA-Z0-9\n' '-')-r$round
    mkdir -p "$dir"
    [[ $pipe == plain ]] && opts+=(-p)
    port=$(python3 "$HELPER" free-port)
    relay_port=$port
    if [[ $path == delayed && $MODE == netem ]]; then
        where=ns
        ip netns exec "$NS" "$SINK" "${opts[@]}" "127.0.0.1:$port" 256 >"$dir/sink.out" 2>&1 &
    else
        "$SINK" "${opts[@]}" "127.0.0.1:$port" 256 >"$dir/sink.out" 2>&1 &
    fi
    sink_pid=$!
    PIDS+=("$sink_pid")
    wait_listening "$where" "$port"
    if [[ $path == delayed && $MODE == proxy ]]; then
        relay_port=$(python3 "$HELPER" free-port)
        python3 "$HELPER" proxy "$relay_port" "$port" "$DELAY_MS" 600 >"$dir/proxy.out" 2>&1 &
        proxy_pid=$!
        PIDS+=("$proxy_pid")
        wait_listening host "$relay_port"
    fi
    if [[ $path == delayed ]]; then
        if [[ $where == ns ]]; then
            rtt=$(ip netns exec "$NS" timeout 30 python3 "$HELPER" rtt 127.0.0.1 "$relay_port" 20)
        else
            rtt=$(timeout 30 python3 "$HELPER" rtt 127.0.0.1 "$relay_port" 20)
        fi
    fi

    cp -a "$WORK/template-$n/spool" "$dir/spool"
    write_config "$dir/pbxmail.ini" "$dir/spool" "$relay_port"
    local daemon=("$PBXMAIL" daemon -c "$dir/pbxmail.ini")
    [[ $where == ns ]] && daemon=(ip netns exec "$NS" "${daemon[@]}")
    local line
    line=$(python3 "$HELPER" run --case "$name" --spool "$dir/spool" --tenant bench --count "$n" \
        --deadline "$DEADLINE" --log "$dir/daemon.log" --pidfile "$DAEMON_PIDFILE" \
        --rtt_ms "$rtt" --baseline "$baseline" -- "${daemon[@]}") || {
        echo "$line"
        echo "--- daemon log (tail):"
        tail -n 20 "$dir/daemon.log"
        die "case '$name' did not finish"
    }

    # What the sink counted (its counters end with "mesg=N") and what pbxmail
    # still holds: every message delivered once, nothing left.
    kill -TERM "$sink_pid" 2>/dev/null || true
    wait "$sink_pid" 2>/dev/null || true
    [[ -n $proxy_pid ]] && { kill -TERM "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }
    local got left
    got=$(tr '\r' '\n' <"$dir/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
    left=$("$PBXMAIL" queue -c "$dir/pbxmail.ini" --json | tr -d ' \n')
    [[ $left == "[]" ]] || die "case '$name': pbxmail still holds mail: $left"
    [[ ${got:-0} == "$n" ]] || die "case '$name': the sink received ${got:-0} messages, expected $n"
    if [[ -s $dir/daemon.log ]]; then
        log "case '$name': the daemon logged (warn level):"
        sed 's/^/  | /' "$dir/daemon.log" | head -n 10
    fi
    if [[ $record == yes ]]; then
        echo "$line" >>"$RESULTS"
        log "case '$name': $n messages delivered, sink counted $got${rtt:+, RTT ${rtt} ms}"
    fi
}

log "warm-up: $W messages (not reported)"
round=0
run_case "warm-up" "$W" pipelining loopback no
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    run_case "loopback, PIPELINING" "$N_FAST" pipelining loopback yes
    run_case "loopback, no PIPELINING" "$N_FAST" plain loopback yes
    run_case "delayed, PIPELINING" "$N_SLOW" pipelining delayed yes "loopback, PIPELINING"
    run_case "delayed, no PIPELINING" "$N_SLOW" plain delayed yes "loopback, no PIPELINING"
done

# ---------------------------------------------------------------------------
# 5. Figures
echo
echo "pbxmail bench: one tenant, one SMTP session, $SIZE-byte messages, Postfix smtp-sink as relay"
echo "delayed cases: RTT ~ $((2 * DELAY_MS)) ms $RTT_NOTE"
echo "steady = first delivery seen .. queue empty (daemon start-up, connect, EHLO excluded; in total)"
echo "RT/msg = ms per message / measured RTT; net = after subtracting the loopback case's ms per message"
echo
python3 "$HELPER" table "$RESULTS"
echo
log "done"
