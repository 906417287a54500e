#!/usr/bin/env bash
# Live migration of one running TCG guest between two QEMUs on this host: QEMU's own migration
# next to `rmem migrate send/recv` over the tcp provider, in one run, so the figures share the
# machine's state. Each run boots a fresh source guest (the migration tests' guest: it rewrites
# an 8 MiB hot set every 100 ms and checks every page it wrote; migrate/guest/build.sh) and a
# fresh destination waiting with -incoming defer, both with their RAM in a file on /dev/shm.
#
#   benches/migrate-compare.sh [--runs N | --quick] [--out FILE] [--rmem PATH] [--rows 1,2,...]
#                              [--svg FILE]   (the medians drawn as bars, QEMU's rows next to rmem's)
#                              [--keep]   (keep each run's logs: serial, heartbeat, QEMU, rmem)
#
# Rows: 1 QEMU tcp (QEMU's defaults), 2 QEMU tcp with max-bandwidth 10 GiB/s, 3 QEMU post-copy
# over unix (started right after migrate), 4 rmem stream, 5 rmem stop-copy, 6 rmem precopy
# (page hashes), 7 rmem post-copy, 8 rmem hybrid, 9 rmem precopy with exact dirty pages (rows 7-9
# load rmem's preload library into both QEMUs).
# Per row: median and min-max over the runs of the total time, the downtime as the tool reports
# it and as QEMU reports it, the longest gap in the guest's heartbeat (one byte every 10 ms on
# ttyS1, timestamped by the host: the pause the guest really saw), bytes moved and the source
# side's CPU seconds. Every run must leave the guest ticking on the destination with bad=0; a
# row with a run that does not is marked FAILED and that run is left out of its figures.
# Raw per-run JSON lines go to --out (default /tmp/migrate-compare.jsonl).
#
# Under TCG on a busy host the figures compare the rows with each other; they are not the speed
# of any of them on real hardware.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

usage() {
  echo "usage: $0 [--runs N | --quick] [--out FILE] [--rmem PATH] [--rows 1,2,...,9] [--keep] [--svg FILE]" >&2
  exit 2
}
runs=5
out=/tmp/migrate-compare.jsonl
target_dir=${CARGO_TARGET_DIR:-$repo/target}
rmem=$target_dir/release/rmem
rows=1,2,3,4,5,6,7,8,9
keep=0
while (($#)); do
  case $1 in
    --runs) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage; runs=$2; shift 2 ;;
    --quick) runs=1; shift ;;
    --out) [[ -n ${2:-} ]] || usage; out=$2; shift 2 ;;
    --rmem) [[ -n ${2:-} ]] || usage; rmem=$2; shift 2 ;;
    --svg) [[ -n ${2:-} ]] || usage; svg_out=$2; shift 2 ;;
    --rows) [[ ${2:-} =~ ^[1-9](,[1-9])*$ ]] || usage; rows=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage ;;
    *) usage ;;
  esac
done

for tool in qemu-system-x86_64 python3 gcc cpio; do
  command -v "$tool" >/dev/null || { echo "$0: $tool missing (scripts/test.sh installs what the migration tests need)" >&2; exit 1; }
done
if [[ $rmem == "$target_dir/release/rmem" ]]; then
  # Built (or found up to date) from this tree, with the preload library next to it.
  echo "building $rmem and librmem_preload.so (release)" >&2
  CARGO_TARGET_DIR=$target_dir cargo build --release -q -p rmem --bin rmem
  CARGO_TARGET_DIR=$target_dir cargo build --release -q -p rmem-preload
fi
[[ -x $rmem ]] || { echo "$0: $rmem missing" >&2; exit 1; }
read -r kernel initrd < <(migrate/guest/build.sh "$target_dir/tmp/rmem-guest")

work=$(mktemp -d /tmp/migrate-compare.XXXXXX)
shm=/dev/shm/rmem-mig-bench-$$
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -f "$shm"-*
  rm -f "$work/secret"
  if ((keep)); then echo "run logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

secret=$work/secret
(umask 077; head -c 32 /dev/urandom | base64 >"$secret")

# --- the helper: serial/heartbeat reader, QMP client, QEMU's own migration, checks, table ---
cat >"$work/helper.py" <<'PY'
import json, os, selectors, signal, socket, statistics, subprocess, sys, threading, time

mono = time.monotonic
TCK = os.sysconf("SC_CLK_TCK")

def cpu_s(pid):
    """utime+stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / TCK

class QmpError(Exception):
    pass

class Qmp:
    """A QMP client; events are kept with the monotonic time they arrived."""
    def __init__(self, path, timeout=30.0):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""
        self.events = []
        self.lock = threading.Lock()
        g = self._read()
        if "QMP" not in g:
            raise QmpError(f"{path}: not a QMP greeting: {g}")
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise QmpError("QMP connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        m = {"execute": name}
        if args:
            m["arguments"] = args
        self.s.sendall(json.dumps(m).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append((mono(), r["event"]))
                continue
            if "error" in r:
                raise QmpError(f"{name}: {r['error'].get('desc')}")
            return r.get("return")

    def watch(self, name):
        """Reads events in a thread (no command may be sent meanwhile); returns a dict that
        gets 't' when `name` arrives."""
        seen = {}
        def run():
            try:
                while "t" not in seen:
                    r = self._read()
                    if r.get("event") == name:
                        seen["t"] = mono()
            except Exception as e:
                seen["error"] = str(e)
        self.s.settimeout(None)
        threading.Thread(target=run, daemon=True).start()
        return seen

    def close(self):
        self.s.close()

def console(d):
    """Listens on d/{src,dst}.{ser,hb}; logs serial lines and heartbeat reads with the time
    they arrived: d/NAME.log holds `t line` (ser) or `t nbytes` (hb)."""
    sel = selectors.DefaultSelector()
    logs = {}
    for who in ("src", "dst"):
        for kind in ("ser", "hb"):
            name = f"{who}.{kind}"
            path = os.path.join(d, name)
            l = socket.socket(socket.AF_UNIX)
            l.bind(path)
            l.listen(1)
            sel.register(l, selectors.EVENT_READ, ("listen", name))
            logs[name] = open(os.path.join(d, name + ".log"), "a", buffering=1)
    open(os.path.join(d, "console.ready"), "w").close()
    partial = {}
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        for key, _ in sel.select():
            what, name = key.data
            if what == "listen":
                c, _ = key.fileobj.accept()
                sel.register(c, selectors.EVENT_READ, ("conn", name))
                open(os.path.join(d, name + ".connected"), "w").close()
                continue
            data = key.fileobj.recv(65536)
            t = mono()
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                continue
            if name.endswith(".hb"):
                logs[name].write(f"{t:.6f} {len(data)}\n")
                continue
            buf = partial.get(name, b"") + data
            *lines, partial[name] = buf.split(b"\n")
            for line in lines:
                logs[name].write(f"{t:.6f} {line.decode('utf-8', 'replace').rstrip()}\n")

def events(d, timeout):
    """Connects to both QEMUs' second QMP monitor (d/{src,dst}.ev) and logs every event with
    QEMU's own timestamp (host realtime, microseconds) to d/{src,dst}.ev.log: `ts NAME`.
    The source's STOP and the destination's RESUME give the pause every row shares, taken
    the same way whoever drives the migration."""
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    conns = {}
    end = mono() + timeout
    while len(conns) < 2:
        for who in ("src", "dst"):
            if who in conns:
                continue
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(os.path.join(d, who + ".ev"))
                s.sendall(b'{"execute":"qmp_capabilities"}\n')
                conns[who] = s
            except OSError:
                s.close()
        if mono() > end:
            sys.exit("no event monitor to connect to")
        time.sleep(0.05)
    open(os.path.join(d, "events.ready"), "w").close()
    sel = selectors.DefaultSelector()
    bufs = {}
    for who, s in conns.items():
        sel.register(s, selectors.EVENT_READ, who)
        bufs[who] = (b"", open(os.path.join(d, who + ".ev.log"), "a", buffering=1))
    while True:
        for key, _ in sel.select():
            who = key.data
            data = key.fileobj.recv(65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            buf, log = bufs[who]
            *lines, rest = (buf + data).split(b"\n")
            bufs[who] = (rest, log)
            for line in lines:
                try:
                    m = json.loads(line)
                except ValueError:
                    continue
                if "event" in m:
                    ts = m.get("timestamp", {})
                    log.write(f"{ts.get('seconds', 0) + ts.get('microseconds', 0) / 1e6:.6f} {m['event']}\n")

def pause_ms(d):
    """From the source's last STOP to the destination's first RESUME, by QEMU's own event
    timestamps (one host clock); None when either is missing."""
    stops = [float(t) for t, e in read_log(d, "src.ev") if e == "STOP"]
    resumes = [float(t) for t, e in read_log(d, "dst.ev") if e == "RESUME"]
    if not stops or not resumes:
        return None
    after = [t for t in resumes if t >= stops[-1]]
    return (after[0] - stops[-1]) * 1e3 if after else None

def read_log(d, name):
    try:
        with open(os.path.join(d, name + ".log")) as f:
            for line in f:
                t, _, rest = line.rstrip("\n").partition(" ")
                yield float(t), rest
    except FileNotFoundError:
        return

def ticks(d, who):
    """[(t, n, bad)], and whether the guest printed `rmem-guest ready`."""
    out, ready = [], False
    for t, line in read_log(d, f"{who}.ser"):
        if line == "rmem-guest ready":
            ready = True
        elif line.startswith("tick ") and " bad=" in line:
            n, bad = line[5:].split(" bad=")
            out.append((t, int(n), int(bad)))
    return out, ready

def wait_boot(d, timeout):
    """The source guest is ready and three ticks in, all bad=0."""
    end = mono() + timeout
    while mono() < end:
        tk, ready = ticks(d, "src")
        if ready and len(tk) >= 3:
            if any(b for _, _, b in tk):
                sys.exit(f"the source guest reports bad pages before the migration: {tk[-1]}")
            return
        time.sleep(0.2)
    sys.exit(f"the source guest was not ready and ticking within {timeout} s")

def check(d, t0, t1, timeout):
    """After a migration that started at t0 and ended at t1: the guest must tick on at the
    destination (12 ticks past the source's last, so at least one full check of the cold
    set), every tick on both sides bad=0, no restart, and the source silent. Then the
    heartbeat's longest gap across the migration."""
    why = None
    end = mono() + timeout
    while True:
        src, _ = ticks(d, "src")
        dst, dst_ready = ticks(d, "dst")
        if dst_ready:
            why = "the guest restarted on the destination"
            break
        if any(b for _, _, b in src + dst):
            bad = max(b for _, _, b in src + dst)
            why = f"bad pages: bad={bad}"
            break
        if len(dst) >= 12:
            break
        if mono() > end:
            why = f"only {len(dst)} ticks on the destination within {timeout} s"
            break
        time.sleep(0.2)
    last_src = src[-1] if src else None
    if why is None and last_src and dst and dst[0][1] <= last_src[1]:
        why = f"the destination's ticks {dst[0][1]}.. do not follow the source's {last_src[1]}"
    late = [x for x in src if x[0] > t1 + 1.0]
    if why is None and late:
        why = f"the source still ticks after the migration (tick {late[-1][1]})"
    hb = sorted([t for t, _ in read_log(d, "src.hb")] + [t for t, _ in read_log(d, "dst.hb")])
    def longest(a, b):
        g, at = 0.0, None
        prev = None
        for t in hb:
            if prev is not None and t > a and prev < b and t - prev > g:
                g, at = t - prev, prev
            prev = t
        return g, at
    gap, gap_at = longest(t0, t1 + 2.0)
    base, _ = longest(t0 - 3.0, t0)
    dst_hb = [t for t, _ in read_log(d, "dst.hb")]
    if why is None and not dst_hb:
        why = "no heartbeat from the destination"
    return {
        "ok": why is None,
        "why": why,
        "heartbeat_gap_ms": gap * 1e3 if hb else None,
        "pause_ms": pause_ms(d),
        "heartbeat_gap_from_start_ms": (gap_at - t0) * 1e3 if gap_at else None,
        "heartbeat_gap_before_ms": base * 1e3 if hb else None,
        "src_last_tick": last_src[1] if last_src else None,
        "dst_ticks": [n for _, n, _ in dst[:3]] + (["..", dst[-1][1]] if len(dst) > 3 else []),
        "bad": max([b for _, _, b in src + dst], default=None),
    }

def native(row, src_qmp, dst_qmp, src_pid, d, timeout):
    """QEMU's own migration, driven the way a management tool would: both sides set up,
    `migrate`, poll the source's query-migrate every 10 ms (as rmem send does), the
    destination's RESUME event taken as it arrives."""
    s, q = Qmp(src_qmp), Qmp(dst_qmp)
    r = {"row": row, "src_params": s.cmd("query-migrate-parameters")}
    post = row == "qemu-postcopy-unix"
    if post:
        for x in (s, q):
            x.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "postcopy-ram", "state": True}])
    if row == "qemu-tcp-10g":
        s.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
    if row.startswith("qemu-tcp"):
        q.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = q.cmd("query-migrate")["socket-address"][0]["port"]
        uri = f"tcp:127.0.0.1:{port}"
    else:
        uri = f"unix:{os.path.join(d, 'mig.sock')}"
        q.cmd("migrate-incoming", uri=uri)
    r["uri"] = uri
    resumed = q.watch("RESUME")
    c0, t0 = cpu_s(src_pid), mono()
    s.cmd("migrate", uri=uri)
    if post:
        s.cmd("migrate-start-postcopy")
    t_done, m, err = None, None, None
    while True:
        m = s.cmd("query-migrate")
        st = m.get("status")
        if st == "completed" and t_done is None:
            t_done = mono()
        if st in ("failed", "cancelled"):
            err = f"QEMU's migration {st}: {m.get('error-desc', 'no reason given')}"
            break
        if t_done is not None and "t" in resumed:
            break
        if mono() - t0 > timeout:
            err = f"not done after {timeout} s (source {st}, destination resumed: {'t' in resumed})"
            s.cmd("migrate_cancel")
            break
        time.sleep(0.01)
    t1 = max(t_done or mono(), resumed.get("t", 0))
    c1 = cpu_s(src_pid)
    r.update({
        "ok": err is None, "why": err, "t0": t0, "t1": t1,
        "total_ms": (t1 - t0) * 1e3,
        "dst_resumed_ms": (resumed["t"] - t0) * 1e3 if "t" in resumed else None,
        "tool_total_ms": m.get("total-time"),
        "tool_downtime_ms": m.get("downtime"),
        "qemu_downtime_ms": m.get("downtime"),
        "wire_bytes": m.get("ram", {}).get("transferred"),
        "qemu_ram_transferred": m.get("ram", {}).get("transferred"),
        "src_qemu_cpu_s": c1 - c0, "src_cpu_s": c1 - c0,
        "query_migrate": m,
        "src_status": s.cmd("query-status")["status"],
    })
    s.close()
    return r

def rusage(outfile, sample_pid, argv, timeout):
    """Runs argv, passing signals on; writes its own CPU (wait4's rusage) and the CPU of
    sample_pid over the same window to outfile; exits with its status."""
    c0 = cpu_s(sample_pid) if sample_pid else None
    t0 = mono()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE)
    # Its stdout passed on line by line; when the result line came is kept.
    seen = {}
    def lines():
        for line in p.stdout:
            if b'"event":"result"' in line and "result_t" not in seen:
                seen["result_t"] = mono()
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
    reader = threading.Thread(target=lines)
    reader.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, f: p.send_signal(n))
    signal.signal(signal.SIGALRM, lambda n, f: p.kill())
    signal.alarm(timeout)
    while True:
        try:
            _, status, ru = os.wait4(p.pid, 0)
            break
        except InterruptedError:
            continue
    t1 = mono()
    c1 = cpu_s(sample_pid) if sample_pid else None
    reader.join(5)
    code = os.waitstatus_to_exitcode(status)
    with open(outfile, "w") as f:
        json.dump({"t0": t0, "t1": t1, "result_t": seen.get("result_t"), "exit": code,
                   "utime": ru.ru_utime, "stime": ru.ru_stime,
                   "sample_cpu_s": None if c0 is None else c1 - c0}, f)
    sys.exit(code if code >= 0 else 128 - code)

def last_json(path, event):
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if v.get("event") == event:
            return v
    return None

def rmem_result(row, d):
    """One rmem run's record from the files the run left in d."""
    send = json.load(open(os.path.join(d, "send.rusage")))
    recv = json.load(open(os.path.join(d, "recv.rusage"))) if os.path.exists(os.path.join(d, "recv.rusage")) else None
    res = last_json(os.path.join(d, "send.out"), "result")
    dres = last_json(os.path.join(d, "recv.out"), "result")
    after = json.load(open(os.path.join(d, "src-after.json")))
    m = after.get("query_migrate") or {}
    why = None
    if send["exit"] != 0:
        err = open(os.path.join(d, "send.err")).read().strip().splitlines()
        why = f"rmem migrate send exited {send['exit']}: {err[-1] if err else ''}"
    elif res is None:
        why = "no result line from rmem migrate send --json"
    elif recv is not None and recv["exit"] != 0:
        why = f"rmem migrate recv exited {recv['exit']}"
    res = res or {}
    send_cpu = send["utime"] + send["stime"]
    # The migration is done when send prints its result (destination running); the process
    # exits a little later.
    done = send.get("result_t") or send["t1"]
    return {
        "row": row, "ok": why is None, "why": why,
        "t0": send["t0"], "t1": done,
        "total_ms": (done - send["t0"]) * 1e3,
        "send_exit_ms": (send["t1"] - send["t0"]) * 1e3,
        "tool_total_ms": res.get("total_ms"),
        "tool_downtime_ms": res.get("downtime_ms"),
        "qemu_downtime_ms": res.get("qemu_downtime_ms", m.get("downtime")),
        "qemu_downtime_after_ms": m.get("downtime"),
        "wire_bytes": (res.get("page_bytes") or 0) + (res.get("stream_bytes") or 0) if res else None,
        "page_bytes": res.get("page_bytes"), "stream_bytes": res.get("stream_bytes"),
        "qemu_ram_transferred": m.get("ram", {}).get("transferred"),
        "src_qemu_cpu_s": send["sample_cpu_s"], "send_cpu_s": send_cpu,
        "src_cpu_s": send["sample_cpu_s"] + send_cpu,
        "recv_cpu_s": recv["utime"] + recv["stime"] if recv else None,
        "rmem_result": res, "rmem_recv_result": dres,
        "src_status": after.get("status"), "query_migrate": m,
    }

def qmp_after(path, outfile):
    s = Qmp(path)
    json.dump({"status": s.cmd("query-status")["status"],
               "query_migrate": s.cmd("query-migrate"),
               "params": s.cmd("query-migrate-parameters")}, open(outfile, "w"))

def stats(xs, p=0):
    """median (min-max), p decimals."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    f = lambda v: f"{v:.{p}f}"
    med = statistics.median(xs)
    return f(med) if len(xs) == 1 else f"{f(med)} ({f(min(xs))}-{f(max(xs))})"

def table(outfile, rows, runs, info):
    recs = [json.loads(l) for l in open(outfile) if l.strip()]
    names = {
        "qemu-tcp": "1. QEMU tcp, defaults",
        "qemu-tcp-10g": "2. QEMU tcp, max-bandwidth 10 GiB/s",
        "qemu-postcopy-unix": "3. QEMU post-copy, unix",
        "rmem-stream": "4. rmem stream",
        "rmem-stop-copy": "5. rmem stop-copy",
        "rmem-precopy": "6. rmem precopy",
        "rmem-postcopy": "7. rmem post-copy",
        "rmem-hybrid": "8. rmem hybrid",
        "rmem-precopy-exact": "9. rmem precopy, exact dirty pages",
    }
    print(f"\n## Live migration of a 128 MiB TCG guest between two QEMUs on this host ({runs} run(s) a row)\n")
    print("| row | runs ok | total ms | downtime ms (tool's own) | downtime ms (QEMU) | pause ms (QMP events) | heartbeat gap ms | MB moved | source CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        rs = [r for r in recs if r["row"] == row]
        ok = [r for r in rs if r["ok"]]
        status = f"{len(ok)}/{len(rs)}"
        if len(ok) < len(rs) or not rs:
            whys = sorted({r.get("why") or "?" for r in rs if not r["ok"]})
            status = f"**FAILED** {status}: " + "; ".join(whys)
        g = lambda k, scale=1, p=0: stats(
            [r.get(k) / scale if r.get(k) is not None else None for r in ok], p)
        print(f"| {names[row]} | {status} | {g('total_ms')} | {g('tool_downtime_ms')} | "
              f"{g('qemu_downtime_ms')} | {g('pause_ms')} | {g('heartbeat_gap_ms')} | {g('wire_bytes', 1e6, 1)} | "
              f"{g('src_cpu_s', 1, 2)} |")
    print()
    # QEMU's defaults as a fresh source QEMU reported them (before a row changed anything).
    p = next((r["src_params"] for r in recs if r.get("src_params")), None)
    defaults = (f"max-bandwidth {p['max-bandwidth'] / 2**20:.0f} MiB/s, downtime-limit "
                f"{p['downtime-limit']} ms" if p else
                "max-bandwidth 128 MiB/s, downtime-limit 300 ms (not read back: no QEMU row run)")
    for line in info:
        print(line.replace("@DEFAULTS@", defaults))
    ok = [r for r in recs if r["ok"]]
    base = [r.get("heartbeat_gap_before_ms") for r in ok if r.get("heartbeat_gap_before_ms")]
    late = [r["send_exit_ms"] - r["total_ms"] for r in ok if r.get("send_exit_ms")]
    if late:
        print(f"- `rmem migrate send` exited {stats(late)} ms after printing its result "
              f"(not in total).")
    if base:
        print(f"- Heartbeat: the guest's longest gap in the 3 s before each migration was "
              f"{stats(base)} ms (the noise floor of this host under TCG).")

def bars(outfile, rows, barsfile):
    """The medians of each row as `rmem perf plot --bars` input."""
    recs = [json.loads(l) for l in open(outfile) if l.strip()]
    short = {"qemu-tcp": "QEMU tcp", "qemu-tcp-10g": "QEMU 10G", "qemu-postcopy-unix": "QEMU post",
             "rmem-stream": "stream", "rmem-stop-copy": "stop-copy", "rmem-precopy": "precopy",
             "rmem-postcopy": "post-copy", "rmem-hybrid": "hybrid", "rmem-precopy-exact": "exact"}
    measures = [("total", "ms", "total_ms", 1), ("downtime (tool's own)", "ms", "tool_downtime_ms", 1),
                ("pause (QMP events)", "ms", "pause_ms", 1), ("heartbeat gap", "ms", "heartbeat_gap_ms", 1), ("moved", "MB", "wire_bytes", 1e6),
                ("source CPU", "s", "src_cpu_s", 1)]
    groups = []
    for title, unit, key, scale in measures:
        bs = []
        for row in rows:
            xs = [r[key] / scale for r in recs if r["row"] == row and r["ok"] and r.get(key) is not None]
            bs.append([short.get(row, row), statistics.median(xs) if xs else None])
        groups.append(dict(measure=title, unit=unit, bars=bs))
    json.dump(dict(title="Live migration of a 128 MiB guest: QEMU (first three) and rmem", groups=groups),
              open(barsfile, "w"))

def main():
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "bars":
        bars(a[0], a[1].split(","), a[2])
        return
    if cmd == "console":
        console(a[0])
    elif cmd == "events":
        events(a[0], float(a[1]))
    elif cmd == "wait-boot":
        wait_boot(a[0], float(a[1]))
    elif cmd == "wait-file":
        end = mono() + float(a[1])
        while not os.path.exists(a[0]):
            if mono() > end:
                sys.exit(f"{a[0]}: not there within {a[1]} s")
            time.sleep(0.05)
    elif cmd == "wait-listening":
        end = mono() + float(a[1])
        while True:
            v = last_json(a[0], "listening")
            if v:
                print(v["addr"])
                return
            if mono() > end:
                sys.exit(f"rmem migrate recv did not listen within {a[1]} s")
            time.sleep(0.05)
    elif cmd == "native":
        row, src_qmp, dst_qmp, src_pid, d, timeout = a
        try:
            r = native(row, src_qmp, dst_qmp, int(src_pid), d, float(timeout))
        except Exception as e:
            r = {"row": row, "ok": False, "why": f"{type(e).__name__}: {e}", "t0": mono(), "t1": mono()}
        json.dump(r, open(os.path.join(d, "run.json"), "w"))
    elif cmd == "rusage":
        outfile, pid, timeout, argv = a[0], a[1], int(a[2]), a[4:]
        rusage(outfile, int(pid) if pid != "-" else None, argv, timeout)
    elif cmd == "qmp-after":
        qmp_after(a[0], a[1])
    elif cmd == "rmem-result":
        row, d = a
        try:
            r = rmem_result(row, d)
        except Exception as e:
            r = {"row": row, "ok": False, "why": f"{type(e).__name__}: {e}", "t0": mono(), "t1": mono()}
        json.dump(r, open(os.path.join(d, "run.json"), "w"))
    elif cmd == "check":
        d, run_no, outfile, timeout = a
        r = json.load(open(os.path.join(d, "run.json")))
        r["run"] = int(run_no)
        if r.get("t0") is not None and os.path.exists(os.path.join(d, "dst.ser.log")):
            # A migration that failed is not waited for.
            c = check(d, r["t0"], r["t1"], float(timeout) if r["ok"] else 0.0)
            if r["ok"] and not c["ok"]:
                r["ok"], r["why"] = False, c["why"]
            for k, v in c.items():
                if k not in ("ok", "why"):
                    r[k] = v
        with open(outfile, "a") as f:
            f.write(json.dumps(r) + "\n")
        f = lambda v, p=0: "-" if v is None else f"{v:.{p}f}"
        print(f"  {r['row']} run {r['run']}: {'ok' if r['ok'] else 'FAILED: ' + str(r['why'])}; "
              f"total {f(r.get('total_ms'))} ms, downtime {f(r.get('tool_downtime_ms'))} ms "
              f"(QEMU {f(r.get('qemu_downtime_ms'))}), pause {f(r.get('pause_ms'))} ms, heartbeat gap {f(r.get('heartbeat_gap_ms'))} ms, "
              f"{f((r.get('wire_bytes') or 0) / 1e6, 1)} MB, source CPU {f(r.get('src_cpu_s'), 2)} s",
              flush=True)
    elif cmd == "fail":
        row, d, why = a
        json.dump({"row": row, "ok": False, "why": why, "t0": None, "t1": None},
                  open(os.path.join(d, "run.json"), "w"))
    elif cmd == "table":
        outfile, rows, runs = a[0], a[1].split(","), a[2]
        table(outfile, rows, runs, a[3:])
    else:
        sys.exit(f"unknown helper command {cmd}")

main()
PY
# The pids this script started and has not reaped yet: the EXIT trap kills them (reaped ones are
# forgotten, so no recycled pid is ever killed).
forget() {
  local p keep=()
  for p in "${pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  pids=("${keep[@]}")
}
# Runs the helper in the background and waits for it, so INT/TERM reach the trap at once.
helper() {
  python3 "$work/helper.py" "$@" &
  local p=$! rc=0
  pids+=("$p")
  wait "$p" || rc=$?
  forget "$p"
  return "$rc"
}

row_names=(x qemu-tcp qemu-tcp-10g qemu-postcopy-unix rmem-stream rmem-stop-copy rmem-precopy
  rmem-postcopy rmem-hybrid rmem-precopy-exact)
preload_lib=$(dirname "$rmem")/librmem_preload.so
BOOT=180      # s for the source guest to boot and tick
MIGRATE=300   # s for one migration
AFTER=120     # s for the destination to tick 12 times

# Starts one QEMU on the guest image, a child of this shell; its pid in $qpid. $1: src|dst,
# $2: run dir.
start_qemu() {
  local who=$1 d=$2 extra=()
  [[ $who == dst ]] && extra=(-incoming defer)
  # Rows 7-9: rmem's preload library in both QEMUs.
  local env=()
  [[ ${3:-} == preload ]] && env=(env "LD_PRELOAD=$preload_lib" "RMEM_PRELOAD_SOCKET=$2/$who.uffd")
  "${env[@]}" qemu-system-x86_64 -machine pc,accel=tcg -smp 1 -m 128M \
    -nodefaults -no-user-config -display none -name "bench-$who,debug-threads=on" \
    -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 quiet panic=-1 rmem.heartbeat" \
    -object "memory-backend-file,id=pc.ram,size=128M,mem-path=$shm-$who,share=on" \
    -machine memory-backend=pc.ram \
    -qmp "unix:$d/$who.qmp,server=on,wait=off" -qmp "unix:$d/$who.ev,server=on,wait=off" \
    -chardev "socket,id=ser0,path=$d/$who.ser" -serial chardev:ser0 \
    -chardev "socket,id=ser1,path=$d/$who.hb" -serial chardev:ser1 \
    "${extra[@]}" </dev/null >"$d/$who.qemu.log" 2>&1 &
  qpid=$!
  pids+=("$qpid")
}

# Kills this run's processes (each by its pid) and removes its RAM files.
end_run() {
  local p
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    forget "$p"
  done
  rm -f "$shm"-*
}

# One migration: boots both guests, migrates, checks, appends a JSON line to $out.
run_one() {
  local row=$1 run=$2 d="$work/$1-$2" con ev src dst recv_pid="" send_rc=0 addr mode
  mkdir -p "$d"
  # Background processes are started as python3/QEMU themselves (not through a function, whose
  # subshell's pid would be all a kill reaches), their output in files.
  python3 "$work/helper.py" console "$d" </dev/null >"$d/console.err" 2>&1 &
  con=$!; pids+=("$con")
  helper wait-file "$d/console.ready" 10
  local pre="" send_extra=() recv_extra=()
  case $row in
    rmem-postcopy) pre=preload; recv_extra=(--preload-socket "$d/dst.uffd") ;;
    rmem-hybrid) pre=preload; recv_extra=(--preload-socket "$d/dst.uffd")
      send_extra=(--preload-socket "$d/src.uffd") ;;
    rmem-precopy-exact) pre=preload; send_extra=(--preload-socket "$d/src.uffd") ;;
  esac
  start_qemu src "$d" $pre; src=$qpid
  start_qemu dst "$d" $pre; dst=$qpid
  python3 "$work/helper.py" events "$d" 30 </dev/null >"$d/events.err" 2>&1 &
  ev=$!; pids+=("$ev")
  if ! helper wait-file "$d/src.hb.connected" 30 || ! helper wait-file "$d/dst.hb.connected" 30 ||
     ! helper wait-file "$d/events.ready" 30 ||
     ! helper wait-boot "$d" "$BOOT" 2>"$d/boot.err"; then
    helper fail "$row" "$d" "guest did not boot: $(tail -q -n 2 "$d/boot.err" "$d"/*.qemu.log | tr '\n' ' ')"
  elif [[ $row == qemu-* ]]; then
    helper native "$row" "$d/src.qmp" "$d/dst.qmp" "$src" "$d" "$MIGRATE"
  else
    mode=${row#rmem-}; mode=${mode%-exact}
    python3 "$work/helper.py" rusage "$d/recv.rusage" - $((MIGRATE + 60)) -- \
      "$rmem" migrate recv --listen 127.0.0.1:0 --qmp "$d/dst.qmp" --secret-file "$secret" \
      --provider tcp --run-dir "$d" --accept-timeout 60 --timeout "$MIGRATE" --json \
      "${recv_extra[@]}" \
      </dev/null >"$d/recv.out" 2>"$d/recv.err" &
    recv_pid=$!; pids+=("$recv_pid")
    if addr=$(helper wait-listening "$d/recv.out" 30); then
      helper rusage "$d/send.rusage" "$src" $((MIGRATE + 30)) -- \
        "$rmem" migrate send --mode "$mode" --to "$addr" --qmp "$d/src.qmp" \
        --secret-file "$secret" --provider tcp --run-dir "$d" --timeout "$MIGRATE" --json \
        "${send_extra[@]}" \
        >"$d/send.out" 2>"$d/send.err" || send_rc=$?
      # recv ends with the migration; after a failed send it may still wait for a source.
      for _ in $(seq $((send_rc == 0 ? 300 : 20))); do
        kill -0 "$recv_pid" 2>/dev/null || break
        sleep 0.1
      done
      helper qmp-after "$d/src.qmp" "$d/src-after.json" || echo '{}' >"$d/src-after.json"
      helper rmem-result "$row" "$d"
    else
      helper fail "$row" "$d" "rmem migrate recv did not listen: $(tail -n 1 "$d/recv.err")"
    fi
  fi
  helper check "$d" "$run" "$out" "$AFTER" || echo "$row run $run: the check itself failed (above); not recorded" >&2
  end_run ${recv_pid:+"$recv_pid"} "$src" "$dst" "$con" "$ev"
}

qemu_version=$(qemu-system-x86_64 --version | head -n 1)
rmem_version=$("$rmem" --version 2>/dev/null || echo "rmem ?")
commit=$(git -C "$repo" rev-parse --short HEAD)
git -C "$repo" diff --quiet HEAD -- . 2>/dev/null || commit+="+uncommitted changes"
start=$(date +%s)
load0=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$out"
echo "migrate-compare: $runs run(s) a row, rows $rows; raw results in $out" >&2
IFS=, read -ra row_list <<<"$rows"
names=()
for i in "${row_list[@]}"; do names+=("${row_names[$i]}"); done
for ((r = 1; r <= runs; r++)); do
  # Rows interleaved, so a change in the machine's load spreads over all of them.
  for name in "${names[@]}"; do run_one "$name" "$r"; done
done
helper table "$out" "$(IFS=,; echo "${names[*]}")" "$runs" \
  "- $qemu_version, TCG, 1 vCPU, 128 MiB guest RAM in /dev/shm (memory-backend-file, share=on); QEMU's defaults: @DEFAULTS@." \
  "- $rmem_version, commit $commit; rmem rows: --provider tcp over 127.0.0.1, rmem's defaults (--downtime-ms 300, --max-rounds 30; stream: QEMU max-bandwidth 10 GiB/s), no --verify." \
  "- QEMU rows: QEMU's defaults but for what the row names (row 3: postcopy-ram on both sides, migrate-start-postcopy right after migrate; max-postcopy-bandwidth 0, unlimited)." \
  "- Cells: median (min-max) over the runs that passed. total: from the migrate command (QEMU) or the start of \`rmem migrate send\` until the source completed and the destination ran (QEMU post-copy: until the last page was sent; rmem: until \`send\` printed its result)." \
  "- downtime (tool's own): QEMU rows query-migrate \`downtime\` on the source; rmem rows \`downtime_ms\` of \`rmem migrate send --json\` (stream mode: from QEMU's pause). downtime (QEMU): query-migrate \`downtime\` on the source in every row (rmem page modes: the device-state pass only)." \
  "- pause (QMP events): from the source QEMU's STOP event to the destination QEMU's RESUME event, by the timestamps QEMU puts in them (one host clock): the same measure for every row, whoever drives the migration." \
  "- heartbeat gap: longest gap between the guest's ttyS1 bytes (one every 10 ms) as this host received them, from the start of the migration to 2 s after its end: the pause the guest really saw." \
  "- MB moved: QEMU rows query-migrate \`ram.transferred\` (RAM pages and their headers; device state, a few hundred KB, not counted); rmem rows page_bytes + stream_bytes of the result (pages WRITTEN plus QEMU's stream relayed, both directions)." \
  "- source CPU: utime+stime of the source QEMU (/proc/PID/stat, guest execution included) over the migration, plus for rmem rows \`rmem migrate send\`'s own (wait4 rusage)." \
  "- Host: $(nproc) cores, $(uname -r), load average at start $load0; run time $(( $(date +%s) - start )) s."
if [[ -n ${svg_out:-} ]]; then
  helper bars "$out" "$(IFS=,; echo "${names[*]}")" "$work/bars.json"
  "$rmem" perf plot --bars "$work/bars.json" --out "$svg_out"
fi
