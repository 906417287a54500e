#!/usr/bin/env bash
# rmem place probe next to qperf tcp_bw over the same shaped paths: two network namespaces
# joined by veth, HTB on the sender's egress at 100 and 200 Mbit/s per destination (and one
# unshaped address). Needs root, iproute2, qperf, and a release build of rmem.
# Usage: benches/links-compare.sh [runs] [--svg FILE]   (one JSON line per measurement on
# stdout; with --svg, the last run drawn as bars)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3 svg_out=""
while (($#)); do
  case $1 in
    --svg) svg_out=$2; shift 2 ;;
    *) runs=$1; shift ;;
  esac
done
rmem=${RMEM:-target/release/rmem}
[[ -x $rmem ]] || cargo build --release -q -p rmem
command -v qperf >/dev/null || { echo "needs qperf (apt-get install qperf)" >&2; exit 2; }
a=rmemLA$$ b=rmemLB$$ va=rla$$ vb=rlb$$
cleanup() { pkill -f "rmem perf server --listen 10.78.0" || true; pkill -f "qperf$" || true
  ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$a"; ip netns add "$b"
ip link add "$va" type veth peer name "$vb"
ip link set "$va" netns "$a"; ip link set "$vb" netns "$b"
ip -n "$a" addr add 10.78.0.1/24 dev "$va"
for x in 2 3 4; do ip -n "$b" addr add 10.78.0.$x/24 dev "$vb"; done
for ns in "$a:$va" "$b:$vb"; do ip -n "${ns%%:*}" link set "${ns#*:}" up; ip -n "${ns%%:*}" link set lo up; done
tc -n "$a" qdisc add dev "$va" root handle 1: htb default 30
tc -n "$a" class add dev "$va" parent 1: classid 1:1 htb rate 10gbit
tc -n "$a" class add dev "$va" parent 1:1 classid 1:10 htb rate 100mbit ceil 100mbit
tc -n "$a" class add dev "$va" parent 1:1 classid 1:20 htb rate 200mbit ceil 200mbit
tc -n "$a" class add dev "$va" parent 1:1 classid 1:30 htb rate 10gbit
tc -n "$a" filter add dev "$va" protocol ip parent 1: prio 1 u32 match ip dst 10.78.0.2/32 flowid 1:10
tc -n "$a" filter add dev "$va" protocol ip parent 1: prio 1 u32 match ip dst 10.78.0.3/32 flowid 1:20
for x in 2 3 4; do ip netns exec "$b" "$rmem" perf server --listen 10.78.0.$x:18515 --max-size 1M --json >/dev/null & done
ip netns exec "$b" qperf >/dev/null 2>&1 &
sleep 1
lines=$(mktemp)
for r in $(seq "$runs"); do
  for x in 2 3 4; do
    shaped=$([[ $x == 2 ]] && echo 100 || { [[ $x == 3 ]] && echo 200 || echo none; })
    p=$(ip netns exec "$a" "$rmem" place probe --target 10.78.0.$x:18515 --json)
    q=$(ip netns exec "$a" qperf -t 3 -m 256K 10.78.0.$x tcp_bw | awk '/bw *=/ {print $3, $4}')
    echo "{\"run\":$r,\"dst\":\"10.78.0.$x\",\"shaped_mbit\":\"$shaped\",\"rmem_probe\":$p,\"qperf_tcp_bw\":\"$q\"}" | tee -a "$lines"
  done
done
if [[ -n $svg_out ]]; then
  python3 - "$lines" "$lines.bars" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
last = max(r["run"] for r in rows)
unit = {"GB/sec": 8e3, "MB/sec": 8, "KB/sec": 8e-3}
groups = []
for r in (r for r in rows if r["run"] == last):
    v, u = r["qperf_tcp_bw"].split()
    name = "unshaped" if r["shaped_mbit"] == "none" else f"HTB {r['shaped_mbit']} Mbit/s"
    groups.append(dict(measure=name, unit="Mbit/s", bars=[
        ["rmem place probe", r["rmem_probe"]["bits_per_sec"] / 1e6], ["qperf tcp_bw", float(v) * unit[u]]]))
json.dump(dict(title="Path rates: rmem place probe vs qperf over shaped veth", groups=groups), open(sys.argv[2], "w"))
PY
  "$rmem" perf plot --bars "$lines.bars" --out "$svg_out"
fi
rm -f "$lines" "$lines.bars"
