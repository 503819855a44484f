#!/usr/bin/env python3
"""Helpers for tests/interop/run.sh (standard library only).

  helper.py ports N                      N free TCP ports on 127.0.0.1, one a line
  helper.py maildir DIR SENT...          compare a Maildir with the sent messages
  helper.py dumps DIR SENT...            compare smtp-sink -d dump files likewise
  helper.py queue PBXMAIL CONFIG SENDER EXPECT SECS
                                         wait until the queue entries of SENDER
                                         reach EXPECT: gone | failed | deferred
                                         (attempts >= 1) | kept (either of those two)
  helper.py count DIR                    number of files under DIR (not in tmp/)

Each check prints one line per finding and exits 0 on success, 1 on failure.
"""

import json
import os
import socket
import subprocess
import sys
import time


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    for p in ports:
        print(p)


def split_message(data):
    """Header block and body of an RFC 5322 message stored with LF endings."""
    data = data.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        return data, b""
    return head + b"\n", body


def headers(head):
    """Unfolded (name.lower(), value) pairs, in order."""
    out = []
    for line in head.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + b" " + line.strip())
            continue
        name, _, value = line.partition(b":")
        out.append((name.strip().lower().decode("ascii", "replace"), value.strip()))
    return out


def header(hs, name):
    return [v for n, v in hs if n == name]


def stored_files(root, sub=None):
    files = []
    for dirpath, _, names in os.walk(root):
        if sub and os.path.basename(dirpath) not in sub:
            continue
        for n in sorted(names):
            files.append(os.path.join(dirpath, n))
    return sorted(files)


def compare(stored, sent_paths, kind):
    """Every sent message stored exactly once, body byte-identical."""
    ok = True
    sent = {}
    for p in sent_paths:
        with open(p, "rb") as f:
            head, body = split_message(f.read())
        hs = headers(head)
        mid = header(hs, "message-id")[0]
        sent[mid] = (p, hs, body)
    seen = {}
    for path in stored:
        with open(path, "rb") as f:
            raw = f.read()
        head, body = split_message(raw)
        if kind == "dump":
            # smtp-sink prepends X-Client-*/X-Helo-Args/X-Mail-Args/X-Rcpt-Args
            # and a three-line Received header before the message proper, and
            # appends one empty line after it.
            if body.endswith(b"\n\n"):
                body = body[:-1]
        hs = headers(head)
        mids = header(hs, "message-id")
        if len(mids) != 1:
            print(f"  FAIL {path}: {len(mids)} Message-ID headers")
            ok = False
            continue
        mid = mids[0]
        if mid not in sent:
            print(f"  FAIL {path}: unexpected message {mid.decode()}")
            ok = False
            continue
        seen.setdefault(mid, []).append(path)
        src, shs, sbody = sent[mid]
        name = os.path.basename(src)
        for h in ("subject", "from", "to"):
            if header(hs, h) != header(shs, h):
                print(f"  FAIL {name}: {h} differs: sent {header(shs, h)!r}, stored {header(hs, h)!r}")
                ok = False
        if body != sbody:
            print(f"  FAIL {name}: body differs from what was sent ({len(sbody)} bytes sent, {len(body)} stored)")
            a, b = sbody.split(b"\n"), body.split(b"\n")
            for i in range(max(len(a), len(b))):
                x = a[i] if i < len(a) else None
                y = b[i] if i < len(b) else None
                if x != y:
                    print(f"       first difference at body line {i + 1}: sent {x!r:.120} stored {y!r:.120}")
                    break
            ok = False
        else:
            print(f"  ok   {name}: stored once as {os.path.basename(path)}, body identical ({len(body)} bytes)")
        if kind == "maildir":
            # Postfix's own trace headers: the last hop is ours, over TLS with AUTH.
            received = header(hs, "received")
            if not received or b"ESMTPSA" not in received[0]:
                print(f"  FAIL {name}: top Received header does not say ESMTPSA (TLS + AUTH): {received[:1]!r}")
                ok = False
            elif b"TLS" not in received[0]:
                print(f"  FAIL {name}: top Received header names no TLS protocol: {received[0]!r}")
                ok = False
            else:
                proto = received[0][received[0].find(b"(using"):].split(b")")[0] + b")"
                print(f"       Received: ... with ESMTPSA {proto.decode(errors='replace')}")
    for mid, (src, _, _) in sent.items():
        n = len(seen.get(mid, []))
        if n != 1:
            print(f"  FAIL {os.path.basename(src)}: stored {n} times, expected once")
            ok = False
    print(f"  {len(stored)} stored file(s) for {len(sent)} sent message(s)")
    if len(stored) != len(sent):
        ok = False
    return ok


def all_entries(pbxmail, config):
    out = subprocess.run(
        [pbxmail, "queue", "-c", config, "--json"],
        capture_output=True, timeout=20, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"pbxmail queue exited {out.returncode}: {out.stderr.decode(errors='replace').strip()}")
    return json.loads(out.stdout or b"[]")


def queue_entries(pbxmail, config, sender):
    return [e for e in all_entries(pbxmail, config) if e.get("sender") == sender]


def bounces_to(pbxmail, config, sender):
    """Bounces (null sender) addressed to `sender`."""
    return [
        e for e in all_entries(pbxmail, config)
        if e.get("sender") == "" and sender in (e.get("recipients") or [])
    ]


def wait_queue(pbxmail, config, sender, expect, secs):
    deadline = time.monotonic() + float(secs)
    entries, err = None, None
    while True:
        try:
            entries = queue_entries(pbxmail, config, sender)
            err = None
            if expect == "gone" and not entries:
                print("  queue: no entry left for this sender (delivered)")
                return True
            if expect == "failed" and entries and all(e["state"] == "failed" for e in entries):
                break
            # A 5xx bounces the message to its sender through the same relay;
            # a relay that refuses everything refuses the bounce too, and with
            # no postmaster configured the bounce stays failed.
            if expect == "bounced" and not entries:
                bounces = bounces_to(pbxmail, config, sender)
                if bounces and all(b["state"] == "failed" for b in bounces):
                    entries = bounces
                    print("  queue: the message was bounced; its bounce was refused too and stays failed")
                    break
            if expect == "deferred" and entries and all(
                e["state"] == "deferred" and int(e.get("attempts") or 0) >= 1 for e in entries
            ):
                break
            # Never delivered, by either road: kept (deferred or failed), or
            # bounced back with its bounce still queued (refused or deferred).
            if expect == "undelivered":
                undelivered = lambda e: e["state"] == "failed" or (
                    e["state"] == "deferred" and int(e.get("attempts") or 0) >= 1
                )
                if entries and all(undelivered(e) for e in entries):
                    break
                bounces = bounces_to(pbxmail, config, sender)
                if not entries and bounces and all(undelivered(b) for b in bounces):
                    entries = bounces
                    print("  queue: the message was bounced; its bounce is still queued, undelivered")
                    break
            if expect == "kept" and entries and all(
                e["state"] == "failed"
                or (e["state"] == "deferred" and int(e.get("attempts") or 0) >= 1)
                for e in entries
            ):
                break
        except Exception as e:  # noqa: BLE001 - reported below
            err = str(e)
        if time.monotonic() >= deadline:
            print(f"  FAIL queue did not reach '{expect}' within {secs}s")
            if err:
                print(f"       last error: {err}")
            for e in entries or []:
                print("       " + json.dumps(e, sort_keys=True))
            return False
        time.sleep(0.5)
    for e in entries:
        print(
            f"  queue: {e['id']} state={e['state']} attempts={e.get('attempts')} "
            f"last_error={e.get('last_error')!r}"
        )
    return True


def main(argv):
    cmd = argv[1]
    if cmd == "ports":
        free_ports(int(argv[2]))
        return 0
    if cmd == "maildir":
        return 0 if compare(stored_files(argv[2], {"new", "cur"}), argv[3:], "maildir") else 1
    if cmd == "dumps":
        return 0 if compare(stored_files(argv[2]), argv[3:], "dump") else 1
    if cmd == "count":
        print(len([f for f in stored_files(argv[2]) if os.path.basename(os.path.dirname(f)) != "tmp"]))
        return 0
    if cmd == "queue":
        return 0 if wait_queue(*argv[2:7]) else 1
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv))
