#!/usr/bin/env bash
# rmem perf over the verbs provider next to perftest and qperf, on Soft-RoCE in one VM run
# (soft-roce/vm/run.sh perf), printed as one table.
#
#   benches/compare-verbs.sh [--log FILE] [--svg FILE]
#     --log: parse an existing console log instead; --svg: draw the table as bars
#
# Latency is the typical (median) time. perftest's ib_read_lat and ib_atomic_lat, qperf and rmem
# time a whole operation (one round trip); ib_write_lat reports half of a WRITE ping-pong, so
# the table doubles it to compare it with rmem's WRITE (post to completion, one round trip).
set -euo pipefail
cd "$(dirname "$0")/.."
log="" svg_out=""
while (($#)); do
  case $1 in
    --log) log=${2:?--log needs a file}; shift 2 ;;
    --svg) svg_out=${2:?--svg needs a file}; shift 2 ;;
    *) echo "usage: $0 [--log FILE] [--svg FILE]" >&2; exit 2 ;;
  esac
done
if [[ -z $log ]]; then
  log=$(mktemp)
  RMEM_VM_LOG=$log soft-roce/vm/run.sh perf >/dev/null 2>"$log.stderr" || {
    echo "the VM run failed; its output:" >&2; cat "$log.stderr" >&2; exit 1; }
fi
bars=$(mktemp)
trap 'rm -f "$bars"' EXIT
python3 - "$log" "$bars" <<'PY'
import json, re, sys
text = open(sys.argv[1], errors="replace").read().replace("\r", "")
sec = dict(re.findall(r"=== BEGIN (\S+)\n(.*?)=== END \1 rc=0", text, re.S))
def perftest_lat(name):
    for line in sec.get(name, "").splitlines():
        f = line.split()
        if len(f) >= 9 and f[0].isdigit():
            return float(f[4])
def perftest_bw(name):
    for line in sec.get(name, "").splitlines():
        f = line.split()
        if len(f) >= 5 and f[0].isdigit():
            return float(f[3])
def qperf(name):
    m = re.search(r"(latency|bw)\s*=\s*([\d.]+)\s*(\S+)", sec.get(name, ""))
    if not m: return None
    v, unit = float(m.group(2)), m.group(3)
    if m.group(1) == "latency":
        return v * {"us": 1, "ms": 1000, "ns": 0.001}[unit]
    return v * {"GB/sec": 8, "MB/sec": 8e-3, "KB/sec": 8e-6, "bytes/sec": 8e-9}[unit]  # -> Gb/s
def rmem(name, key):
    s = sec.get(name)
    if not s: return None
    r = json.loads(s[s.index("{"):])["results"][0]
    return r["lat"]["p50_us"] if key == "lat" else r["bw"]["gbit_per_sec"]
wl = perftest_lat("perftest_write_lat_8")
rows = [
    ("READ 8 B latency (us)", rmem("rmem_read_lat_8", "lat"), perftest_lat("perftest_read_lat_8"), qperf("qperf_read_lat_8"), "lat"),
    ("READ 4 KiB latency (us)", rmem("rmem_read_lat_4096", "lat"), perftest_lat("perftest_read_lat_4096"), qperf("qperf_read_lat_4096"), "lat"),
    ("WRITE 8 B round trip (us)", rmem("rmem_write_lat_8", "lat"), wl and 2 * wl, None, "lat"),
    ("fetch-and-add latency (us)", rmem("rmem_atomic_lat", "lat"), perftest_lat("perftest_atomic_lat"), None, "lat"),
    ("WRITE 64 KiB bandwidth (Gb/s)", rmem("rmem_write_bw", "bw"), perftest_bw("perftest_write_bw"), qperf("qperf_write_bw"), "bw"),
    ("READ 64 KiB bandwidth (Gb/s)", rmem("rmem_read_bw", "bw"), perftest_bw("perftest_read_bw"), qperf("qperf_read_bw"), "bw"),
]
cpu = re.search(r"cpu MHz\s*:\s*([\d.]+)", sec.get("cpu_mhz", ""))
tsc = [json.loads(s[s.index("{"):]).get("tsc_mhz") for n, s in sec.items() if n.startswith("rmem_") and "{" in s]
tsc = [t for t in tsc if t]
if cpu and tsc:
    print(f"clocks: perftest converts ticks at /proc/cpuinfo's {float(cpu.group(1)):.1f} MHz; "
          f"rmem measured the TSC at {min(tsc):.1f}-{max(tsc):.1f} MHz against the OS clock")
f = lambda v: "-" if v is None else f"{v:.3f}" if v < 1 else f"{v:.2f}"
kern = re.search(r"rmem-vm: kernel (\S+)", text)
print(f"Soft-RoCE (rxe) in one QEMU VM, kernel {kern.group(1) if kern else '?'}; rmem with --busy-poll")
print("| measure | rmem verbs | perftest | qperf | rmem / perftest | target |")
print("|---|---|---|---|---|---|")
ok = True
for name, r, p, q, kind in rows:
    ratio = r / p if r and p else None
    target = "<= 1.10" if kind == "lat" else ">= 0.95"
    met = ratio is not None and (ratio <= 1.10 if kind == "lat" else ratio >= 0.95)
    ok &= met
    print(f"| {name} | {f(r)} | {f(p)} | {f(q)} | {f(ratio)} | {target} {'met' if met else 'MISSED'} |")
json.dump(dict(title="rmem verbs vs perftest and qperf on Soft-RoCE (one VM)", groups=[
    dict(measure=name.rsplit(" (", 1)[0], unit=name.rsplit(" (", 1)[1].rstrip(")"),
         bars=[["rmem", r], ["perftest", p], ["qperf", q]])
    for name, r, p, q, kind in rows]), open(sys.argv[2], "w"))
missing = [n for n in ("rmem_read_lat_8", "perftest_read_lat_8", "rmem_write_bw", "perftest_write_bw") if n not in sec]
if missing:
    print("sections missing or failed:", ", ".join(missing))
sys.exit(0)
PY
if [[ -n $svg_out ]]; then
  target/release/rmem perf plot --bars "$bars" --out "$svg_out"
fi
