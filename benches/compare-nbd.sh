#!/usr/bin/env bash
# The donor's NBD export next to nbdkit's memory plugin, same size, both over TCP on loopback,
# measured with fio's nbd engine in one run: 4 KiB random read/write IOPS (iodepth 16) and
# 1 MiB sequential write and read throughput.
#
#   benches/compare-nbd.sh [--size 1G] [--runtime 10] [--svg FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
size=1G runtime=10 svg_out=""
while (($#)); do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --svg) svg_out=$2; shift 2 ;;
    *) echo "usage: $0 [--size 1G] [--runtime 10] [--svg FILE]" >&2; exit 2 ;;
  esac
done
need=()
for p in fio nbdkit libnbd-bin python3; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

RMEM_SECRET=$(head -c 24 /dev/urandom | base64) target/release/rmem server --listen 127.0.0.1:0 \
  --size "$size" --slab-size 16M --export "bench=$size" --nbd-listen 127.0.0.1:10819 --hugepages try >/dev/null &
pids+=($!)
nbdkit --foreground --port 10820 --exit-with-parent memory "size=$size" &
pids+=($!)
for port in 10819 10820; do
  for _ in $(seq 100); do nbdinfo "nbd://127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.1; done
done

run() { # name uri fio-args...
  local name=$1 uri=$2; shift 2
  fio --name="$name" --ioengine=nbd --uri="$uri" --runtime="$runtime" --time_based \
    --output-format=json "$@" > "$work/$name.json"
}
for target in rmem:nbd://127.0.0.1:10819/bench nbdkit:nbd://127.0.0.1:10820; do
  t=${target%%:*} uri=${target#*:}
  run "${t}_randrw" "$uri" --rw=randrw --bs=4k --iodepth=16
  run "${t}_seqwrite" "$uri" --rw=write --bs=1M --iodepth=4
  run "${t}_seqread" "$uri" --rw=read --bs=1M --iodepth=4
done

python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
bars_file = f"{w}/bars.json"
def job(name):
    text = open(f"{w}/{name}.json").read()   # the nbd engine prints a line before the JSON
    return json.loads(text[text.index("{"):])["jobs"][0]
rows = []
for t in ("rmem", "nbdkit"):
    r = job(f"{t}_randrw")
    rows.append((t, r["read"]["iops"], r["write"]["iops"],
                 job(f"{t}_seqwrite")["write"]["bw_bytes"] / 2**30,
                 job(f"{t}_seqread")["read"]["bw_bytes"] / 2**30))
print("| export | 4 KiB randrw read IOPS | 4 KiB randrw write IOPS | 1 MiB seq write GiB/s | 1 MiB seq read GiB/s |")
print("|---|---|---|---|---|")
for t, ri, wi, sw, sr in rows:
    print(f"| {t} | {ri:,.0f} | {wi:,.0f} | {sw:.2f} | {sr:.2f} |")
(rm, nk) = rows
print("\nrmem / nbdkit: " + ", ".join(f"{a / b:.2f}" for a, b in zip(rm[1:], nk[1:])) + "  (target: at least 1.0)")
measures = [("4 KiB randrw read", "IOPS"), ("4 KiB randrw write", "IOPS"),
            ("1 MiB seq write", "GiB/s"), ("1 MiB seq read", "GiB/s")]
json.dump(dict(title="rmem's NBD export vs nbdkit memory (fio nbd engine, loopback)", groups=[
    dict(measure=m, unit=u, bars=[[r[0], r[i + 1]] for r in rows])
    for i, (m, u) in enumerate(measures)]), open(bars_file, "w"))
PY
if [[ -n $svg_out ]]; then
  target/release/rmem perf plot --bars "$work/bars.json" --out "$svg_out"
fi
