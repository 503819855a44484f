#!/usr/bin/env python3
"""Helpers for `make bench` (tests/bench/run.sh). Standard library only.

Subcommands:
  free-port               prints a free TCP port on 127.0.0.1
  message FILE BYTES      writes a plain-text message of about BYTES bytes
  rtt HOST PORT COUNT     SMTP NOOP round trips to a relay; prints the median in ms
  proxy LISTEN_PORT TO_PORT DELAY_MS LIFETIME_S
                          a TCP relay on 127.0.0.1 that holds every chunk DELAY_MS
                          in each direction (the fallback when the kernel has no
                          netem); exits by itself after LIFETIME_S
  run --spool DIR --tenant T --count N --deadline S --log FILE --pidfile FILE -- CMD...
                          starts the daemon (CMD), times how the tenant's queue
                          drains, stops the daemon; prints one JSON line
  table FILE              prints the results (JSON lines) side by side

Only 127.0.0.1 is ever connected to or listened on; every loop is bounded.
"""

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def message(path, size):
    lines = ["Subject: pbxmail bench", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=us-ascii", ""]
    body = []
    total = sum(len(l) + 2 for l in lines)
    n = 0
    while total < size:
        line = f"line {n:05d} " + "voicemail transcript filler text " * 2
        body.append(line)
        total += len(line) + 2
        n += 1
    with open(path, "w") as f:
        f.write("\n".join(lines + body) + "\n")


def rtt(host, port, count):
    assert host in ("127.0.0.1", "localhost", "::1"), "loopback only"
    count = max(1, min(count, 200))
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def reply():
            while True:
                line = f.readline()
                if not line:
                    raise SystemExit("rtt: the relay closed the connection")
                if line[3:4] != b"-":
                    return line

        reply()  # greeting
        s.sendall(b"EHLO bench.test\r\n")
        reply()
        samples = []
        for _ in range(count):
            t = time.monotonic()
            s.sendall(b"NOOP\r\n")
            reply()
            samples.append(time.monotonic() - t)
        s.sendall(b"QUIT\r\n")
        reply()
    print(f"{statistics.median(samples) * 1000:.3f}")


async def _pump(reader, writer, delay):
    """Copies reader to writer, each chunk released `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def read_side():
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                return

    async def write_side():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read_side(), write_side())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _proxy(listen_port, to_port, delay, lifetime):
    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", to_port)
        except OSError:
            client_w.close()
            return
        for w in (client_w, up_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(client_r, up_w, delay), _pump(up_r, client_w, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await asyncio.sleep(lifetime)


def proxy(listen_port, to_port, delay_ms, lifetime):
    asyncio.run(_proxy(listen_port, to_port, delay_ms / 1000.0, min(lifetime, 3600)))


def count_env(folder):
    try:
        return sum(1 for name in os.listdir(folder) if name.endswith(".env"))
    except FileNotFoundError:
        return 0


def run(args):
    opts = {}
    i = 0
    while i < len(args) and args[i] != "--":
        opts[args[i].lstrip("-")] = args[i + 1]
        i += 2
    cmd = args[i + 1:]
    folder = os.path.join(opts["spool"], "queue", opts["tenant"])
    expected = int(opts["count"])
    deadline = float(opts["deadline"])
    poll = 0.005
    queued = count_env(folder)
    result = {"case": opts.get("case", ""), "messages": expected, "queued": queued}
    if opts.get("rtt_ms"):
        result["rtt_ms"] = float(opts["rtt_ms"])
    if opts.get("baseline"):
        result["baseline"] = opts["baseline"]
    if queued != expected:
        result["error"] = f"{queued} messages queued before the start, expected {expected}"
        print(json.dumps(result))
        return 1

    with open(opts["log"], "wb") as log:
        t0 = time.monotonic()
        daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with open(opts["pidfile"], "w") as f:
            f.write(str(daemon.pid))
        first = None  # (time, messages left) at the first poll that saw a delivery
        last = None
        remaining = expected
        while time.monotonic() - t0 < deadline:
            remaining = count_env(folder)
            now = time.monotonic()
            if first is None and remaining < expected:
                first = (now, remaining)
            if remaining == 0:
                last = now
                break
            if daemon.poll() is not None:
                break
            time.sleep(poll)
        exited = daemon.poll()
        if exited is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                exited = daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                exited = daemon.wait(timeout=5)
                result["warning"] = "the daemon ignored SIGTERM for 15 s and was killed"
    os.unlink(opts["pidfile"])

    result["daemon_exit"] = exited
    if last is None:
        why = "the daemon exited" if daemon.returncode is not None and remaining else "deadline"
        result["error"] = f"{remaining} of {expected} messages still queued ({why})"
        print(json.dumps(result))
        return 1
    t_first, left_at_first = first
    result["total_s"] = last - t0           # daemon start .. queue empty
    result["first_s"] = t_first - t0        # daemon start .. first delivery seen
    steady = last - t_first                 # first delivery seen .. queue empty
    result["steady_s"] = steady
    result["steady_msgs"] = left_at_first   # messages delivered within `steady`
    result["msg_per_s"] = left_at_first / steady if steady > 0 else None
    result["ms_per_msg"] = steady / left_at_first * 1000 if left_at_first else None
    print(json.dumps(result))
    return 0


def table(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    cases = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    summary = {}
    head = (f"{'case':<24} {'msgs':>5} {'runs':>4} {'total s':>8} {'steady s':>9} {'msg/s':>8} "
            f"{'(min..max)':>15} {'ms/msg':>7} {'RTT ms':>7} {'RT/msg':>7} {'RT/msg net':>10}")
    print(head)
    print("-" * len(head))
    for case in cases:
        runs = [r for r in rows if r["case"] == case]
        bad = [r for r in runs if "error" in r]
        if bad:
            print(f"{case:<24} FAILED: {bad[0]['error']}")
            continue
        runs.sort(key=lambda r: r["ms_per_msg"])
        mid = runs[(len(runs) - 1) // 2]  # the median run (the faster of the middle two)
        rates = [r["msg_per_s"] for r in runs]
        rtts = [r["rtt_ms"] for r in runs if r.get("rtt_ms")]
        rtt_ms = statistics.median(rtts) if rtts else None
        summary[case] = {"ms_per_msg": mid["ms_per_msg"], "msg_per_s": mid["msg_per_s"]}
        rt = net = "-"
        if rtt_ms:
            rt = f"{mid['ms_per_msg'] / rtt_ms:.2f}"
            base = summary.get(mid.get("baseline", ""))
            if base:
                net = f"{(mid['ms_per_msg'] - base['ms_per_msg']) / rtt_ms:.2f}"
        spread = f"({min(rates):.0f}..{max(rates):.0f})" if len(runs) > 1 else ""
        print(f"{case:<24} {mid['messages']:>5} {len(runs):>4} {mid['total_s']:>8.3f} "
              f"{mid['steady_s']:>9.3f} {mid['msg_per_s']:>8.1f} {spread:>15} "
              f"{mid['ms_per_msg']:>7.2f} {(f'{rtt_ms:.1f}' if rtt_ms else '-'):>7} {rt:>7} {net:>10}")
    print()
    for a, b, what in (("loopback, PIPELINING", "loopback, no PIPELINING", "loopback"),
                       ("delayed, PIPELINING", "delayed, no PIPELINING", "delayed ")):
        ra, rb = summary.get(a), summary.get(b)
        if ra and rb:
            print(f"{what}: PIPELINING / no PIPELINING = {ra['msg_per_s'] / rb['msg_per_s']:.2f}x "
                  f"messages per second ({ra['msg_per_s']:.1f} vs {rb['msg_per_s']:.1f}; "
                  f"{ra['ms_per_msg']:.2f} vs {rb['ms_per_msg']:.2f} ms per message)")


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    cmd, rest = argv[1], argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "message":
        message(rest[0], int(rest[1]))
    elif cmd == "rtt":
        rtt(rest[0], int(rest[1]), int(rest[2]))
    elif cmd == "proxy":
        proxy(int(rest[0]), int(rest[1]), float(rest[2]), float(rest[3]))
    elif cmd == "run":
        return run(rest)
    elif cmd == "table":
        table(rest[0])
    else:
        print(__doc__, file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
