#!/usr/bin/env python3
"""Figures for the listing hardening (docs/benchmarks.md, "Listings under load").

Starts a `starcite serve` binary on a fresh data dir on loopback and measures:
  scan   -- with SESSIONS small sessions: the latency of a listing whose metadata
            filter matches nothing, and of appends to one session alone and while
            LOOPERS clients loop over such listings;
  pages  -- with 400 sessions of 60 KB metadata: the server's RSS growth while 16
            connections pipeline 40 `GET /v1/sessions?limit=1000` each and never read.

Usage: scripts/listing_load.py BINARY scan|pages [--sessions N] [--shards N]
Standard library only; every loop is bounded; the server is killed at the end.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, shards):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="listing-load-", dir=os.environ.get("DATA_ROOT"))
        self.proc = subprocess.Popen(
            [binary, "serve", "--http-addr", f"127.0.0.1:{self.port}",
             "--data-dir", self.dir, "--shards", str(shards)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if self.request("GET", "/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("server did not become ready")

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method, path, body=None, conn=None):
        c = conn or self.conn()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        if conn is None:
            c.close()
        return r.status, data

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def create(server, count, threads, metadata):
    def work(t):
        c = server.conn()
        for n in range(t, count, threads):
            body = json.dumps({"id": f"s{n:07d}", "metadata": metadata(n)})
            status, data = server.request("POST", "/v1/sessions", body, c)
            assert status == 201, data
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def appends(server, count, pause):
    c = server.conn()
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        try:
            status, data = server.request(
                "POST", "/v1/sessions/writer/append", json.dumps({"type": "t", "payload": i}), c)
            assert status == 201, data
        except TimeoutError:
            # Counted as the client's 60 s timeout; the next append uses a new connection.
            print(f"append {i}: no answer within 60 s")
            c = server.conn()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(pause)
    return latencies


def scan(server, sessions, loopers):
    started = time.time()
    create(server, sessions, 32, lambda n: {"tag": str(n % 7)})
    print(f"created {sessions} sessions in {time.time() - started:.1f} s")
    server.request("POST", "/v1/sessions", json.dumps({"id": "writer"}))
    c = server.conn()
    lat = []
    for _ in range(20):
        t0 = time.perf_counter()
        status, data = server.request("GET", "/v1/sessions?metadata.tag=none", conn=c)
        lat.append((time.perf_counter() - t0) * 1000)
    page = json.loads(data)
    print(f"non-matching listing: p50 {pct(lat, 0.5):.1f} ms, max {max(lat):.1f} ms "
          f"(next_cursor {page['next_cursor']!r})")
    alone = appends(server, 100, 0.01)
    print(f"appends alone: p50 {pct(alone, 0.5):.1f} ms, p99 {pct(alone, 0.99):.1f} ms")
    stop = threading.Event()
    done = [0]

    def loop():
        c = server.conn()
        deadline = time.time() + 120
        while not stop.is_set() and time.time() < deadline:
            server.request("GET", "/v1/sessions?metadata.tag=none", conn=c)
            done[0] += 1
    ts = [threading.Thread(target=loop) for _ in range(loopers)]
    for t in ts:
        t.start()
    time.sleep(1)
    rss0 = server.rss_mib()
    busy = appends(server, 100, 0.02)
    stop.set()
    for t in ts:
        t.join()
    print(f"appends during {loopers} listing loops ({done[0]} listings): "
          f"p50 {pct(busy, 0.5):.1f} ms, p99 {pct(busy, 0.99):.1f} ms, max {max(busy):.1f} ms; "
          f"rss {rss0:.0f} -> {server.rss_mib():.0f} MiB")


def pages(server):
    pad = "m" * 60000
    create(server, 400, 8, lambda n: {"n": n, "pad": pad})
    status, data = server.request("GET", "/v1/sessions?limit=1000")
    print(f"GET /v1/sessions?limit=1000: {len(data)} bytes")
    base = server.rss_mib()
    request = b"GET /v1/sessions?limit=1000 HTTP/1.1\r\nHost: x\r\n\r\n" * 40
    hogs = []
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(request)
        hogs.append(s)
    peak = base
    for _ in range(50):
        peak = max(peak, server.rss_mib())
        time.sleep(0.1)
    print(f"rss {base:.0f} MiB -> peak {peak:.0f} MiB with 16 pipelining connections "
          f"that never read (+{peak - base:.0f} MiB)")
    for s in hogs:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("what", choices=["scan", "pages"])
    ap.add_argument("--sessions", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--loopers", type=int, default=32)
    args = ap.parse_args()
    server = Server(args.binary, args.shards)
    try:
        if args.what == "scan":
            scan(server, args.sessions, args.loopers)
        else:
            pages(server)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
