# shellcheck shell=bash
# Shared by tests/bench/isolation.sh and tests/bench/memory.sh (sourced, not
# run): logging, the package check/install and small waits. The caller sets
# BENCH_NAME before sourcing.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/bench
PBXMAIL=${BENCH_PBXMAIL:-$ROOT/target/release/pbxmail}
MEASURE=$HERE/measure.py
SINK=/usr/sbin/smtp-sink
T0=$SECONDS

log() { printf '[%s %3ds] %s\n' "$BENCH_NAME" "$((SECONDS - T0))" "$*"; }
die() { echo "$BENCH_NAME: $*" >&2; exit 1; }

# Postfix (smtp-sink, and the private instance of isolation.sh) and python3
# from Debian's packages, when missing. Preseeded "No configuration": the
# package then starts no system instance; if one runs anyway it is stopped.
ensure_packages() {
    have() {
        [[ -x $SINK ]] && command -v postfix >/dev/null && command -v postconf >/dev/null &&
            command -v postmap >/dev/null && command -v python3 >/dev/null
    }
    if have; then
        log "packages: already installed (Postfix $(postconf -d -h mail_version 2>/dev/null))"
        return
    fi
    [[ $(id -u) == 0 ]] || die "tools missing and installing them needs root: apt-get install postfix python3"
    local pkgs=(postfix python3) apt_tmp
    log "packages: installing ${pkgs[*]}"
    apt_tmp=$(mktemp -d)
    chmod 1777 "$apt_tmp"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    TMPDIR=$apt_tmp DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -q >"$apt_tmp/update.log" 2>&1 ||
        { cat "$apt_tmp/update.log" >&2; die "apt-get update failed"; }
    TMPDIR=$apt_tmp DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${pkgs[@]}" \
        >"$apt_tmp/install.log" 2>&1 || { tail -n 40 "$apt_tmp/install.log" >&2; die "apt-get install failed"; }
    rm -rf "$apt_tmp"
    stop_system_postfix
    have || die "packages installed but the tools are still missing"
}

# The machine's own Postfix must not run (the bench's instance is private).
stop_system_postfix() {
    if [[ -f /etc/postfix/main.cf ]] && postfix status >/dev/null 2>&1; then
        log "packages: stopping the system Postfix the package started"
        postfix stop >/dev/null 2>&1 || true
    fi
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT, at most 5 s.
wait_port() {
    python3 - "$1" <<'EOF' || die "nothing listens on 127.0.0.1:$1 after 5 s"
import socket, sys, time
end = time.monotonic() + 5
while time.monotonic() < end:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
EOF
}

# count_env DIR: queued pbxmail messages in a tenant folder.
count_env() { find "$1" -maxdepth 1 -name '*.env' 2>/dev/null | wc -l; }
