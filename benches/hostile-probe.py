#!/usr/bin/env python3
"""Hostile-peer probes for rmem: each subcommand starts its own donor (`rmem server`) or perf
server on 127.0.0.1 with free ports, attacks it with bounded counts and time, prints one JSON
line of figures and stops everything it started. Every connection goes to 127.0.0.1; hostile
peers bind their source address to --attacker-ip (default 127.0.0.2, also loopback) so that
per-source limits see them apart from the legitimate clients. Standard library only.

    benches/hostile-probe.py SUBCOMMAND --rmem target/release/rmem

Subcommands:

  wrong-token      An authenticated control session connects its data queue pair (tcp provider
                   hellos, private data = data_token), allocates one slab and sends `reconnect`.
                   A peer then connects to the reconnect's data_addr with a WRONG token and
                   pipelines a WRITE of "PWNED!!!" and a READ to the slab right behind its
                   hello. The slab is read back through the legitimate queue pair. Repeated
                   --trials times (fresh session each): landed_writes, reads_answered, and how
                   the donor answered the hello (accept / reject + status / nothing).
  slow-hellos      `rmem perf server`; 60 idle TCP connections and 4 that send one byte of a
                   hello every 2 s, then 5 `rmem perf client --op read -s 4K -n 1000` with a
                   15 s cap each: ok/5, and whether the server is still alive. Then the hostile
                   sockets close, up to 300 peers send both hellos and then close or reset (a
                   client that gave up), and one more client runs: does the server survive a
                   peer that fails its handshake? (aborts_sent: how many it took to end it.)
  reconnect-flood  One session sends 600 `reconnect`s (each awaited) while a second session
                   allocates and frees one slab in a loop: that client's alloc latency
                   (p50/max) before and during the flood, the donor's threads and fds before,
                   at peak and after, and how long the donor takes to exit after SIGTERM.
  silent-donor     A TCP server that accepts and never answers; `rmem swap up --backend nbd
                   --no-swapon` and `rmem perf alloc` against it, 60 s cap each: seconds until
                   exit and exit status (or "timeout at 60 s").
  nbd-unread       Donor with an NBD export; 2 connections do the handshake and send 64 READs
                   of 32 MiB each without ever reading a reply: the donor's RSS at start and
                   peak over 10 s. Then 300 idle TCP connections to the NBD port: how many are
                   still open after 15 s.
  admin-replay     Donor with its admin endpoint; one POST /shrink {"slabs":1} signed as
                   `rmem server shrink` signs it, sent once and then replayed byte for byte 4
                   times: how many were executed (HTTP 200) and slabs_retired from GET /status.
                   The signature scheme (ts,mac or ts,nonce,mac) is found with a harmless
                   signed POST /grow first.
  all              Every probe above in turn, one JSON line each.
"""

import argparse
import atexit
import hashlib
import hmac
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

_STARTED = []


def _cleanup():
    for p in _STARTED:
        p.kill()


atexit.register(_cleanup)


class Proc:
    """A child process whose stderr goes to a temporary file; killed at exit in any case."""

    def __init__(self, argv, env=None, stdout=subprocess.PIPE):
        self.argv = argv
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(argv, stdout=stdout, stderr=self.err, env=env,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.p.pid
        _STARTED.append(self)

    def first_line(self, timeout):
        """The first stdout line (the start-up line); later output is drained in the background."""
        fd = self.p.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"no start-up line from {self.argv[:3]}: {self.stderr_tail()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{self.argv[:3]} exited: {self.stderr_tail()}")
            buf += chunk
        sel.close()
        threading.Thread(target=self._drain, daemon=True).start()
        return buf.split(b"\n", 1)[0].decode()

    def _drain(self):
        try:
            while os.read(self.p.stdout.fileno(), 65536):
                pass
        except OSError:
            pass

    def alive(self):
        return self.p.poll() is None

    def stderr_tail(self, lines=3):
        try:
            self.err.seek(0)
            text = self.err.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        return " | ".join(strip_ansi(x) for x in text[-lines:])

    def stop(self, timeout=90.0):
        """SIGTERM, then the seconds until exit (None when it had to be killed)."""
        if not self.alive():
            return 0.0
        t = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout)
            return time.monotonic() - t
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                pass


def strip_ansi(s):
    out, esc = [], False
    for ch in s:
        if esc:
            esc = not ch.isalpha()
        elif ch == "\x1b":
            esc = True
        else:
            out.append(ch)
    return "".join(out)


def proc_threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def proc_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def env_with_secret(secret):
    env = dict(os.environ)
    env["RMEM_SECRET"] = secret
    env.pop("RMEM_LOG", None)
    return env


def start_donor(args, extra=(), size="64M"):
    """`rmem server` on 127.0.0.1 with free ports; returns (Proc, start-up JSON)."""
    argv = [args.rmem, "server", "--listen", f"{LOOPBACK}:0", "--json", "--hugepages", "never",
            "--no-pressure", "--size", size, "--slab-size", "1M",
            "--admin-listen", f"{LOOPBACK}:0", *extra]
    p = Proc(argv, env=env_with_secret(args.secret))
    info = json.loads(p.first_line(30))
    return p, info


def parse_addr(s):
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


def dial(addr, src_ip=None, timeout=5.0, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if src_ip:
        s.bind((src_ip, 0))
    s.settimeout(timeout)
    s.connect(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_until_close(s, seconds):
    """Everything the peer sends within `seconds` or until it closes or resets."""
    buf, deadline = b"", time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, "open"
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return buf, "open"
        except ConnectionResetError:
            return buf, "reset"
        if not chunk:
            return buf, "closed"
        buf += chunk


def is_open(s):
    """True while the peer has neither closed nor reset the connection (pending bytes are
    consumed: a greeting followed by a close counts as closed)."""
    s.setblocking(False)
    try:
        while True:
            if s.recv(65536) == b"":
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        try:
            s.settimeout(5.0)
        except OSError:
            pass


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def ms(x):
    return None if x is None else round(x * 1000.0, 3)


# --------------------------------------------------------------------------------------------
# The connection exchange (transport/src/exchange.rs: 16-byte header, provider payload, private
# data) and the tcp provider's wire format (transport/src/tcp/wire.rs: 17-byte payload of
# connection id and role; 40-byte request, 24-byte response). Little-endian.
# --------------------------------------------------------------------------------------------

HELLO_PRIMARY, HELLO_SECONDARY = 1, 2          # roles in a request's tcp payload
KIND_REQUEST, HELLO_ACCEPT, HELLO_REJECT = 1, 2, 3  # exchange hello kinds
PROVIDER_TCP = 1
HEADER_LEN = 16
OP_WRITE, OP_READ = 1, 3
RESP_ACK, RESP_READ_DATA, RESP_ATOMIC, RESP_NAK = 1, 2, 3, 4


def hello(role, conn_id, private_len=0):
    """A tcp request hello for one half (`private_len` bytes of private data must follow)."""
    return (b"RMEX" + struct.pack("<HBBHHHH", 1, KIND_REQUEST, PROVIDER_TCP, 0, 17, private_len, 0)
            + conn_id + bytes([role]))


def request(op, length, seq, rkey, addr):
    return struct.pack("<B3xIIIQQQ", op, length, seq, rkey, addr, 0, 0)


def parse_stream(buf):
    """Hellos and responses in the order they came (a target may answer before the hello)."""
    items, i = [], 0
    while i < len(buf):
        if buf[i:i + 4] == b"RMEX":
            if len(buf) - i < HEADER_LEN:
                break
            kind = buf[i + 6]
            status, paylen, plen = struct.unpack_from("<HHH", buf, i + 8)
            items.append({"hello": kind, "status": status})
            i += HEADER_LEN + paylen + plen
        else:
            if len(buf) - i < 24:
                break
            kind, nak, length, seq, value = struct.unpack_from("<BBxxII4xQ", buf, i)
            data = buf[i + 24:i + 24 + length] if kind == RESP_READ_DATA else b""
            items.append({"resp": kind, "nak": nak, "seq": seq, "data": data})
            i += 24 + (length if kind == RESP_READ_DATA else 0)
    return items


class DataQp:
    """The initiator side of a tcp-provider queue pair (primary + secondary connection)."""

    def __init__(self, addr, private, src_ip=None, timeout=10.0):
        self.conn_id = os.urandom(16)
        self.primary = dial(addr, src_ip, timeout)
        self.primary.sendall(hello(HELLO_PRIMARY, self.conn_id, len(private)) + private)
        self.secondary = dial(addr, src_ip, timeout)
        self.secondary.sendall(hello(HELLO_SECONDARY, self.conn_id))
        h = recv_exact(self.primary, HEADER_LEN)
        if h[:4] != b"RMEX":
            raise ConnectionError("reply is not a hello")
        self.kind, (self.status, paylen, plen) = h[6], struct.unpack_from("<HHH", h, 8)
        payload = recv_exact(self.primary, paylen)
        self.private = recv_exact(self.primary, plen)
        self.seq = 0
        if self.kind != HELLO_ACCEPT or payload[:16] != self.conn_id:
            self.close()
            raise ConnectionRefusedError(f"hello kind {self.kind} status {self.status}")

    def _call(self, op, length, rkey, addr, payload=b""):
        self.primary.sendall(request(op, length, self.seq, rkey, addr) + payload)
        self.seq += 1
        kind, nak, rlen, seq, _ = struct.unpack("<BBxxII4xQ", recv_exact(self.primary, 24))
        if kind == RESP_NAK:
            raise PermissionError(f"NAK {nak}")
        return recv_exact(self.primary, rlen) if kind == RESP_READ_DATA else b""

    def read(self, rkey, addr, n):
        return self._call(OP_READ, n, rkey, addr)

    def write(self, rkey, addr, data):
        self._call(OP_WRITE, len(data), rkey, addr, data)

    def close(self):
        for s in (self.primary, self.secondary):
            try:
                s.close()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# The donor's control protocol (memserver/src/protocol.rs, auth.rs): 4-byte big-endian length,
# JSON body; HMAC-SHA256 over length-prefixed parts.
# --------------------------------------------------------------------------------------------


def mac(secret, *parts):
    m = hmac.new(secret, digestmod=hashlib.sha256)
    for p in parts:
        p = p if isinstance(p, bytes) else str(p).encode()
        m.update(struct.pack(">Q", len(p)))
        m.update(p)
    return m.hexdigest()


class DonorError(Exception):
    pass


class Control:
    """An authenticated control session."""

    def __init__(self, addr, secret, client="hostile-probe", timeout=30.0):
        self.secret = secret.encode()
        self.s = dial(addr, timeout=timeout)
        self.next_id = 1
        nonce_c = os.urandom(32).hex()
        self.send({"type": "hello", "version": 1, "client": client, "nonce": nonce_c})
        ch = self.recv()
        if ch.get("type") != "challenge":
            raise DonorError(f"expected challenge, got {ch}")
        self.send({"type": "auth",
                   "mac": mac(self.secret, b"rmem-client-v1", ch["nonce"], nonce_c, client)})
        w = self.recv()
        if w.get("type") != "welcome":
            raise DonorError(f"expected welcome, got {w}")
        if not hmac.compare_digest(w["mac"], mac(self.secret, b"rmem-server-v1", nonce_c,
                                                 ch["nonce"])):
            raise DonorError("the donor's proof does not verify")
        self.data_addr = parse_addr(w["data_addr"])
        self.token = w["data_token"].encode()

    def send(self, msg):
        body = json.dumps(msg, separators=(",", ":")).encode()
        self.s.sendall(struct.pack(">I", len(body)) + body)

    def recv(self):
        (n,) = struct.unpack(">I", recv_exact(self.s, 4))
        return json.loads(recv_exact(self.s, n))

    def call(self, msg, timeout=30.0):
        """Sends a request and returns its reply (notices in between are skipped)."""
        rid = self.next_id
        self.next_id += 1
        self.s.settimeout(timeout)
        self.send({**msg, "id": rid})
        while True:
            r = self.recv()
            if r.get("id") == rid:
                if r.get("type") == "error":
                    raise DonorError(f"{r.get('code')}: {r.get('message')}")
                return r
            if r.get("type") == "error" and r.get("id") is None:
                raise DonorError(f"{r.get('code')}: {r.get('message')}")

    def alloc(self, count=1, timeout=30.0):
        return self.call({"type": "alloc", "count": count}, timeout)["slabs"]

    def free(self, slabs, timeout=30.0):
        self.call({"type": "free", "slabs": slabs}, timeout)

    def reconnect(self, timeout=30.0):
        r = self.call({"type": "reconnect"}, timeout)
        return parse_addr(r["data_addr"]), r["data_token"].encode()

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

PWNED = b"PWNED!!!"


def probe_wrong_token(args):
    donor, info = start_donor(args)
    addr = parse_addr(info["listening"])
    landed = acked = answered = 0
    replies = {"accept": 0, "reject": 0, "none": 0}
    reject_status, verified_via, errors, ports = set(), set(), [], set()
    try:
        for _ in range(args.trials):
            c = Control(addr, args.secret)
            legit = DataQp(c.data_addr, c.token)
            try:
                g = c.alloc(1)[0]["remote"]
                rkey, raddr = g["rkey"], g["addr"]
                if legit.read(rkey, raddr, 8) == PWNED:
                    raise RuntimeError("slab not clean before the attack")
                addr2, token2 = c.reconnect()
                ports.add(addr2[1])
                wrong = os.urandom(len(token2) // 2).hex().encode()
                cid = os.urandom(16)
                p = dial(addr2, args.attacker_ip)
                p.sendall(hello(HELLO_PRIMARY, cid, len(wrong)) + wrong
                          + request(OP_WRITE, 8, 0, rkey, raddr) + PWNED
                          + request(OP_READ, 8, 1, rkey, raddr))
                sec = dial(addr2, args.attacker_ip)
                sec.sendall(hello(HELLO_SECONDARY, cid))
                buf, _ = recv_until_close(p, 3.0)
                p.close()
                sec.close()
                items = parse_stream(buf)
                hellos = [x for x in items if "hello" in x]
                if not hellos:
                    replies["none"] += 1
                elif hellos[0]["hello"] == HELLO_ACCEPT:
                    replies["accept"] += 1
                else:
                    replies["reject"] += 1
                    reject_status.add(hellos[0]["status"])
                acked += any(x.get("resp") == RESP_ACK and x["seq"] == 0 for x in items)
                answered += any(x.get("resp") == RESP_READ_DATA and x["seq"] == 1
                                and len(x["data"]) == 8 for x in items)
                time.sleep(0.1)
                try:
                    now = legit.read(rkey, raddr, 8)
                    verified_via.add("original queue pair")
                except (OSError, PermissionError):
                    q = DataQp(addr2, token2)
                    now = q.read(rkey, raddr, 8)
                    q.close()
                    verified_via.add("queue pair with the reconnect token")
                landed += now == PWNED
            except Exception as e:  # a failed trial is reported, not fatal
                errors.append(f"{type(e).__name__}: {e}")
            finally:
                legit.close()
                c.close()
    finally:
        donor.kill()
    return {"trials": args.trials, "landed_writes": landed, "write_acks": acked,
            "reads_answered": answered, "hello_replies": replies,
            "reject_status": sorted(reject_status), "verified_via": sorted(verified_via),
            "distinct_reconnect_ports": len(ports), "errors": errors[:3]}


def probe_slow_hellos(args):
    srv = Proc([args.rmem, "perf", "server", "--listen", f"{LOOPBACK}:0", "--json",
                "--max-size", "1M"])
    addr = parse_addr(json.loads(srv.first_line(30))["listening"])
    target = f"{addr[0]}:{addr[1]}"
    hostile, stop = [], threading.Event()

    def client(cap=15.0):
        t = time.monotonic()
        try:
            r = subprocess.run([args.rmem, "perf", "client", target, "--op", "read", "-s", "4K",
                                "-n", "1000", "--warmup", "100", "--json"],
                               capture_output=True, timeout=cap, stdin=subprocess.DEVNULL)
            return {"rc": r.returncode, "s": round(time.monotonic() - t, 2),
                    "err": strip_ansi(r.stderr.decode(errors="replace").strip())[-160:]
                    if r.returncode else ""}
        except subprocess.TimeoutExpired:
            return {"rc": None, "s": cap, "err": f"timeout at {cap:.0f} s"}

    result = {}
    try:
        for _ in range(args.idle):
            hostile.append(dial(addr, args.attacker_ip))
        slow = [dial(addr, args.attacker_ip) for _ in range(args.slow)]
        hostile += slow
        line = hello(HELLO_PRIMARY, os.urandom(16))

        def drip():
            for i in range(len(line)):
                for s in slow:
                    try:
                        s.send(line[i:i + 1])
                    except OSError:
                        pass
                if stop.wait(2.0):
                    return

        threading.Thread(target=drip, daemon=True).start()
        runs = [client() for _ in range(args.clients)]
        result["ok"] = sum(r["rc"] == 0 for r in runs)
        result["clients"] = args.clients
        result["client_seconds"] = [r["s"] for r in runs]
        result["first_error"] = next((r["err"] for r in runs if r["rc"] != 0), "")
        result["hostile_open_at_end"] = sum(is_open(s) for s in hostile)
        result["alive_after_attack"] = srv.alive()
        # The attack stops. Peers that send both hellos and then go away (a client that gave
        # up waiting: close, or reset 2 ms later), up to --aborts of them: one failed handshake
        # must not end the server (whether it does is a race, hence the count).
        stop.set()
        for s in hostile:
            s.close()
        result["aborts_sent"] = 0
        for i in range(args.aborts):
            result["aborts_sent"] += 1
            cid = os.urandom(16)
            p = dial(addr)
            p.sendall(hello(HELLO_PRIMARY, cid))
            q = dial(addr)
            q.sendall(hello(HELLO_SECONDARY, cid))
            if i % 2:
                time.sleep(0.002)
                for s in (p, q):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            p.close()
            q.close()
            time.sleep(0.02)
            if not srv.alive():
                break
        time.sleep(2.0)
        after = client() if srv.alive() else {"rc": None, "err": "server gone"}
        result["client_after_abort_ok"] = after["rc"] == 0
        result["alive_at_end"] = srv.alive()
        if not srv.alive():
            result["server_exit"] = srv.p.returncode
            result["server_stderr"] = srv.stderr_tail(1)[-200:]
    finally:
        stop.set()
        for s in hostile:
            s.close()
        srv.kill()
    return result


def probe_reconnect_flood(args):
    donor, info = start_donor(args)
    addr = parse_addr(info["listening"])
    pid = donor.pid
    res = {"reconnects": args.reconnects}
    before_threads, before_fds = proc_threads(pid), proc_fds(pid)
    peak = {"threads": before_threads, "fds": before_fds}
    flood_done, stop_sampling = threading.Event(), threading.Event()

    def sample():
        while not stop_sampling.wait(0.2):
            try:
                peak["threads"] = max(peak["threads"], proc_threads(pid))
                peak["fds"] = max(peak["fds"], proc_fds(pid))
            except OSError:
                return

    legit = Control(addr, args.secret, client="legit")
    qp = DataQp(legit.data_addr, legit.token)

    def alloc_once():
        t = time.monotonic()
        s = legit.alloc(1, timeout=60.0)
        dt = time.monotonic() - t
        legit.free([s[0]["slab"]], timeout=60.0)
        return dt

    quiet = [alloc_once() for _ in range(50)]
    during, alloc_err = [], []

    def measure():
        end = None
        cap = time.monotonic() + args.cap
        while time.monotonic() < cap:
            if flood_done.is_set():
                end = end or time.monotonic() + 2.0
                if time.monotonic() > end:
                    return
            try:
                during.append(alloc_once())
            except Exception as e:
                alloc_err.append(f"{type(e).__name__}: {e}")
                return
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    m = threading.Thread(target=measure, daemon=True)
    flood = Control(addr, args.secret, client="flood")
    m.start()
    ok, err, ports = 0, None, set()
    t0 = time.monotonic()
    try:
        for _ in range(args.reconnects):
            a, _ = flood.reconnect(timeout=30.0)
            ports.add(a[1])
            ok += 1
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    flood_s = time.monotonic() - t0
    flood_done.set()
    flood_threads, flood_fds = proc_threads(pid), proc_fds(pid)
    m.join(args.cap + 70)
    after_threads, after_fds = proc_threads(pid), proc_fds(pid)
    stop_sampling.set()
    res.update({
        "reconnects_answered": ok, "flood_seconds": round(flood_s, 2),
        "distinct_data_ports": len(ports), "flood_error": err,
        "alloc_quiet_p50_ms": ms(pct(quiet, 0.5)), "alloc_quiet_max_ms": ms(max(quiet)),
        "alloc_during_n": len(during),
        "alloc_during_p50_ms": ms(pct(during, 0.5)),
        "alloc_during_max_ms": ms(max(during) if during else None),
        "alloc_error": alloc_err[0] if alloc_err else None,
        "threads_before": before_threads, "threads_after_flood": flood_threads,
        "threads_peak": peak["threads"], "threads_end": after_threads,
        "fds_before": before_fds, "fds_after_flood": flood_fds, "fds_peak": peak["fds"],
        "fds_end": after_fds, "measured_seconds": round(time.monotonic() - t0, 1),
    })
    qp.close()
    legit.close()
    flood.close()
    time.sleep(0.5)
    stop_s = donor.stop(args.stop_cap)
    res["stop_seconds"] = round(stop_s, 2) if stop_s is not None else f"killed after {args.stop_cap:.0f} s"
    res["exit_status"] = donor.p.returncode
    return res


def probe_silent_donor(args):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind((LOOPBACK, 0))
    lsock.listen(64)
    port = lsock.getsockname()[1]
    held, stop = [], threading.Event()

    def hold():
        lsock.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except socket.timeout:
                continue
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    donor = f"{LOOPBACK}:{port}"
    cmds = {
        "swap_up": [args.rmem, "swap", "up", "--size", "64M", "--donor", donor,
                    "--backend", "nbd", "--no-swapon", "--no-mlock"],
        "perf_alloc": [args.rmem, "perf", "alloc", donor, "-n", "10"],
    }
    env = env_with_secret(args.secret)
    res = {}

    def run(name, argv):
        t = time.monotonic()
        try:
            p = Proc(argv, env=env, stdout=subprocess.DEVNULL)
            rc = p.p.wait(args.cap)
            res[name] = {"seconds": round(time.monotonic() - t, 2), "exit": rc,
                         "stderr": p.stderr_tail(1)[-160:]}
        except subprocess.TimeoutExpired:
            p.kill()
            res[name] = f"timeout at {args.cap:.0f} s"
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"}

    try:
        threads = [threading.Thread(target=run, args=kv) for kv in cmds.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        lsock.close()
        for s in held:
            s.close()
    for name, argv in cmds.items():
        h = subprocess.run(argv[:3] + ["--help"], capture_output=True, timeout=10)
        res[f"{name}_has_connect_timeout_flag"] = b"--connect-timeout" in h.stdout
    res["connections_held"] = len(held)
    return res


NBD_MAGIC = 0x4E42444D41474943
NBD_IHAVEOPT = 0x49484156454F5054
NBD_REQUEST_MAGIC = 0x25609513


def nbd_attach(addr, name, src_ip=None):
    s = dial(addr, src_ip, rcvbuf=64 << 10)
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    if magic != NBD_MAGIC or opt != NBD_IHAVEOPT:
        raise ConnectionError("not an NBD fixed newstyle server")
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(struct.pack(">QII", NBD_IHAVEOPT, 1, len(name)) + name)  # EXPORT_NAME
    size, _tflags = struct.unpack(">QH", recv_exact(s, 10))
    return s, size


def probe_nbd_unread(args):
    donor, info = start_donor(args, ["--export", "x=64M", "--nbd-listen", f"{LOOPBACK}:0"])
    nbd = parse_addr(info["nbd"])
    pid = donor.pid
    res = {}
    conns, idle = [], []
    try:
        time.sleep(0.5)
        res["rss_start_mib"] = round(proc_rss_mib(pid), 1)
        sent = 0
        for _ in range(args.conns):
            s, size = nbd_attach(nbd, b"x", args.attacker_ip)
            conns.append(s)
            n = min(32 << 20, size)
            offsets = [0] if size <= n else [0, size - n]
            reqs = b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 0, i,
                                        offsets[i % len(offsets)], n)
                            for i in range(args.reads))
            s.sendall(reqs)
            sent += args.reads
        res["reads_sent"] = sent
        res["read_bytes"] = n
        peak, t_end = 0.0, time.monotonic() + args.sample
        while time.monotonic() < t_end:
            peak = max(peak, proc_rss_mib(pid))
            time.sleep(0.1)
        res["rss_peak_mib"] = round(peak, 1)
        res["donor_alive"] = donor.alive()
        for s in conns:
            s.close()
        conns = []
        time.sleep(2.0)
        res["rss_after_close_mib"] = round(proc_rss_mib(pid), 1) if donor.alive() else None
        refused = 0
        for _ in range(args.idle):
            try:
                idle.append(dial(nbd, args.attacker_ip))
            except OSError:
                refused += 1
        res["idle_opened"] = len(idle)
        res["idle_refused_at_connect"] = refused
        time.sleep(args.idle_wait)
        res["idle_open_after_s"] = args.idle_wait
        res["idle_still_open"] = sum(is_open(s) for s in idle)
        res["donor_fds_with_idle"] = proc_fds(pid)
    finally:
        for s in conns + idle:
            s.close()
        donor.kill()
    return res


def http(addr, raw, timeout=10.0):
    s = dial(addr, timeout=timeout)
    try:
        s.sendall(raw)
        buf, _ = recv_until_close(s, timeout)
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else None
    return status, body


def post_bytes(addr, path, body, authorization):
    return (f"POST {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n"
            f"Authorization: {authorization}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def sign_ts_mac(secret, method, path, body):
    ts = int(time.time())
    return f"rmem-hmac ts={ts},mac={mac(secret, b'rmem-admin-v1', method, path, body, ts)}"


def sign_ts_nonce_mac(secret, method, path, body):
    ts, nonce = int(time.time()), os.urandom(16).hex()
    m = mac(secret, b"rmem-admin-v2", method, path, body, ts, nonce)
    return f"rmem-hmac ts={ts},nonce={nonce},mac={m}"


SIGNERS = {"ts,mac (rmem-admin-v1)": sign_ts_mac,
           "ts,nonce,mac (rmem-admin-v2)": sign_ts_nonce_mac}


def probe_admin_replay(args):
    donor, info = start_donor(args)
    admin = parse_addr(info["admin"])
    secret = args.secret.encode()
    res = {}
    try:
        signer = None
        for name, sign in SIGNERS.items():
            body = b'{"slabs":1}'
            st, _ = http(admin, post_bytes(admin, "/grow", body,
                                           sign(secret, "POST", "/grow", body)))
            if st == 200:
                signer, res["scheme"] = sign, name
                break
        if signer is None:
            raise RuntimeError("no known admin signature scheme was accepted")
        body = b'{"slabs":1}'
        raw = post_bytes(admin, "/shrink", body, signer(secret, "POST", "/shrink", body))
        statuses = [http(admin, raw)[0] for _ in range(1 + args.replays)]
        st, status_body = http(admin, f"GET /status HTTP/1.1\r\nHost: {admin[0]}:{admin[1]}\r\n"
                                      "Connection: close\r\n\r\n".encode())
        status = json.loads(_dechunk(status_body))
        retired = status.get("donor", status)["slabs_retired"]
        res.update({"sent": 1 + args.replays, "statuses": statuses,
                    "executed": statuses.count(200), "replays_executed": statuses[1:].count(200),
                    "slabs_retired": retired})
    finally:
        donor.kill()
    return res


def _dechunk(body):
    """The body as sent, whether or not it came chunked."""
    b = body.strip()
    if b.startswith(b"{"):
        return b
    out = b""
    while b:
        size, _, rest = b.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out += rest[:n]
        b = rest[n + 2:]
    return out


PROBES = {
    "wrong-token": probe_wrong_token,
    "slow-hellos": probe_slow_hellos,
    "reconnect-flood": probe_reconnect_flood,
    "silent-donor": probe_silent_donor,
    "nbd-unread": probe_nbd_unread,
    "admin-replay": probe_admin_replay,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rmem", required=True, help="the rmem binary to test")
    common.add_argument("--attacker-ip", default="127.0.0.2",
                        help="loopback source address of hostile peers [127.0.0.2]")
    common.add_argument("--secret", default=os.urandom(24).hex(),
                        help="shared secret for the donors started here [random]")
    sub = ap.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("wrong-token", parents=[common])
    p.add_argument("--trials", type=int, default=20)
    p = sub.add_parser("slow-hellos", parents=[common])
    p.add_argument("--idle", type=int, default=60)
    p.add_argument("--slow", type=int, default=4)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--aborts", type=int, default=300)
    p = sub.add_parser("reconnect-flood", parents=[common])
    p.add_argument("--reconnects", type=int, default=600)
    p.add_argument("--cap", type=float, default=60.0, help="longest alloc measurement, s")
    p.add_argument("--stop-cap", type=float, default=90.0, help="longest wait after SIGTERM, s")
    p = sub.add_parser("silent-donor", parents=[common])
    p.add_argument("--cap", type=float, default=60.0)
    p = sub.add_parser("nbd-unread", parents=[common])
    p.add_argument("--conns", type=int, default=2)
    p.add_argument("--reads", type=int, default=64)
    p.add_argument("--sample", type=float, default=10.0)
    p.add_argument("--idle", type=int, default=300)
    p.add_argument("--idle-wait", type=float, default=15.0)
    p = sub.add_parser("admin-replay", parents=[common])
    p.add_argument("--replays", type=int, default=4)
    p = sub.add_parser("all", parents=[common])
    args = ap.parse_args()

    def term(*_):
        raise SystemExit(130)

    signal.signal(signal.SIGTERM, term)
    args.rmem = os.path.abspath(args.rmem)
    names = list(PROBES) if args.probe == "all" else [args.probe]
    for name in names:
        a = args
        if args.probe == "all":  # each subcommand with its defaults
            a = ap.parse_args([name, "--rmem", args.rmem, "--attacker-ip", args.attacker_ip,
                               "--secret", args.secret])
        t = time.monotonic()
        try:
            out = PROBES[name](a)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        line = {"probe": name, "rmem": a.rmem, **out,
                "probe_seconds": round(time.monotonic() - t, 1)}
        print(json.dumps(line), flush=True)
        _cleanup()


if __name__ == "__main__":
    main()
