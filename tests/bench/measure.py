#!/usr/bin/env python3
"""Helpers for tests/bench/isolation.sh and tests/bench/memory.sh. Standard
library only; Linux /proc only.

Subcommands:
  ports N                 prints N distinct free TCP ports on 127.0.0.1
  blackhole PORT LIFETIME_S
                          listens on 127.0.0.1:PORT, accepts every connection
                          and never writes a byte (no SMTP greeting), holds at
                          most 1000 connections; exits by itself after LIFETIME_S
  bigmessage FILE BYTES   writes a text message of about BYTES bytes in
                          base64-like lines of 76 characters (fast, deterministic)
  watch ...               starts the system under test, polls until the healthy
                          tenants' mail has arrived, samples memory meanwhile;
                          appends one JSON line to --out (see watch_main)
  startup ...             starts the daemon, times pickup.sock and a log line
                          (count), then reads RSS, threads and idle CPU; one JSON line
  table-isolation FILE    the isolation table (figures A)
  table-memory FILE       the memory tables (figures B and C)

Only 127.0.0.1 is ever listened on; every loop is bounded in count and time.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------------------
# small things


def ports(n):
    socks = []
    try:
        for _ in range(max(1, min(n, 200))):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        for s in socks:
            print(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()


def blackhole(port, lifetime):
    lifetime = min(lifetime, 3600)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    held = []
    end = time.monotonic() + lifetime
    while time.monotonic() < end:
        srv.settimeout(max(0.05, min(1.0, end - time.monotonic())))
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        except OSError:
            break
        if len(held) < 1000:
            held.append(conn)  # held open, never greeted, never read
        else:
            conn.close()
    for c in held:
        c.close()
    srv.close()


def bigmessage(path, size):
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    head = (b"Subject: pbxmail bench large attachment\n"
            b"MIME-Version: 1.0\n"
            b"Content-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\n\n")
    # 4096 distinct 76-character lines, repeated: no real encoder needed.
    lines = []
    for i in range(4096):
        lines.append(bytes(alphabet[(i * 7 + j * 13) % 64] for j in range(76)) + b"\n")
    block = b"".join(lines)
    with open(path, "wb") as f:
        f.write(head)
        written = len(head)
        while written + len(block) <= size:
            f.write(block)
            written += len(block)
        for line in lines:
            if written + len(line) > size:
                break
            f.write(line)
            written += len(line)


# ---------------------------------------------------------------------------
# /proc readers


def proc_status(pid):
    """VmRSS, VmHWM (kB) and Threads of a process, or None when it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(val.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return out


def proc_pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def proc_cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (FileNotFoundError, ProcessLookupError):
        return None


def descendants(root):
    """root and every process below it (scans /proc once)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo and len(out) < 10000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class Sampler:
    """Sums VmRSS (and Pss) over a process set; keeps the maxima."""

    def __init__(self, pids_fn, with_pss):
        self.pids_fn = pids_fn
        self.with_pss = with_pss
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0

    def sample(self):
        pids = self.pids_fn()
        rss = pss = n = 0
        for pid in pids:
            st = proc_status(pid)
            if st is None or "VmRSS" not in st:
                continue  # gone, or a zombie
            rss += st["VmRSS"]
            n += 1
            if self.with_pss:
                pss += proc_pss(pid)
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, n)
        return rss


SINK_RE = re.compile(rb"mesg=(\d+)[\r\n]")


def sink_count(path):
    """Messages an smtp-sink -c has counted so far (its counter lines end in \\r)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - 128))
            tail = f.read()
    except FileNotFoundError:
        return 0
    found = SINK_RE.findall(tail)
    return int(found[-1]) if found else 0


def count_env(folder):
    try:
        return sum(1 for name in os.listdir(folder) if name.endswith(".env"))
    except FileNotFoundError:
        return 0


def stop_process(proc, grace):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            return "killed after ignoring SIGTERM for %.0f s" % grace
    return None


# ---------------------------------------------------------------------------
# watch: one run of figures A (and the delivery runs of B)


def watch_main(argv):
    p = argparse.ArgumentParser(prog="measure.py watch")
    p.add_argument("--system", required=True, choices=["pbxmail", "postfix"])
    p.add_argument("--run", required=True)
    p.add_argument("--tenants", required=True, help="comma list, all tenants")
    p.add_argument("--healthy", required=True, help="comma list, the tenants to wait for")
    p.add_argument("--sinks", required=True, help="dir with NAME.out per tenant (smtp-sink -c output)")
    p.add_argument("--expect", type=int, required=True, help="messages per tenant")
    p.add_argument("--compare", help="comma list: also report when these tenants were done (nine_s)")
    p.add_argument("--spool", help="pbxmail: spool dir")
    p.add_argument("--pidfile", help="pbxmail: where the daemon's pid is written")
    p.add_argument("--log", help="pbxmail: daemon output")
    p.add_argument("--blackhole-pid", type=int, help="pbxmail: stopped before the daemon")
    p.add_argument("--master-pidfile", help="postfix: master.pid of the instance")
    p.add_argument("--deadline", type=float, default=300)
    p.add_argument("--poll", type=float, default=0.01)
    p.add_argument("--sample", type=float, default=0.05)
    p.add_argument("--no-pss", action="store_true")
    p.add_argument("--extra", default="{}", help="JSON object merged into the result")
    p.add_argument("--out", required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    tenants = a.tenants.split(",")
    healthy = a.healthy.split(",")
    deadline = min(a.deadline, 1800)
    res = {"system": a.system, "run": a.run, "tenants": len(tenants), "healthy": len(healthy),
           "expect": a.expect}
    res.update(json.loads(a.extra))

    daemon = None
    if a.system == "pbxmail":
        before = {t: count_env(os.path.join(a.spool, "queue", t)) for t in tenants}
        res["queued_before"] = sum(before.values())
        log = open(a.log, "wb")
        t0 = time.monotonic()
        daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with open(a.pidfile, "w") as f:
            f.write(str(daemon.pid))
        sampler = Sampler(lambda: [daemon.pid], not a.no_pss)
    else:
        with open(a.master_pidfile) as f:
            master = int(f.read().strip())
        sampler = Sampler(lambda: descendants(master), not a.no_pss)
        sampler.sample()  # the idle instance, before the release
        res["idle_rss_kb"] = sampler.peak_rss
        sampler.peak_rss = sampler.peak_pss = sampler.peak_procs = 0
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, timeout=60)
        res["start_cmd_s"] = time.monotonic() - t0
        if r.returncode != 0:
            res["error"] = "start command failed: " + r.stderr.decode(errors="replace")[-300:]

    done = {}
    next_sample = 0.0
    all_done_at = None
    while "error" not in res:
        now = time.monotonic()
        if now - t0 > deadline:
            res["error"] = "deadline of %.0f s passed" % deadline
            break
        for t in tenants:
            if t in done:
                continue
            if sink_count(os.path.join(a.sinks, t + ".out")) < a.expect:
                continue
            if a.system == "pbxmail" and count_env(os.path.join(a.spool, "queue", t)) != 0:
                continue
            done[t] = now - t0
        if now >= next_sample:
            sampler.sample()
            next_sample = now + a.sample
        if all(t in done for t in healthy):
            all_done_at = now
            break
        if daemon is not None and daemon.poll() is not None:
            res["error"] = "the daemon exited with status %s" % daemon.returncode
            break
        time.sleep(a.poll)
    sampler.sample()
    if daemon is not None:
        st = proc_status(daemon.pid) or {}
        res["vmhwm_kb"] = st.get("VmHWM")
        res["threads"] = st.get("Threads")
    res["peak_rss_kb"] = sampler.peak_rss
    res["peak_pss_kb"] = sampler.peak_pss if not a.no_pss else None
    res["peak_procs"] = sampler.peak_procs
    res["samples"] = sampler.samples
    res["done_s"] = done
    res["delivered"] = {t: sink_count(os.path.join(a.sinks, t + ".out")) for t in tenants}
    if all_done_at is not None:
        res["healthy_s"] = max(done[t] for t in healthy)
        msgs = a.expect * len(healthy)
        res["healthy_msgs"] = msgs
        res["msg_per_s"] = msgs / res["healthy_s"]
        if a.compare:
            res["nine_s"] = max(done[t] for t in a.compare.split(","))

    if daemon is not None:
        if a.blackhole_pid:
            try:
                os.kill(a.blackhole_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        warn = stop_process(daemon, 15)
        if warn:
            res["warning"] = warn
        res["daemon_exit"] = daemon.returncode
        res["left_queued"] = {t: count_env(os.path.join(a.spool, "queue", t)) for t in tenants}
        try:
            os.unlink(a.pidfile)
        except FileNotFoundError:
            pass
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))
    return 1 if "error" in res else 0


# ---------------------------------------------------------------------------
# startup: figures B (10,000 queued) and C (1,000 tenants)


def startup_main(argv):
    p = argparse.ArgumentParser(prog="measure.py startup")
    p.add_argument("--case", required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--pidfile", required=True)
    p.add_argument("--wait-log", required=True, help="regex, matched per line")
    p.add_argument("--wait-count", type=int, default=1, help="lines that must match")
    p.add_argument("--queued", type=int, default=0)
    p.add_argument("--tenants", type=int, default=1)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--idle", type=float, default=5.0)
    p.add_argument("--deadline", type=float, default=120)
    p.add_argument("--out", required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    pattern = re.compile(a.wait_log)
    sock = os.path.join(a.spool, "pickup.sock")
    res = {"kind": "startup", "case": a.case, "tenants": a.tenants, "queued": a.queued}
    deadline = min(a.deadline, 600)

    log = open(a.log, "wb")
    reader = open(a.log, "rb")
    t0 = time.monotonic()
    daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    with open(a.pidfile, "w") as f:
        f.write(str(daemon.pid))
    t_sock = t_log = None
    matched = 0
    partial = b""
    peak_rss = 0
    while time.monotonic() - t0 < deadline:
        now = time.monotonic()
        if t_sock is None and os.path.exists(sock):
            t_sock = now - t0
        chunk = reader.read()
        if chunk:
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for line in lines:
                if pattern.search(line.decode(errors="replace")):
                    matched += 1
        if t_log is None and matched >= a.wait_count:
            t_log = now - t0
        st = proc_status(daemon.pid)
        if st:
            peak_rss = max(peak_rss, st.get("VmRSS", 0))
        if t_sock is not None and t_log is not None:
            break
        if daemon.poll() is not None:
            res["error"] = "the daemon exited with status %s" % daemon.returncode
            break
        time.sleep(0.01)
    else:
        res["error"] = "deadline: pickup.sock %s, %d of %d log lines" % (
            "seen" if t_sock is not None else "missing", matched, a.wait_count)
    res["sock_s"] = t_sock
    res["loaded_s"] = t_log
    res["log_lines_matched"] = matched
    if "error" not in res:
        time.sleep(a.settle)
        st = proc_status(daemon.pid) or {}
        res["rss_kb"] = st.get("VmRSS")
        res["hwm_kb"] = st.get("VmHWM")
        res["threads"] = st.get("Threads")
        res["pss_kb"] = proc_pss(daemon.pid)
        c0 = proc_cpu_ticks(daemon.pid)
        w0 = time.monotonic()
        time.sleep(a.idle)
        c1 = proc_cpu_ticks(daemon.pid)
        res["idle_wall_s"] = time.monotonic() - w0
        if c0 is not None and c1 is not None:
            res["idle_cpu_s"] = (c1 - c0) / CLK_TCK
        st = proc_status(daemon.pid) or {}
        res["rss_after_idle_kb"] = st.get("VmRSS")
        res["load_peak_rss_kb"] = peak_rss
    t_stop = time.monotonic()
    warn = stop_process(daemon, 20)
    res["stop_s"] = time.monotonic() - t_stop
    if warn:
        res["warning"] = warn
    res["daemon_exit"] = daemon.returncode
    try:
        os.unlink(a.pidfile)
    except FileNotFoundError:
        pass
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))
    return 1 if "error" in res else 0


# ---------------------------------------------------------------------------
# tables


def mb(kb):
    return "-" if kb is None else f"{kb / 1024:.1f}"


def nine(r):
    """The 9 tenants that stay healthy in both runs: when the last of them was done."""
    return r.get("nine_s") or r["healthy_s"]


def table_isolation(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    cases = {}
    for r in rows:
        cases.setdefault((r["system"], r["run"]), []).append(r)
    by = {}  # (system, run) -> the median run (by the 9 tenants' time)
    head = (f"{'system':<9} {'run':<16} {'msgs':>5} {'runs':>4} {'healthy s':>9} {'(min..max)':>15} "
            f"{'all 10 s':>8} {'msg/s':>7} {'ratio':>6} {'peak RSS MB':>11} {'peak PSS MB':>11} "
            f"{'procs':>5} {'VmHWM MB':>8}")
    print(head)
    print("-" * len(head))
    for system in ("pbxmail", "postfix"):
        for run in ("healthy", "one black-holed"):
            runs = cases.get((system, run), [])
            if not runs:
                continue
            bad = [r for r in runs if "healthy_s" not in r]
            if bad:
                print(f"{system:<9} {run:<16} FAILED: {bad[0].get('error', '?')}")
                continue
            runs.sort(key=nine)
            r = dict(runs[(len(runs) - 1) // 2])
            # memory: the worst of the runs
            r["peak_rss_kb"] = max(x["peak_rss_kb"] for x in runs)
            r["peak_pss_kb"] = max((x.get("peak_pss_kb") or 0) for x in runs)
            r["peak_procs"] = max(x["peak_procs"] for x in runs)
            if r.get("vmhwm_kb") is not None:
                r["vmhwm_kb"] = max(x.get("vmhwm_kb") or 0 for x in runs)
            by[(system, run)] = r
            base = by.get((system, "healthy"))
            h = nine(r)
            msgs = r["expect"] * 9
            ratio = f"{h / nine(base):.3f}" if run != "healthy" and base else "-"
            all10 = f"{r['healthy_s']:.3f}" if r["healthy"] == r["tenants"] else "-"
            spread = f"({nine(runs[0]):.3f}..{nine(runs[-1]):.3f})" if len(runs) > 1 else ""
            print(f"{system:<9} {run:<16} {msgs:>5} {len(runs):>4} {h:>9.3f} {spread:>15} {all10:>8} "
                  f"{msgs / h:>7.1f} {ratio:>6} {mb(r['peak_rss_kb']):>11} {mb(r['peak_pss_kb']):>11} "
                  f"{r['peak_procs']:>5} {mb(r.get('vmhwm_kb')):>8}")
    print()
    for run in ("healthy", "one black-holed"):
        p, q = by.get(("pbxmail", run)), by.get(("postfix", run))
        if not (p and q and "healthy_s" in p and "healthy_s" in q):
            continue
        pr, qr = p["expect"] * 9 / nine(p), q["expect"] * 9 / nine(q)
        line = (f"{run:<16}: pbxmail / Postfix = {pr / qr:.2f}x msg/s ({pr:.1f} vs {qr:.1f}), "
                f"{p['peak_rss_kb'] / q['peak_rss_kb']:.2f}x peak RSS sum "
                f"({mb(p['peak_rss_kb'])} vs {mb(q['peak_rss_kb'])} MB)")
        if p.get("peak_pss_kb") and q.get("peak_pss_kb"):
            line += (f", {p['peak_pss_kb'] / q['peak_pss_kb']:.2f}x peak PSS sum "
                     f"({mb(p['peak_pss_kb'])} vs {mb(q['peak_pss_kb'])} MB)")
        print(line)
    for system in ("pbxmail", "postfix"):
        b = by.get((system, "healthy"))
        r = by.get((system, "one black-holed"))
        if b and r and "healthy_s" in b and "healthy_s" in r:
            print(f"{system}: healthy tenants' time, one black-holed / all healthy = "
                  f"{nine(r) / nine(b):.3f} (goal <= 1.05)")


def table_memory(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    deliver = [r for r in rows if r.get("kind") == "deliver"]
    start = [r for r in rows if r.get("kind") == "startup"]
    if deliver:
        print("B1. one message delivered to smtp-sink: daemon RSS sampled every 20 ms from start "
              "until the queue is empty")
        head = f"{'message':<10} {'bytes':>10} {'deliver s':>9} {'peak VmRSS MB':>13} {'VmHWM MB':>8} {'samples':>7}"
        print(head)
        print("-" * len(head))
        for r in deliver:
            if "healthy_s" not in r:
                print(f"{r['run']:<10} FAILED: {r.get('error', '?')}")
                continue
            print(f"{r['run']:<10} {r['bytes']:>10} {r['healthy_s']:>9.3f} {mb(r['peak_rss_kb']):>13} "
                  f"{mb(r.get('vmhwm_kb')):>8} {r['samples']:>7}")
        ok = [r for r in deliver if "healthy_s" in r]
        if len(ok) == 2:
            big, small = sorted(ok, key=lambda r: -r["bytes"])
            d = big["peak_rss_kb"] - small["peak_rss_kb"]
            dh = (big.get("vmhwm_kb") or 0) - (small.get("vmhwm_kb") or 0)
            print(f"difference (large - small): peak VmRSS {d / 1024:+.2f} MB, VmHWM {dh / 1024:+.2f} MB "
                  f"(goal: under 2 MB apart)")
        print()
    if start:
        print("B2/C. start-up and idle: time from exec to SPOOL/pickup.sock and to the last tenant's "
              "debug line 'tenant X: N messages queued' (index loaded), then after 1 s: VmRSS, "
              "threads; then CPU (utime+stime) over 5 s idle")
        head = (f"{'case':<28} {'tenants':>7} {'queued':>6} {'sock s':>7} {'loaded s':>8} {'VmRSS MB':>8} "
                f"{'PSS MB':>7} {'VmHWM MB':>8} {'threads':>7} {'idle CPU s':>10} {'stop s':>6}")
        print(head)
        print("-" * len(head))
        for r in start:
            if "error" in r:
                print(f"{r['case']:<28} FAILED: {r['error']}")
                continue
            print(f"{r['case']:<28} {r['tenants']:>7} {r['queued']:>6} {r['sock_s']:>7.3f} {r['loaded_s']:>8.3f} "
                  f"{mb(r['rss_kb']):>8} {mb(r['pss_kb']):>7} {mb(r['hwm_kb']):>8} {r['threads']:>7} "
                  f"{r.get('idle_cpu_s', float('nan')):>10.2f} {r['stop_s']:>6.2f}")
        ok = [r for r in start if "error" not in r]

        def first(pred):
            return next((r for r in ok if pred(r)), None)

        z = first(lambda r: r["tenants"] == 1 and r["queued"] == 0)
        k = first(lambda r: r["tenants"] == 1 and r["queued"] > 0)
        many = first(lambda r: r["tenants"] > 1)
        if z and k:
            n = k["queued"]
            print(f"index cost: (VmRSS with {n} queued - with 0) / {n} = "
                  f"{(k['rss_kb'] - z['rss_kb']) * 1024 / n:.0f} bytes per queued message "
                  f"(VmHWM: {((k['hwm_kb'] or 0) - (z['hwm_kb'] or 0)) * 1024 / n:.0f} bytes)")
        if z and many:
            m = many["tenants"] - 1
            print(f"idle tenant cost: ({many['tenants']} tenants - 1 tenant) / {m} = "
                  f"{(many['rss_kb'] - z['rss_kb']) / m:.1f} kB VmRSS and "
                  f"{(many['threads'] - z['threads']) / m:.2f} threads per tenant; "
                  f"idle CPU over 5 s: {many.get('idle_cpu_s', 0):.2f} s with {many['tenants']} tenants, "
                  f"{z.get('idle_cpu_s', 0):.2f} s with 1")


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    cmd, rest = argv[1], argv[2:]
    if cmd == "ports":
        ports(int(rest[0]))
    elif cmd == "blackhole":
        blackhole(int(rest[0]), float(rest[1]))
    elif cmd == "bigmessage":
        bigmessage(rest[0], int(rest[1]))
    elif cmd == "watch":
        return watch_main(rest)
    elif cmd == "startup":
        return startup_main(rest)
    elif cmd == "table-isolation":
        table_isolation(rest[0])
    elif cmd == "table-memory":
        table_memory(rest[0])
    else:
        print(__doc__, file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
