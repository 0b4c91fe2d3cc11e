#!/usr/bin/env python3
"""Memory a node holds for clients that start large frames and never finish.

Starts one node (the embedded engine, no Redis) on a loopback port, opens
CONNS WebSockets that each send the header of a frame of almost the max
payload and then BYTES of it, and stops there. After HOLD seconds it
prints the node's RSS before and during the attack, how many of the
attackers the node closed, and its `flowgate_read_held_bytes` and
`flowgate_read_budget_refused_total`; then it closes everything and stops
the node (by its PID). With --connected each socket first completes a
Socket.IO CONNECT with a valid token, as an authenticated attacker would.

    python3 loadtest/hold-frames.py [--bin target/release/flowgate]
        [--conns 1000] [--bytes 900000] [--hold 10] [--connected]
        [VAR=value ...]            (passed to the node)

Bounded: at most --conns sockets (capped at 5,000) for --hold seconds, on
loopback only. Written in Python with the standard library only, so it
runs against any build (A/B: --bin of each).
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

SECRET = "hold-frames-secret"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def token(user):
    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"userId": user, "exp": int(time.time()) + 3600}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def frame(payload: bytes) -> bytes:
    """A masked client text frame (zero mask)."""
    return header(len(payload)) + payload


def header(n: int) -> bytes:
    if n < 126:
        h = bytes([0x81, 0x80 | n])
    elif n < 65536:
        h = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        h = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return h + b"\0\0\0\0"


def read_until(s, marker: bytes, limit=65536):
    buf = b""
    while marker not in buf and len(buf) < limit:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def attacker(port, connected, i):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    read_until(s, b"\r\n\r\n")
    if connected:
        s.sendall(frame(("40/flows," + json.dumps({"token": token(f"h{i}")})).encode()))
        read_until(s, b"connected")
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/flowgate")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--bytes", type=int, default=900_000)
    ap.add_argument("--hold", type=float, default=10)
    ap.add_argument("--connected", action="store_true")
    ap.add_argument("vars", nargs="*")
    a = ap.parse_args()
    conns = min(a.conns, 5000)
    port = free_port()
    env = dict(os.environ)
    env.update(
        JWT_ACCESS_TOKEN_SECRET=SECRET,
        PORT=str(port),
        HOST="127.0.0.1",
        RUST_LOG="error",
        FLOWGATE_MAX_UNAUTHENTICATED_PER_IP=str(conns + 10),
        FLOWGATE_ACCESS_POLICY="open",
    )
    for kv in a.vars:
        k, v = kv.split("=", 1)
        env[k] = v
    node = subprocess.Popen([a.bin], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socks = []
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        time.sleep(1)
        before = rss_kib(node.pid)
        for i in range(conns):
            socks.append(attacker(port, a.connected, i))
        chunk = b"x" * 65536
        closed = set()
        for i, s in enumerate(socks):
            try:
                s.sendall(header(999_000))
                sent = 0
                while sent < a.bytes:
                    n = min(len(chunk), a.bytes - sent)
                    s.sendall(chunk[:n])
                    sent += n
            except OSError:
                closed.add(i)
        time.sleep(a.hold)
        during = rss_kib(node.pid)
        # A socket the node closed reads its close frame, then EOF.
        for i, s in enumerate(socks):
            s.setblocking(False)
            try:
                data = s.recv(65536)
                if data == b"" or b"\x88" in data:
                    closed.add(i)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(i)
        report = {
            "bin": a.bin,
            "conns": conns,
            "connected": a.connected,
            "bytes_each": a.bytes,
            "rss_before_kib": before,
            "rss_during_kib": during,
            "rss_growth_kib": during - before,
            "closed_by_node": len(closed),
            "read_held_bytes": metric(port, "flowgate_read_held_bytes"),
            "read_budget_refused": metric(port, "flowgate_read_budget_refused_total"),
        }
        print(json.dumps(report))
    finally:
        for s in socks:
            s.close()
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
