#!/usr/bin/env python3
"""The IMAP side of `make archive-interop` (run.sh starts everything): logs in
as a tenant's administrator with Python's imaplib, checks that LIST shows one
folder per archived user, that each folder holds exactly the expected
messages byte for byte as archived, and that every way of changing the
archive (flags, \\Deleted, EXPUNGE, COPY, APPEND, CREATE, RENAME, DELETE)
is refused by the server. Prints PASS/FAIL per check; exit 1 if any failed.

For the write attempts the server must say no, not imaplib: a READ-ONLY
response code would make imaplib refuse STORE and EXPUNGE by itself, so it
is noted and dropped before each attempt, and the attempt still goes out.
"""

import argparse
import imaplib
import os
import re
import sys

failures = 0


def check(ok, what, detail=""):
    global failures
    print(f"{'PASS' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures += 1


def header(data, name):
    m = re.search(rb"^" + name.encode() + rb":\s*(.*?)\r?$", data, re.I | re.M)
    return m.group(1).decode(errors="replace").strip() if m else None


def archived_files(folder):
    """The archived messages on disk for one user folder: bytes -> name."""
    out = {}
    for sub in ("new", "cur"):
        path = os.path.join(folder, sub)
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            with open(os.path.join(path, name), "rb") as f:
                out[f.read()] = f"{sub}/{name}"
    return out


def attempt(imap, what, command, *args, unchanged=None):
    """Sends one command that must be refused. Refused means a NO (or BAD),
    or, where `unchanged` is given, an OK after which `unchanged(untagged)`
    confirms that nothing changed: for STORE and EXPUNGE in a mailbox it
    opened read-only, Dovecot answers OK and ignores what the ACL forbids
    (RFC 4314 section 4: flags the user may not set are silently ignored)."""
    imap.untagged_responses.clear()
    try:
        typ, data = imap._simple_command(command, *args)
    except imaplib.IMAP4.error as e:  # BAD, or NO raised by imaplib's own checks
        typ, data = "ERR", [str(e).encode()]
    text = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
    untagged = dict(imap.untagged_responses)
    if typ == "OK" and unchanged is not None:
        ok = unchanged(untagged)
        check(ok, f"{what} refused", f"server answered OK {text} and {'ignored it' if ok else 'APPLIED it'}"
              f" (untagged: {untagged})")
    else:
        check(typ != "OK", f"{what} refused", f"{typ} {text}".strip())
    return typ


def no_flag(flag):
    def ok(untagged):
        return all(flag.encode() not in (d or b"") for d in untagged.get("FETCH", []))
    return ok


def nothing_expunged(untagged):
    return not untagged.get("EXPUNGE")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--archive", required=True, help="the tenant's archive folder")
    p.add_argument("--expect", action="append", default=[], help="USER=tag,tag (Message-ID tags)")
    a = p.parse_args()
    expect = {}
    for e in a.expect:
        user, tags = e.split("=", 1)
        expect[user] = sorted(tags.split(","))

    imap = imaplib.IMAP4("127.0.0.1", a.port, timeout=20)
    typ, data = imap.login(a.user, a.password)
    check(typ == "OK", f"login as {a.user}", data[0].decode(errors="replace"))

    typ, data = imap.list()
    names = set()
    for line in data:
        m = re.match(rb'\((.*?)\) (?:"(.*?)"|NIL) "?(.*?)"?$', line or b"")
        if m:
            names.add(m.group(3).decode())
    check(typ == "OK" and set(expect) <= names and "journal" not in names,
          "LIST shows a folder per archived user (and not the journal)", " ".join(sorted(names)))
    check(names <= set(expect) | {"INBOX"}, "LIST shows nothing else", " ".join(sorted(names)))
    wrong = imaplib.IMAP4("127.0.0.1", a.port, timeout=20)
    try:
        typ, _ = wrong.login(a.user, a.password + "x")
    except imaplib.IMAP4.error:
        typ = "NO"
    check(typ != "OK", "login with a wrong password refused")
    wrong.shutdown()

    for user, tags in sorted(expect.items()):
        on_disk = archived_files(os.path.join(a.archive, user))
        typ, data = imap.select(f'"{user}"', readonly=True)
        count = int(data[0]) if typ == "OK" else -1
        check(typ == "OK" and count == len(tags), f"EXAMINE {user}: {len(tags)} messages", f"{typ} {data}")
        if count <= 0:
            continue
        typ, data = imap.fetch("1:*", "(BODY.PEEK[])")
        bodies = [d[1] for d in data if isinstance(d, tuple)]
        got = sorted(re.sub(r"^<(.*)@pbx\.interop>$", r"\1", header(b, "Message-ID") or "") for b in bodies)
        check(typ == "OK" and got == tags, f"FETCH {user}: the archived Message-IDs", ", ".join(got))
        subjects = sorted(header(b, "Subject") or "" for b in bodies)
        check(subjects == sorted(f"Voicemail {t}" for t in tags), f"FETCH {user}: the subjects", ", ".join(subjects))
        same = all(b in on_disk for b in bodies) and len(bodies) == len(on_disk)
        check(same, f"FETCH {user}: every message byte for byte as the archived file",
              f"{len(bodies)} fetched, {len(on_disk)} files")

    # Write attempts, in the first user's folder, opened read-write if the
    # server lets us.
    user = sorted(expect)[0]
    other = sorted(expect)[-1]
    # imaplib's select() raises on READ-ONLY; send SELECT itself instead.
    imap.untagged_responses.clear()
    typ, data = imap._simple_command("SELECT", f'"{user}"')
    if typ == "OK":
        imap.state = "SELECTED"
    mode = "READ-ONLY" if imap.untagged_responses.get("READ-ONLY") else "READ-WRITE"
    print(f"note: SELECT {user} (read-write requested): {typ}, server opened it {mode}")
    attempt(imap, f"STORE 1 +FLAGS (\\Deleted) in {user}", "STORE", "1", "+FLAGS", "(\\Deleted)",
            unchanged=no_flag("\\Deleted"))
    attempt(imap, f"STORE 1 +FLAGS (\\Seen \\Flagged) in {user}", "STORE", "1", "+FLAGS", "(\\Seen \\Flagged)",
            unchanged=lambda u: no_flag("\\Seen")(u) and no_flag("\\Flagged")(u))
    imap.untagged_responses.clear()
    typ, data = imap.fetch("1:*", "(FLAGS)")
    flags = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
    check(typ == "OK" and not re.search(r"\\(Deleted|Flagged|Seen)", flags), f"no flag stored in {user}", flags)
    attempt(imap, f"EXPUNGE in {user}", "EXPUNGE", unchanged=nothing_expunged)
    attempt(imap, f"UID EXPUNGE 1:* in {user}", "UID", "EXPUNGE", "1:*", unchanged=nothing_expunged)
    attempt(imap, f"COPY 1 into {other}", "COPY", "1", f'"{other}"')
    attempt(imap, f"MOVE 1 to {other}", "MOVE", "1", f'"{other}"')
    imap.close() if imap.state == "SELECTED" else None
    typ, data = imap.append(f'"{other}"', None, None,
                            b"From: x@acme.example\r\nSubject: forged\r\nMessage-ID: <forged@x>\r\n\r\nforged\r\n")
    check(typ != "OK", f"APPEND to {other} refused", f"{typ} {data}")
    attempt(imap, "CREATE a folder", "CREATE", '"forged"')
    attempt(imap, f"RENAME {user}", "RENAME", f'"{user}"', '"renamed"')
    attempt(imap, f"DELETE {user}", "DELETE", f'"{user}"')
    attempt(imap, f"SETACL {user} (admin grants itself rights)", "SETACL", f'"{user}"', a.user, "lrwstipekxa")

    for user, tags in sorted(expect.items()):
        typ, data = imap.select(f'"{user}"', readonly=True)
        count = int(data[0]) if typ == "OK" else -1
        check(count == len(tags), f"{user} still holds {len(tags)} messages", f"{typ} {data}")
        check(len(archived_files(os.path.join(a.archive, user))) == len(tags),
              f"{user}: still {len(tags)} files on disk")
    imap.logout()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
