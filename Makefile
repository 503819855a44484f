# pbxmail — the two commands a fresh machine needs: `make demo` and `make test`.
CARGO ?= cargo
export CARGO_TERM_COLOR = never

.PHONY: all build release test unit integration demo lint fmt clean interop bench archive-interop fuzz

all: build

build:
	$(CARGO) build --locked --all-targets

release:
	$(CARGO) build --locked --release

# Every test: unit tests beside the code, then one integration binary
# (tests/it: the test servers' self-test and the tests that drive the real
# daemon against scripted relays; `cargo test --test it MODULE::` runs one).
test:
	@# Real SMTP clients for the intake tests: swaks (Perl) and Python's smtplib;
	@# strace for the proof that the dispatcher thread does no disk I/O.
	@command -v swaks >/dev/null && command -v python3 >/dev/null && command -v strace >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq swaks python3 strace)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	@# The fuzz targets include parser files by path: check they still build.
	$(CARGO) check --locked --manifest-path fuzz/Cargo.toml --bins
	$(CARGO) test --locked --all-targets

# Longer runs than `make test` gives the parsers: each cargo-fuzz target (the
# reply parser, the INI parser seeded with the shipped configurations) for
# FUZZ_SECONDS (fuzz/, a crate of its own; cargo-fuzz needs a nightly
# toolchain and is installed when missing), then the property tests over
# mutated real inputs with PROPTEST_CASES cases, in a release build.
# Without a nightly toolchain only the property tests run.
FUZZ_SECONDS ?= 120
PROPTEST_CASES ?= 2000000
# Empty: each property test's own seed; set it to replay a failure (the
# seed a failing case printed) or to explore other cases.
PROPTEST_SEED ?=
fuzz:
	@if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then \
		command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz; \
		$(CARGO) +nightly fuzz run reply -- -max_total_time=$(FUZZ_SECONDS) && \
		mkdir -p fuzz/corpus/ini && cp etc/pbxmail.ini fuzz/corpus/ini/etc.ini && \
		cp packaging/pbxmail.ini fuzz/corpus/ini/packaging.ini && \
		$(CARGO) +nightly fuzz run ini -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	else \
		echo "no nightly toolchain: cargo-fuzz skipped, property tests only"; \
	fi
	PBXMAIL_PROPTEST_CASES=$(PROPTEST_CASES) PBXMAIL_PROPTEST_SEED=$(PROPTEST_SEED) \
		$(CARGO) test --locked --release --bin pbxmail mutated

# Builds, starts a local sink, runs the daemon with three tenants, sends sample
# PBX mail and shows what arrived and what waits; stops what it started.
demo:
	$(CARGO) build --locked --bin pbxmail --example smtp_sink
	bash tests/demo/demo.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf demo-run

# Interop with a real mail server: installs Postfix from Debian's packages
# (as root, when missing) and runs a private instance on 127.0.0.1 with
# STARTTLS and implicit TLS, both with SMTP AUTH, delivering into a Maildir;
# plus Postfix's smtp-sink with fault flags. See tests/interop/run.sh.
interop:
	$(CARGO) build --locked --bin pbxmail
	bash tests/interop/run.sh

# Benchmark, not a test (CI does not run it): messages per second for one
# tenant through one SMTP session, with PIPELINING and without, on loopback and
# with an added round-trip delay; prints figures and round trips per message.
# Then tenant isolation and throughput beside a private Postfix 3.7
# (isolation.sh), and memory, start-up and idle cost (memory.sh).
bench:
	$(CARGO) build --locked --release --bin pbxmail
	$(CARGO) build --locked --example smtp_sink
	bash tests/bench/run.sh
	bash tests/bench/isolation.sh
	bash tests/bench/memory.sh
	bash tests/bench/archive.sh

# Packages (see README.md, "Install, configure, start, upgrade, remove"): .deb and .rpm built with
# dpkg-deb and rpmbuild from one staged tree (packaging/build.sh says why),
# for amd64 and, where the Rust target and cross linker are installed, arm64.
# Output in target/packages/. package-test installs the .deb into a clean
# debootstrapped Debian 12, runs the daemon, delivers a message, purges.
.PHONY: deb rpm package-test
deb:
	bash packaging/build.sh deb

rpm:
	bash packaging/build.sh rpm

package-test:
	bash packaging/package-test.sh

# The journal archive over IMAP: installs Dovecot from Debian's packages (as
# root, when missing) and runs a private instance on 127.0.0.1 with the
# shipped packaging/dovecot/ configuration; Python's imaplib, as the tenant's
# administrator, lists and fetches the archived mail and cannot change it.
# See tests/archive_interop/run.sh.
archive-interop:
	$(CARGO) build --locked --bin pbxmail --example smtp_sink
	bash tests/archive_interop/run.sh
