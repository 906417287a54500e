#!/usr/bin/env bash
# rmem perf over the tcp provider next to qperf (tcp_lat, tcp_bw) and ucx_perftest (UCX_TLS=tcp),
# all on loopback, in one run, so the figures share the machine's state.
#
#   benches/compare-tcp.sh [--json FILE] [--svg FILE]
#
# Prints one table: 4 KiB READ latency (rmem, p50/p99) against the TCP round trip (twice qperf's
# one-way tcp_lat) and UCX's ucp_get; 64 KiB WRITE bandwidth against qperf tcp_bw and UCX's
# ucp_put_bw. rmem runs twice: adaptive polling (default) and --busy-poll.
set -euo pipefail
cd "$(dirname "$0")/.."

json_out="" svg_out=""
while (($#)); do
  case $1 in
    --json) json_out=${2:?--json needs a file}; shift 2 ;;
    --svg) svg_out=${2:?--svg needs a file}; shift 2 ;;
    *) echo "usage: $0 [--json FILE] [--svg FILE]" >&2; exit 2 ;;
  esac
done

need=()
command -v qperf >/dev/null || need+=(qperf)
command -v ucx_perftest >/dev/null || need+=(ucx-utils)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q --no-default-features
rmem=target/release/rmem
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# --- qperf (blocking sockets, 2 s per test) ---
qperf >/dev/null 2>&1 & pids+=($!)
sleep 0.5
qperf -m 4096 127.0.0.1 tcp_lat >"$work/qperf_lat"
qperf -m 64K 127.0.0.1 tcp_bw >"$work/qperf_bw"

# --- UCX over TCP ---
ucx() { # test size iters
  UCX_TLS=tcp ucx_perftest -p 13337 >/dev/null 2>&1 & local srv=$!
  sleep 1
  UCX_TLS=tcp timeout 120 ucx_perftest 127.0.0.1 -p 13337 -t "$1" -s "$2" -n "$3" 2>/dev/null | grep '^Final' || echo "Final: 0 0 0 0 0 0"
  kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
}
ucx ucp_get 4096 3000 >"$work/ucx_lat"
ucx ucp_put_bw 65536 20000 >"$work/ucx_bw"

# --- rmem perf, tcp provider ---
rmem_run() { # tag extra-args...
  local tag=$1; shift
  "$rmem" perf server --listen 127.0.0.1:18515 "$@" >/dev/null & local srv=$!
  sleep 0.5
  "$rmem" perf client 127.0.0.1:18515 --op read -s 4K -n 20000 --json "$@" >"$work/rmem_${tag}_lat"
  "$rmem" perf client 127.0.0.1:18515 --op write --bw -s 64K -n 20000 --tx-depth 64 --json "$@" >"$work/rmem_${tag}_bw"
  kill "$srv"; wait "$srv" 2>/dev/null || true
}
rmem_run adaptive
rmem_run busy --busy-poll

python3 - "$work" "$json_out" "$work/bars.json" <<'PY'
import json, re, sys
w, out, bars = sys.argv[1], sys.argv[2], sys.argv[3]
def num(path, pat):
    m = re.search(pat, open(f"{w}/{path}").read())
    return float(m.group(1)), m.group(2) if m.lastindex and m.lastindex > 1 else None
lat_one_way, unit = num("qperf_lat", r"latency\s*=\s*([\d.]+)\s*(\w+)")
lat_one_way *= {"us": 1, "ms": 1000, "ns": 0.001}[unit]
bw, unit = num("qperf_bw", r"bw\s*=\s*([\d.]+)\s*(\w+/sec)")
qperf_bw = bw * {"GB/sec": 1e9, "MB/sec": 1e6, "KB/sec": 1e3}[unit]
ucx_lat = float(open(f"{w}/ucx_lat").read().split()[2])     # Final: iters p50 avg ...
ucx_bw = float(open(f"{w}/ucx_bw").read().split()[5]) * 2**20  # overall MB/s (UCX MB = MiB)
r = {}
for tag in ("adaptive", "busy"):
    lat = json.load(open(f"{w}/rmem_{tag}_lat"))["results"][0]["lat"]
    bwr = json.load(open(f"{w}/rmem_{tag}_bw"))["results"][0]["bw"]
    r[tag] = dict(p50=lat["p50_us"], p99=lat["p99_us"], bw=bwr["bytes_per_sec"])
rtt = 2 * lat_one_way
rows = [
    ("4 KiB READ p50 (us)", r["adaptive"]["p50"], r["busy"]["p50"], rtt, ucx_lat),
    ("4 KiB READ p99 (us)", r["adaptive"]["p99"], r["busy"]["p99"], None, None),
    ("64 KiB WRITE bw (GB/s)", r["adaptive"]["bw"] / 1e9, r["busy"]["bw"] / 1e9, qperf_bw / 1e9, ucx_bw / 1e9),
]
f = lambda v: "-" if v is None else f"{v:.2f}"
print("| measure | rmem tcp (adaptive) | rmem tcp (--busy-poll) | qperf TCP | UCX_TLS=tcp |")
print("|---|---|---|---|---|")
for name, a, b, q, u in rows:
    print(f"| {name} | {f(a)} | {f(b)} | {f(q)} | {f(u)} |")
print(f"\nqperf tcp_lat one-way {lat_one_way:.1f} us -> round trip {rtt:.1f} us")
print(f"targets: READ p50 <= 1.5 x RTT = {1.5*rtt:.1f} us: adaptive {'met' if r['adaptive']['p50'] <= 1.5*rtt else 'MISSED'}, busy {'met' if r['busy']['p50'] <= 1.5*rtt else 'MISSED'}")
print(f"         WRITE bw >= 0.8 x qperf = {0.8*qperf_bw/1e9:.2f} GB/s: adaptive {'met' if r['adaptive']['bw'] >= 0.8*qperf_bw else 'MISSED'}, busy {'met' if r['busy']['bw'] >= 0.8*qperf_bw else 'MISSED'}")
tools = ("rmem adaptive", "rmem busy-poll", "qperf TCP", "UCX tcp")
json.dump(dict(title="rmem tcp provider vs qperf and UCX on loopback", groups=[
    dict(measure=name.rsplit(" (", 1)[0], unit=name.rsplit(" (", 1)[1].rstrip(")"),
         bars=[[t, v] for t, v in zip(tools, vals)])
    for name, *vals in rows]), open(bars, "w"))
if out:
    json.dump(dict(qperf=dict(tcp_lat_one_way_us=lat_one_way, tcp_bw_bytes_per_sec=qperf_bw),
                   ucx=dict(ucp_get_4k_p50_us=ucx_lat, ucp_put_bw_64k_bytes_per_sec=ucx_bw),
                   rmem=r), open(out, "w"), indent=2)
PY
if [[ -n $svg_out ]]; then
  "$rmem" perf plot --bars "$work/bars.json" --out "$svg_out"
fi
