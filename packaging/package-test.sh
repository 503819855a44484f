#!/usr/bin/env bash
# make package-test: builds the packages, lints them, and installs the .deb
# into a clean Debian 12 (minbase) root made with debootstrap, where it
# checks files, modes, user and conffile, runs the daemon as the unit does,
# delivers one message to a loopback SMTP sink, then removes and purges.
# Needs root and Debian's package mirror. Every wait is bounded; the chroot's
# mounts, the sink and the daemon are cleaned up by a trap.
#
# PBXMAIL_KEEP_CHROOT=1 keeps the chroot (target/packaging/chroot) for a look.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$ROOT/target/packaging
OUT=${PBXMAIL_PKG_OUT:-$ROOT/target/packages}
CH=$WORK/chroot
START=$(date +%s)
FAILS=0
WARNS=0
PASSES=0
SINK_PID=
DAEMON_PID=
MOUNTS=()

log() { echo "[$(($(date +%s) - START))s] $*"; }
pass() { PASSES=$((PASSES + 1)); echo "  ok   $*"; }
fail() { FAILS=$((FAILS + 1)); echo "  FAIL $*"; }
warn() { WARNS=$((WARNS + 1)); echo "  WARN $*"; }
check() { # check DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
in_ch() { chroot "$CH" "$@"; }

cleanup() {
    set +e
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"; sleep 1; kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    if [ -n "$SINK_PID" ] && kill -0 "$SINK_PID" 2>/dev/null; then kill "$SINK_PID"; fi
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null
    done
    # Never rm -rf through a mount that failed to go away.
    if [ "${PBXMAIL_KEEP_CHROOT:-0}" != 1 ] && [ -d "$CH" ] && ! grep -q " $CH/" /proc/mounts; then
        rm -rf "$CH"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "package-test needs root (debootstrap, chroot, dpkg)" >&2; exit 1; }

need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null && return 0
    log "installing $2"
    timeout 300 apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "$2" >/dev/null
}
need debootstrap debootstrap
need lintian lintian
need rpmbuild rpm
need python3 python3
command -v rpmlint >/dev/null || need rpmlint rpmlint || log "rpmlint not available; skipped"

# ---------------------------------------------------------------- build
log "building .deb and .rpm for the host architecture"
PBXMAIL_ARCHES=$(dpkg --print-architecture) bash packaging/build.sh all
ARCH=$(dpkg --print-architecture)
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
DEB=$OUT/pbxmail_${VERSION}-1_$ARCH.deb
RPM=$OUT/pbxmail-$VERSION-1.$(uname -m).rpm

# ---------------------------------------------------------------- lint
log "lintian $(basename "$DEB")"
if lintian --fail-on error --display-info "$DEB" 2>&1 | grep -v 'running with root privileges' | tee "$WORK/lintian.txt"; then
    pass "lintian: no errors ($(grep -c '^W:' "$WORK/lintian.txt" || true) warnings, $(grep -c '^I:' "$WORK/lintian.txt" || true) infos)"
else
    fail "lintian reported errors"
fi

log "rpm $(basename "$RPM")"
rpm -qpl "$RPM" >"$WORK/rpm-files.txt" 2>/dev/null
for f in /usr/sbin/pbxmail /usr/sbin/sendmail /usr/bin/mailq /etc/pbxmail/pbxmail.ini \
    /usr/lib/systemd/system/pbxmail.service /usr/lib/sysusers.d/pbxmail.conf \
    /usr/lib/tmpfiles.d/pbxmail.conf /var/spool/pbxmail /var/lib/pbxmail/archive \
    /var/lib/pbxmail/oauth /usr/share/man/man8/pbxmail.8.gz /usr/share/man/man5/pbxmail.ini.5.gz; do
    check "rpm lists $f" grep -qx "$f" "$WORK/rpm-files.txt"
done
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" 2>/dev/null >"$WORK/rpm-modes.txt"
check "rpm: pbxmail.ini is %config(noreplace) 0640 root:pbxmail" \
    grep -Eq '^-rw-r----- root:pbxmail cn /etc/pbxmail/pbxmail.ini$' "$WORK/rpm-modes.txt"
check "rpm: spool 2750 pbxmail" grep -Eq '^drwxr-s--- pbxmail:pbxmail +/var/spool/pbxmail$' "$WORK/rpm-modes.txt"
check "rpm: spool queue 2770 pbxmail" grep -Eq '^drwxrws--- pbxmail:pbxmail +/var/spool/pbxmail/queue$' "$WORK/rpm-modes.txt"
check "rpm: binary setgid 2755 root:pbxmail" grep -Eq '^-rwxr-sr-x root:pbxmail +/usr/sbin/pbxmail$' "$WORK/rpm-modes.txt"
check "rpm: oauth 0700 pbxmail" grep -Eq '^drwx------ pbxmail:pbxmail +/var/lib/pbxmail/oauth$' "$WORK/rpm-modes.txt"
rpm -qp --scripts "$RPM" 2>/dev/null >"$WORK/rpm-scripts.txt"
check "rpm scripts: %pre creates the pbxmail user" grep -q 'useradd -r -g pbxmail' "$WORK/rpm-scripts.txt"
check "rpm scripts: %preun disables the unit on erase" grep -q 'disable --now pbxmail.service' "$WORK/rpm-scripts.txt"
echo "  rpm Provides/Conflicts: $(rpm -qp --provides "$RPM" 2>/dev/null | paste -sd' ') / $(rpm -qp --conflicts "$RPM" 2>/dev/null | paste -sd' ')"
if command -v rpmlint >/dev/null; then
    timeout 120 rpmlint -r packaging/rpm/pbxmail.rpmlintrc "$RPM" >"$WORK/rpmlint.txt" 2>&1 || true
    summary=$(grep -E 'checked; [0-9]+ errors' "$WORK/rpmlint.txt" | tail -1)
    if [[ $summary =~ checked\;\ 0\ errors ]]; then
        pass "rpmlint: no errors (${summary# })"
    else
        fail "rpmlint: ${summary:-no summary} ($(grep -c ': E: ' "$WORK/rpmlint.txt") E: lines; full output: $WORK/rpmlint.txt)"
        grep ': E: ' "$WORK/rpmlint.txt" | head -10 | sed 's/^/    /'
    fi
else
    warn "rpmlint is not installed: the .rpm was not linted"
fi

# ---------------------------------------------------------------- chroot
# The mirror this machine's apt uses (deb822 .sources or one-line lists).
MIRROR=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' |
    grep -v security | head -1)
[ -n "$MIRROR" ] || MIRROR=$(grep -hsE '^deb +(\[[^]]*\] +)?https?://' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
    grep -v security | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}' | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
rm -rf "$CH"
mkdir -p "$WORK/debootstrap-cache"
log "debootstrap --variant=minbase bookworm from $MIRROR"
if ! timeout 480 debootstrap --variant=minbase --cache-dir="$WORK/debootstrap-cache" \
    bookworm "$CH" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -20 "$WORK/debootstrap.log"
    fail "debootstrap (log: $WORK/debootstrap.log)"
    exit 1
fi
log "chroot ready ($(du -sh "$CH" | cut -f1))"
for m in proc sys dev dev/pts; do
    case $m in
        proc) mount -t proc proc "$CH/proc" ;;
        sys) mount -t sysfs sysfs "$CH/sys" ;;
        *) mount --bind "/$m" "$CH/$m" ;;
    esac
    MOUNTS+=("$CH/$m")
done
cp /etc/resolv.conf "$CH/etc/resolv.conf" 2>/dev/null || true
# No daemons start from maintainer scripts in here (there is no systemd
# anyway, so the postinst's systemctl parts are skipped by their own test).
printf '#!/bin/sh\nexit 101\n' >"$CH/usr/sbin/policy-rc.d"; chmod 0755 "$CH/usr/sbin/policy-rc.d"

# ---------------------------------------------------------------- install
cp "$DEB" "$CH/tmp/pbxmail.deb"
log "dpkg -i (then apt-get -f install for its dependencies)"
if in_ch dpkg -i /tmp/pbxmail.deb >"$WORK/dpkg-i.log" 2>&1; then
    pass "dpkg -i"
else
    echo "  dpkg -i left dependencies open: $(grep -o 'depends on [a-z0-9.-]*' "$WORK/dpkg-i.log" | paste -sd, )"
    DEBIAN_FRONTEND=noninteractive timeout 300 chroot "$CH" apt-get -f install -y -q >"$WORK/apt-f.log" 2>&1 ||
        { tail -20 "$WORK/apt-f.log"; fail "apt-get -f install"; }
fi
check "package installed and configured" \
    test "$(in_ch dpkg-query -W -f='${Status}' pbxmail 2>/dev/null)" = "install ok installed"

st() { in_ch stat -c '%a %U:%G' "$1" 2>/dev/null; }
expect_stat() { # expect_stat PATH "MODE USER:GROUP"
    local got; got=$(st "$1")
    if [ "$got" = "$2" ]; then pass "$1 is $2"; else fail "$1 is '$got', want '$2'"; fi
}
check "user pbxmail exists (system uid)" \
    sh -c "uid=\$(chroot '$CH' id -u pbxmail) && [ \"\$uid\" -lt 1000 ]"
check "pbxmail's shell is nologin" sh -c "chroot '$CH' getent passwd pbxmail | grep -q ':/usr/sbin/nologin\$'"
expect_stat /usr/sbin/pbxmail "2755 root:pbxmail"
check "/usr/sbin/sendmail -> pbxmail" test "$(in_ch readlink -f /usr/sbin/sendmail)" = /usr/sbin/pbxmail
check "/usr/bin/mailq -> pbxmail" test "$(in_ch readlink -f /usr/bin/mailq)" = /usr/sbin/pbxmail
expect_stat /etc/pbxmail/pbxmail.ini "640 root:pbxmail"
expect_stat /var/spool/pbxmail "2750 pbxmail:pbxmail"
expect_stat /var/spool/pbxmail/tmp "2770 pbxmail:pbxmail"
expect_stat /var/spool/pbxmail/queue "2770 pbxmail:pbxmail"
expect_stat /var/spool/pbxmail/quarantine "2750 pbxmail:pbxmail"
expect_stat /var/lib/pbxmail/archive "711 pbxmail:pbxmail"
expect_stat /var/lib/pbxmail/oauth "700 pbxmail:pbxmail"
for f in /lib/systemd/system/pbxmail.service /usr/lib/sysusers.d/pbxmail.conf \
    /usr/lib/tmpfiles.d/pbxmail.conf /usr/share/man/man8/pbxmail.8.gz \
    /usr/share/man/man5/pbxmail.ini.5.gz /usr/share/doc/pbxmail/examples/pbxmail.ini; do
    check "$f present" test -f "$CH$f"
done
check "conffile registered: /etc/pbxmail/pbxmail.ini" \
    sh -c "chroot '$CH' dpkg-query -W -f='\${Conffiles}' pbxmail | grep -q '^ /etc/pbxmail/pbxmail.ini [0-9a-f]\{32\}\$'"
check "dpkg-statoverride holds the modes" \
    sh -c "chroot '$CH' dpkg-statoverride --list | grep -c pbxmail | grep -qx 8"
check "Provides/Conflicts/Replaces mail-transport-agent" \
    sh -c "chroot '$CH' dpkg-query -W -f='\${Provides}|\${Conflicts}|\${Replaces}' pbxmail | grep -qx 'mail-transport-agent|mail-transport-agent|mail-transport-agent'"
check "pbxmail check-config accepts the shipped default (as root)" \
    in_ch /usr/sbin/pbxmail check-config -c /etc/pbxmail/pbxmail.ini
check "pbxmail check-config accepts it as user pbxmail (the unit's user)" \
    in_ch setpriv --reuid=pbxmail --regid=pbxmail --init-groups /usr/sbin/pbxmail check-config -c /etc/pbxmail/pbxmail.ini
if command -v systemd-analyze >/dev/null && [ -d /lib/systemd/system ]; then
    # The minbase chroot has no systemd units to resolve dependencies with:
    # verify in a copy of the package's tree plus the host's units.
    VR=$WORK/verify-root; rm -rf "$VR"; cp -a "$WORK/deb-$ARCH" "$VR"; rm -rf "$VR/DEBIAN"
    cp -an /lib/systemd/system/. "$VR/lib/systemd/system/"
    if systemd-analyze verify --man=no --root="$VR" pbxmail.service >"$WORK/verify.txt" 2>&1 &&
        [ ! -s "$WORK/verify.txt" ]; then
        pass "systemd-analyze verify accepts pbxmail.service"
    else
        fail "systemd-analyze verify: $(head -5 "$WORK/verify.txt")"
    fi
    echo "  systemd-analyze security --offline=yes:" \
        "$(systemd-analyze security --offline=yes --root="$VR" pbxmail.service 2>&1 | grep -o 'exposure level.*')"
    rm -rf "$VR"
else
    warn "systemd-analyze is not available: the unit was not verified"
fi

# ---------------------------------------------------------------- deliver
log "loopback SMTP sink outside the chroot (the chroot shares the network)"
rm -rf "$WORK/sink"
python3 packaging/test/smtp_sink.py --outdir "$WORK/sink" --port-file "$WORK/sink.port" --lifetime 240 \
    >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
for _ in $(seq 300); do [ -s "$WORK/sink.port" ] && break; sleep 0.1; done
rm -f "$WORK/sink.port.used"; PORT=$(cat "$WORK/sink.port"); rm -f "$WORK/sink.port"
[ -n "$PORT" ] || { fail "sink did not start"; exit 1; }

# A tenant for pbx.test relaying to the sink; written in place (keeps the
# conffile's owner and mode, as an admin's editor would).
cat >"$CH/etc/pbxmail/pbxmail.ini" <<EOF
[daemon]
spool_dir = /var/spool/pbxmail
archive_dir = /var/lib/pbxmail/archive
control_socket = /run/pbxmail/control.sock
hostname = pbx.test
postmaster = postmaster@pbx.test
retry_min = 2s
retry_max = 10s

[tenant:test]
domains = pbx.test
relay = 127.0.0.1:$PORT
tls = none
auth = none
EOF
check "check-config accepts the tenant config" in_ch /usr/sbin/pbxmail check-config -c /etc/pbxmail/pbxmail.ini
expect_stat /etc/pbxmail/pbxmail.ini "640 root:pbxmail"

log "daemon as user pbxmail (as the unit runs it, without systemd)"
# RuntimeDirectory=pbxmail, done by hand.
install -d -m 0750 -o "$(in_ch id -u pbxmail)" -g "$(in_ch id -g pbxmail)" "$CH/run/pbxmail"
chroot "$CH" setpriv --reuid=pbxmail --regid=pbxmail --init-groups \
    /usr/sbin/pbxmail daemon -c /etc/pbxmail/pbxmail.ini >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
up=0
for _ in $(seq 100); do
    if in_ch /usr/sbin/pbxmail status >/dev/null 2>&1; then up=1; break; fi
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 0.2
done
if [ $up = 1 ]; then pass "daemon serves (pbxmail status answers)"; else
    fail "daemon did not come up"; tail -20 "$WORK/daemon.log"; fi
check "control socket /run/pbxmail/control.sock exists" test -S "$CH/run/pbxmail/control.sock"

wait_mail() { # wait_mail SUBJECT SECONDS
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        grep -lqs "^Subject: $1" "$WORK"/sink/*.eml && return 0
        sleep 0.2
    done
    return 1
}

msg() { printf 'From: PBX <pbx@pbx.test>\nTo: user@dest.test\nSubject: %s\n\nA voicemail notice.\n' "$1"; }
log "sendmail as root"
rc=0; msg "package-test root" | in_ch /usr/sbin/sendmail -t >"$WORK/sendmail-root.log" 2>&1 || rc=$?
if [ $rc = 0 ]; then pass "sendmail as root exits 0"; else fail "sendmail as root exit $rc: $(head -3 "$WORK/sendmail-root.log")"; fi
if wait_mail "package-test root" 30; then pass "root's message arrived at the sink"; else
    fail "root's message did not arrive within 30 s"
    in_ch /usr/sbin/pbxmail queue 2>&1 | sed 's/^/    /' | head -10
    tail -10 "$WORK/daemon.log" | sed 's/^/    daemon: /'
fi

# The daemon (user pbxmail) must finish root's message: append its attempt
# record and remove it from the spool. The sink stores before it answers 250,
# so the daemon's record, removal and fsyncs may still be under way: poll.
left_root=x
for _ in $(seq 150); do
    left_root=$(grep -ls 'package-test root' "$CH"/var/spool/pbxmail/queue/*/*.msg 2>/dev/null || true)
    [ -z "$left_root" ] && break
    sleep 0.2
done
if [ -z "$left_root" ]; then pass "root's message left the spool after delivery"; else
    fail "root's message still in the spool after delivery: $(cd "$CH" && for f in $left_root; do stat -c '%a %U:%G %n' "${f#"$CH"}" "${f%.msg}.env" 2>/dev/null; done | paste -sd' ')"
    in_ch /usr/sbin/pbxmail queue 2>&1 | sed 's/^/    queue: /' | head -5
fi
grep -E ' (WARN|ERROR)' "$WORK/daemon.log" | sed 's/^/    daemon: /' | head -5 || true

log "sendmail as a process outside the pbxmail group (nobody): the setgid submission path"
rc=0; msg "package-test nobody" | in_ch setpriv --reuid=nobody --regid=nogroup --clear-groups \
    /usr/sbin/sendmail -t >"$WORK/sendmail-nobody.log" 2>&1 || rc=$?
if [ $rc = 0 ] && wait_mail "package-test nobody" 30; then
    pass "sendmail as nobody: exit 0 and delivered"
else
    fail "sendmail as nobody: exit $rc: $(head -2 "$WORK/sendmail-nobody.log" | paste -sd' ')"
fi
rc=0; in_ch setpriv --reuid=nobody --regid=nogroup --clear-groups \
    /usr/sbin/pbxmail check-config >"$WORK/nobody-config.log" 2>&1 || rc=$?
if [ $rc = 78 ]; then
    pass "nobody's other commands run without the group: check-config cannot read the config (78)"
else
    fail "nobody's check-config exited $rc; it must not read /etc/pbxmail/pbxmail.ini"
fi

log "stopping the daemon (SIGTERM, as systemctl stop)"
kill -TERM "$DAEMON_PID"
for _ in $(seq 75); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$DAEMON_PID" 2>/dev/null; then fail "daemon still running 15 s after SIGTERM"; else
    rc=0; wait "$DAEMON_PID" || rc=$?
    if [ $rc = 0 ]; then pass "daemon exited 0 on SIGTERM"; else fail "daemon exit $rc on SIGTERM"; fi
fi
DAEMON_PID=
grep -E 'status=' "$WORK/daemon.log" | sed 's/^/    daemon: /' | head -5

# One message left queued (daemon stopped) to see the spool policy.
rc=0; msg "package-test queued" | in_ch /usr/sbin/sendmail -t >/dev/null 2>&1 || rc=$?
queued=$(find "$CH/var/spool/pbxmail/queue" -name '*.env' 2>/dev/null | wc -l)
check "a message submitted with the daemon stopped waits in the spool" test "$queued" -ge 1

# ---------------------------------------------------------------- remove
log "dpkg -r pbxmail"
in_ch dpkg -r pbxmail >"$WORK/dpkg-r.log" 2>&1 || { cat "$WORK/dpkg-r.log"; fail "dpkg -r"; }
check "removed: /usr/sbin/pbxmail gone" test ! -e "$CH/usr/sbin/pbxmail"
check "removed: /usr/sbin/sendmail gone" test ! -e "$CH/usr/sbin/sendmail" -a ! -L "$CH/usr/sbin/sendmail"
check "removed: conffile kept" test -f "$CH/etc/pbxmail/pbxmail.ini"
check "removed: queued mail kept in the spool" \
    test "$(find "$CH/var/spool/pbxmail/queue" -name '*.env' 2>/dev/null | wc -l)" -ge 1
check "removed: package in state config-files" \
    test "$(in_ch dpkg-query -W -f='${Status}' pbxmail 2>/dev/null)" = "deinstall ok config-files"

log "dpkg -P pbxmail"
in_ch dpkg -P pbxmail >"$WORK/dpkg-P.log" 2>&1 || { cat "$WORK/dpkg-P.log"; fail "dpkg -P"; }
check "purged: /etc/pbxmail gone" test ! -e "$CH/etc/pbxmail"
check "purged: spool gone" test ! -e "$CH/var/spool/pbxmail"
check "purged: /var/lib/pbxmail gone" test ! -e "$CH/var/lib/pbxmail"
check "purged: no statoverride left" sh -c "! chroot '$CH' dpkg-statoverride --list | grep -q pbxmail"
check "purged: package unknown to dpkg" sh -c "! chroot '$CH' dpkg-query -W pbxmail >/dev/null 2>&1"
if in_ch getent passwd pbxmail >/dev/null; then
    echo "  note the pbxmail system user is kept after purge (Debian practice for system users)"
fi
left=$(cd "$CH" && find etc var usr lib -path '*pbxmail*' 2>/dev/null | grep -v -e '^var/lib/dpkg' -e '^var/log' || true)
check "purged: no pbxmail files left${left:+ (left: $left)}" test -z "$left"

log "done: $PASSES passed, $FAILS failed, $WARNS warnings, $(($(date +%s) - START)) s"
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
