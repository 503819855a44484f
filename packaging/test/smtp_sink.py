#!/usr/bin/env python3
"""Minimal SMTP sink for `make package-test` (smtpd left the standard library
in Python 3.12). Accepts everything on HOST:PORT, writes each message to
OUTDIR/N.eml with the envelope in OUTDIR/N.env, and exits by itself after
--lifetime seconds (bounded, never left running)."""
import argparse
import os
import socket
import socketserver
import threading


class Handler(socketserver.StreamRequestHandler):
    timeout = 30

    def reply(self, line):
        self.wfile.write((line + "\r\n").encode())
        self.wfile.flush()

    def handle(self):
        self.reply("220 sink.test ESMTP package-test sink")
        sender, rcpts = None, []
        while True:
            raw = self.rfile.readline(4096)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self.reply("250-sink.test")
                self.reply("250-8BITMIME")
                self.reply("250 SIZE 52428800")
            elif verb == "HELO":
                self.reply("250 sink.test")
            elif verb == "MAIL":
                sender, rcpts = line[10:].strip(), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(line[8:].strip())
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                body = []
                while True:
                    raw = self.rfile.readline(65536)
                    if not raw or raw in (b".\r\n", b".\n"):
                        break
                    body.append(raw[1:] if raw.startswith(b"..") else raw)
                self.server.store(sender, rcpts, b"".join(body))
                self.reply("250 2.0.0 Ok: queued")
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not recognized")


class Sink(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, outdir):
        super().__init__(addr, Handler)
        self.outdir, self.count, self.lock = outdir, 0, threading.Lock()

    def store(self, sender, rcpts, data):
        with self.lock:
            self.count += 1
            base = os.path.join(self.outdir, str(self.count))
        with open(base + ".eml.tmp", "wb") as f:
            f.write(data)
        with open(base + ".env", "w") as f:
            f.write("MAIL FROM:%s\nRCPT TO:%s\n" % (sender, " ".join(rcpts)))
        os.rename(base + ".eml.tmp", base + ".eml")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--lifetime", type=float, default=300)
    ap.add_argument("--port-file", help="write the bound port here")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    srv = Sink((a.host, a.port), a.outdir)
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write(str(srv.server_address[1]))
        os.rename(a.port_file + ".tmp", a.port_file)
    threading.Timer(a.lifetime, srv.shutdown).start()
    srv.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
