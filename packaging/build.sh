#!/usr/bin/env bash
# Builds pbxmail's .deb and .rpm from this tree:  packaging/build.sh deb|rpm|all
#
# Tooling: plain dpkg-deb and rpmbuild over one staged file tree, not
# cargo-deb / cargo-generate-rpm. Reasons:
#  - both are Debian packages (dpkg-dev is already here, `rpm` is one
#    apt-get away), so CI on a clean Debian 12 needs no `cargo install` of a
#    packaging tool (minutes of compiling on every fresh machine);
#  - the .deb needs hand-written maintainer scripts anyway (system user,
#    dpkg-statoverride for root:pbxmail 0640 and the pbxmail-owned folders,
#    purge policy, the dh_installsystemd start/stop logic), and the .rpm
#    needs %pre/%post scriptlets and %attr with a group made in %pre; with
#    the plain tools these are ordinary files under packaging/ that
#    lintian/rpmlint and a reviewer read as they are;
#  - one staged tree means the .deb and the .rpm ship the same files.
#
# Architectures: PBXMAIL_ARCHES (default "amd64 arm64"). arm64 is built only
# when the Rust target aarch64-unknown-linux-gnu and aarch64-linux-gnu-gcc
# (Debian: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross; ring compiles C and
# assembly) are installed; otherwise it is skipped with a note. If
# qemu-aarch64 is present the arm64 binary is run once (`pbxmail
# check-config` on the packaged default) before it is packed.
#
# Output: target/packages/ (override with PBXMAIL_PKG_OUT).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHAT=${1:-all}
ARCHES=${PBXMAIL_ARCHES:-amd64 arm64}
OUT=${PBXMAIL_PKG_OUT:-$ROOT/target/packages}
WORK=$ROOT/target/packaging
CARGO=${CARGO:-cargo}
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
DEB_VERSION=$VERSION-1
# Reproducible timestamps (gzip -n, tar mtimes): the last commit's time.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

note() { echo "packaging: $*" >&2; }

need_tool() { # need_tool COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null && return 0
    note "installing $2 (for $1)"
    if [ "$(id -u)" != 0 ]; then note "$1 missing and not root: apt-get install $2"; exit 1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

rust_triple() {
    case $1 in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-gnu ;;
        *) note "unknown arch $1"; exit 64 ;;
    esac
}

host_arch() { dpkg --print-architecture 2>/dev/null || echo amd64; }

# Can this machine build ARCH? (prints the reason when not)
can_build() {
    local arch=$1 triple
    [ "$arch" = "$(host_arch)" ] && return 0
    triple=$(rust_triple "$arch")
    if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
        note "skipping $arch: Rust target $triple not installed (rustup target add $triple)"
        return 1
    fi
    if [ "$arch" = arm64 ] && ! command -v aarch64-linux-gnu-gcc >/dev/null; then
        note "skipping $arch: no cross linker (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
        return 1
    fi
    return 0
}

# Builds the release binary for ARCH; prints its path.
build_binary() {
    local arch=$1 triple
    if [ "$arch" = "$(host_arch)" ]; then
        "$CARGO" build --locked --release --bin pbxmail >&2
        echo "$ROOT/target/release/pbxmail"
        return
    fi
    triple=$(rust_triple "$arch")
    case $arch in
        arm64)
            export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
            export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
            export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
            ;;
    esac
    "$CARGO" build --locked --release --bin pbxmail --target "$triple" >&2
    echo "$ROOT/target/$triple/release/pbxmail"
}

# Smoke test of a foreign-arch binary under qemu-user, when available.
run_foreign() {
    local arch=$1 bin=$2
    case $arch in arm64) ;; *) return 0 ;; esac
    if ! command -v qemu-aarch64 >/dev/null; then
        note "arm64 binary not run: qemu-user not installed"
        return 0
    fi
    local out rc=0
    out=$(qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" check-config -c packaging/pbxmail.ini 2>&1) || rc=$?
    note "arm64 under qemu-aarch64: $(file -b "$bin" | cut -d, -f1-2); check-config exit $rc: $(echo "$out" | tail -1)"
    [ "$rc" = 0 ] || { note "the arm64 binary does not run"; exit 1; }
}

# Debian Depends for the binary's shared libraries: the highest symbol version
# it needs from libc and libgcc_s (what dpkg-shlibdeps derives, without
# needing the foreign arch's libc registered with dpkg).
shlib_depends() {
    local bin=$1 deps=() v
    local needed
    needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    for lib in $needed; do
        case $lib in
            libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*)
                v=$(readelf -V "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
                deps+=("libc6 (>= $v)") ;;
            libgcc_s.so.1)
                v=$(readelf -V "$bin" | grep -o 'GCC_[0-9.]*' | sed 's/GCC_//' | sort -V | tail -1)
                deps+=("libgcc-s1 (>= ${v:-3.0})") ;;
            *) note "unexpected shared library $lib: add its package to shlib_depends"; exit 1 ;;
        esac
    done
    printf '%s\n' "${deps[@]}" | sort -u | paste -sd, | sed 's/,/, /g'
}

# The file tree both packages ship, in $WORK/stage-ARCH.
stage() {
    local arch=$1 bin=$2 st=$WORK/stage-$arch
    rm -rf "$st"
    install -d -m 0755 "$st"/usr/sbin "$st"/usr/bin "$st"/etc/pbxmail \
        "$st"/usr/lib/systemd/system "$st"/usr/lib/sysusers.d "$st"/usr/lib/tmpfiles.d \
        "$st"/usr/share/man/man1 "$st"/usr/share/man/man5 "$st"/usr/share/man/man8 \
        "$st"/usr/share/doc/pbxmail/examples \
        "$st"/var/spool/pbxmail "$st"/var/spool/pbxmail/tmp "$st"/var/spool/pbxmail/queue \
        "$st"/var/spool/pbxmail/quarantine "$st"/var/lib/pbxmail/archive "$st"/var/lib/pbxmail/oauth
    install -m 0755 "$bin" "$st"/usr/sbin/pbxmail
    ln -s pbxmail "$st"/usr/sbin/sendmail
    ln -s ../sbin/pbxmail "$st"/usr/bin/mailq
    # Shipped 0644 root:root; the packages make it root:pbxmail 0640
    # (dpkg-statoverride in postinst, %attr in the spec).
    install -m 0644 packaging/pbxmail.ini "$st"/etc/pbxmail/pbxmail.ini
    install -m 0644 packaging/systemd/pbxmail.service "$st"/usr/lib/systemd/system/pbxmail.service
    install -m 0644 packaging/systemd/pbxmail.sysusers "$st"/usr/lib/sysusers.d/pbxmail.conf
    install -m 0644 packaging/systemd/pbxmail.tmpfiles "$st"/usr/lib/tmpfiles.d/pbxmail.conf
    gzip -9n -c packaging/man/pbxmail.8 >"$st"/usr/share/man/man8/pbxmail.8.gz
    gzip -9n -c packaging/man/pbxmail.ini.5 >"$st"/usr/share/man/man5/pbxmail.ini.5.gz
    ln -s pbxmail.8.gz "$st"/usr/share/man/man8/sendmail.8.gz
    ln -s ../man8/pbxmail.8.gz "$st"/usr/share/man/man1/mailq.1.gz
    chmod 0644 "$st"/usr/share/man/man*/*.gz
    # The sample with every key; the conffile above is the minimal valid one.
    install -m 0644 etc/pbxmail.ini "$st"/usr/share/doc/pbxmail/examples/pbxmail.ini
    install -m 0644 README.md "$st"/usr/share/doc/pbxmail/README.md
    install -m 0644 docs/spool.md "$st"/usr/share/doc/pbxmail/spool.md
    install -m 0644 packaging/deb/copyright "$st"/usr/share/doc/pbxmail/copyright
    find "$st" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    echo "$st"
}

make_deb() {
    local arch=$1 st=$2 bin=$3 d=$WORK/deb-$arch
    need_tool dpkg-deb dpkg
    rm -rf "$d"
    cp -a "$st" "$d"
    # Debian 12 puts units in /lib/systemd/system (usr-merge moratorium).
    install -d -m 0755 "$d"/lib/systemd/system
    mv "$d"/usr/lib/systemd/system/pbxmail.service "$d"/lib/systemd/system/
    rmdir "$d"/usr/lib/systemd/system "$d"/usr/lib/systemd
    gzip -9n -c packaging/deb/changelog >"$d"/usr/share/doc/pbxmail/changelog.Debian.gz
    install -d -m 0755 "$d"/usr/share/lintian/overrides
    install -m 0644 packaging/deb/lintian-overrides "$d"/usr/share/lintian/overrides/pbxmail
    install -d -m 0755 "$d"/DEBIAN
    local size shlibs
    size=$(du -k -s --apparent-size --exclude=DEBIAN "$d" | cut -f1)
    shlibs=$(shlib_depends "$bin")
    sed -e "s/@DEB_VERSION@/$DEB_VERSION/" -e "s/@DEB_ARCH@/$arch/" \
        -e "s/@INSTALLED_SIZE@/$size/" -e "s/@SHLIBS@/$shlibs/" \
        packaging/deb/control.in >"$d"/DEBIAN/control
    install -m 0644 packaging/deb/conffiles "$d"/DEBIAN/conffiles
    install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$d"/DEBIAN/
    (cd "$d" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
        xargs -0 md5sum >DEBIAN/md5sums)
    chmod 0644 "$d"/DEBIAN/md5sums
    find "$d" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    mkdir -p "$OUT"
    local deb=$OUT/pbxmail_${DEB_VERSION}_$arch.deb
    dpkg-deb --root-owner-group -Zxz --build "$d" "$deb" >/dev/null
    note "built $deb ($(stat -c %s "$deb") bytes)"
}

make_rpm() {
    local arch=$1 st=$2 r=$WORK/rpm-$arch rarch
    need_tool rpmbuild rpm
    case $arch in amd64) rarch=x86_64 ;; arm64) rarch=aarch64 ;; esac
    rm -rf "$r"
    mkdir -p "$r"/{BUILD,RPMS,SPECS,SRPMS,BUILDROOT}
    { sed -e "s/@VERSION@/$VERSION/" -e "s/@RPM_ARCH@/$rarch/" -e "s|@STAGE@|$st|" \
        packaging/rpm/pbxmail.spec.in
      echo
      echo '%changelog'
      echo "* $(LC_ALL=C date -u -d "@$SOURCE_DATE_EPOCH" '+%a %b %d %Y') pbxmail developers <pbxmail@pbx.invalid> - $VERSION-1"
      echo '- First package.'
    } >"$r"/SPECS/pbxmail.spec
    # --target: the packed architecture; nothing is compiled by rpmbuild.
    rpmbuild -bb --quiet --target "$rarch" \
        --define "_topdir $r" --define "_build_id_links none" \
        --define "_binary_payload w9.xzdio" \
        "$r"/SPECS/pbxmail.spec >"$r"/rpmbuild.log 2>&1 ||
        { cat "$r"/rpmbuild.log >&2; exit 1; }
    mkdir -p "$OUT"
    local rpm
    rpm=$(find "$r"/RPMS -name '*.rpm' | head -1)
    cp "$rpm" "$OUT"/
    note "built $OUT/$(basename "$rpm") ($(stat -c %s "$rpm") bytes)"
}

case $WHAT in deb | rpm | all) ;; *) echo "usage: $0 deb|rpm|all" >&2; exit 64 ;; esac
built=0
for arch in $ARCHES; do
    can_build "$arch" || continue
    bin=$(build_binary "$arch")
    note "$arch binary: $bin, $(stat -c %s "$bin") bytes"
    run_foreign "$arch" "$bin"
    st=$(stage "$arch" "$bin")
    if [ "$WHAT" = deb ] || [ "$WHAT" = all ]; then make_deb "$arch" "$st" "$bin"; fi
    if [ "$WHAT" = rpm ] || [ "$WHAT" = all ]; then make_rpm "$arch" "$st"; fi
    built=$((built + 1))
done
[ "$built" -gt 0 ] || { note "nothing built"; exit 1; }
