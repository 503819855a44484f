#!/usr/bin/env bash
# `make bench`, part 4: what the journal archive costs. One tenant, N
# messages of about 10 KB to Postfix's smtp-sink on 127.0.0.1, delivered
# with `archive = no` and with `archive = yes` (every sender archived: a
# fsynced Maildir copy plus a fsynced journal record per message), the same
# spool-then-start method as run.sh: the messages are spooled once with the
# daemon stopped, copied per case, and timed from the first delivery seen to
# the queue being empty. Prints msg/s for both and their ratio. A benchmark,
# not a test: it fails only when the bench cannot run (mail not delivered,
# archive incomplete or failing `archive verify`).
#
# Environment: BENCH_ARCHIVE_MESSAGES (default 500), BENCH_SIZE (bytes per
# message, default 10240), BENCH_ROUNDS (each case this many times,
# interleaved; the median is shown with the range; default 3), BENCH_KEEP=1
# keeps the work dir.
set -euo pipefail
BENCH_NAME=archive-bench
# shellcheck source=tests/bench/lib.sh
source "$(dirname "$0")/lib.sh"
HELPER=$HERE/bench.py

N=${BENCH_ARCHIVE_MESSAGES:-500}
SIZE=${BENCH_SIZE:-10240}
ROUNDS=${BENCH_ROUNDS:-3}
DEADLINE=120
for v in N SIZE ROUNDS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer"
done
((N <= 5000 && ROUNDS <= 10)) || die "counts too large for a bounded run"
[[ -x $PBXMAIL ]] || die "$PBXMAIL is missing; run 'make bench' (it builds first)"
ensure_packages

WORK=$(mktemp -d /tmp/pbxbench-archive.XXXXXX)
PIDS=()
DAEMON_PIDFILE=$WORK/daemon.pid
cleanup() {
    local status=$? pid
    [[ -s $DAEMON_PIDFILE ]] && kill -TERM "$(cat "$DAEMON_PIDFILE")" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ ${BENCH_KEEP:-} == 1 || $status != 0 ]]; then
        echo "$BENCH_NAME: work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

write_config() { # FILE SPOOL PORT ARCHIVE(yes|no) ARCHIVE_DIR
    cat >"$1" <<INI
[daemon]
spool_dir = $2
archive_dir = $5
control_socket = $(dirname "$1")/control.sock
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
archive = $4
archive_users = *
INI
}

python3 "$HELPER" message "$WORK/message.txt" "$SIZE"
TEMPLATE=$WORK/template
mkdir -p "$TEMPLATE"
write_config "$TEMPLATE/pbxmail.ini" "$TEMPLATE/spool" 9 no "$TEMPLATE/archive"
t=$SECONDS
for ((i = 1; i <= N; i++)); do
    PBXMAIL_CONFIG=$TEMPLATE/pbxmail.ini "$PBXMAIL" sendmail -i -f "$((100 + i % 20))@bench.test" "ext$i@sink.test" \
        <"$WORK/message.txt" || die "sendmail failed for message $i"
done
log "spooled $N messages of $(wc -c <"$WORK/message.txt") bytes from 20 extensions in $((SECONDS - t))s"

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
run_case() { # ARCHIVE(yes|no) ROUND
    local archive=$1 round=$2 dir port sink_pid line got left
    dir=$WORK/archive-$archive-r$round
    mkdir -p "$dir"
    port=$(python3 "$HELPER" free-port)
    "$SINK" -u nobody -c "127.0.0.1:$port" 256 >"$dir/sink.out" 2>&1 &
    sink_pid=$!
    PIDS+=("$sink_pid")
    wait_port "$port"
    cp -a "$TEMPLATE/spool" "$dir/spool"
    write_config "$dir/pbxmail.ini" "$dir/spool" "$port" "$archive" "$dir/archive"
    line=$(python3 "$HELPER" run --case "archive = $archive" --spool "$dir/spool" --tenant bench --count "$N" \
        --deadline "$DEADLINE" --log "$dir/daemon.log" --pidfile "$DAEMON_PIDFILE" \
        -- "$PBXMAIL" daemon -c "$dir/pbxmail.ini") || {
        echo "$line"; tail -n 20 "$dir/daemon.log"; die "case archive=$archive did not finish"
    }
    kill -TERM "$sink_pid" 2>/dev/null || true
    wait "$sink_pid" 2>/dev/null || true
    got=$(tr '\r' '\n' <"$dir/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
    left=$("$PBXMAIL" queue -c "$dir/pbxmail.ini" --json | tr -d ' \n')
    [[ $left == "[]" ]] || die "archive=$archive: pbxmail still holds mail"
    [[ ${got:-0} == "$N" ]] || die "archive=$archive: the sink received ${got:-0} messages, expected $N"
    if [[ $archive == yes ]]; then
        local records
        records=$(wc -l <"$dir/archive/bench/journal")
        [[ $records == "$N" ]] || die "archive=yes: $records journal records, expected $N"
        "$PBXMAIL" archive verify -c "$dir/pbxmail.ini" >/dev/null || die "archive=yes: archive verify fails"
        log "archive = yes: $N messages delivered and archived ($(du -sh "$dir/archive" | cut -f1) on disk), verify ok"
    else
        [[ ! -e $dir/archive ]] || die "archive=no wrote an archive"
        log "archive = no: $N messages delivered"
    fi
    echo "$line" >>"$RESULTS"
    rm -rf "$dir/spool" "$dir/archive"
}

log "warm-up (not reported)"
run_case no 0
: >"$RESULTS"
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    run_case no "$round"
    run_case yes "$round"
done

echo
echo "pbxmail archive bench: one tenant, one SMTP session, $N messages of $SIZE bytes, Postfix smtp-sink on 127.0.0.1"
echo "steady = first delivery seen .. queue empty; median of $ROUNDS runs, range in brackets"
python3 - "$RESULTS" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["case"], []).append(r["msg_per_s"])
med = {}
for case in ("archive = no", "archive = yes"):
    v = sorted(runs[case])
    med[case] = statistics.median(v)
    print(f"  {case:<14} {med[case]:8.1f} msg/s  [{v[0]:.1f} .. {v[-1]:.1f}]  {1000 / med[case]:6.2f} ms/msg")
ratio = med["archive = yes"] / med["archive = no"]
print(f"  archiving on / off: {ratio:.2f} (archiving costs {1000 / med['archive = yes'] - 1000 / med['archive = no']:.2f} ms per message)")
PY
echo
log "done"
