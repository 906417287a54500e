#!/usr/bin/env bash
# A large stop-copy next to the transport's own bandwidth, in one run: how close `rmem migrate`
# comes to bytes / bandwidth once RAM is big enough that setup and device state stop mattering.
#
#   benches/migrate-1g.sh [--size 1G] [--runs N] [--provider tcp|verbs] [--dir DIR] [--rmem PATH]
#                         [--guest]
#
# --dir: where both RAM files go (default /dev/shm). A tmpfs mounted with huge=always (or
# hugetlbfs) backs them with 2 MiB pages, as a production host would for guest RAM.
#
# The memory is a file on /dev/shm filled with random bytes (no zero page, no hole), written by
# a process that `rmem migrate send --file --pid` pauses: the engine's page path without QEMU
# (TCG would dominate a 1 GiB guest's figures). Each run: a fresh destination file, `recv
# --file`, `send --mode stop-copy --json`, then the two files compared byte for byte (a run
# whose files differ fails the script). In the same run, before and after the migrations:
# `rmem perf loopback --op write --bw` at the migration's request size (64 pages) and depth
# (32), into one reused buffer (perftest's way: the data stays in the CPU's caches) and spread
# over --size bytes (`--span`: memory moved from and to DRAM, as a migration moves it).
#
# Reports per run the total time, the stop-copy pass, the destination's allocation ahead (from
# connection to its first page), and the ratios to bytes / bandwidth.
#
# --guest: a QEMU guest instead (TCG, --size of RAM, the migration tests' guest with its cold
# set made three quarters of --size: `rmem.cold=`), booted afresh for each run, moved by `send --qmp
# --mode stop-copy` to a destination QEMU waiting with -incoming defer, which must then check
# its whole cold set (12 rounds) and find no bad page. The ratios use the bytes the migration
# moved (pages with data; holes and zero pages stay behind).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
size=1G
runs=3
provider=tcp
dir=/dev/shm
target_dir=${CARGO_TARGET_DIR:-$repo/target}
rmem=$target_dir/release/rmem
guest=0
usage() { echo "usage: $0 [--size 1G] [--runs N] [--provider tcp|verbs] [--dir DIR] [--rmem PATH] [--guest]" >&2; exit 2; }
while (($#)); do
  case $1 in
    --size) [[ ${2:-} =~ ^[1-9][0-9]*[KMG]?$ ]] || usage; size=$2; shift 2 ;;
    --runs) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage; runs=$2; shift 2 ;;
    --provider) [[ ${2:-} =~ ^(tcp|verbs)$ ]] || usage; provider=$2; shift 2 ;;
    --dir) [[ -d ${2:-} ]] || usage; dir=$2; shift 2 ;;
    --rmem) [[ -n ${2:-} ]] || usage; rmem=$2; shift 2 ;;
    --guest) guest=1; shift ;;
    -h|--help) usage ;;
    *) usage ;;
  esac
done
if [[ $rmem == "$target_dir/release/rmem" ]]; then
  echo "building $rmem (release)" >&2
  CARGO_TARGET_DIR=$target_dir cargo build --release -q -p rmem --bin rmem
fi

work=$(mktemp -d /tmp/migrate-1g.XXXXXX)
src=$dir/rmem-1g-src-$$
dst=$dir/rmem-1g-dst-$$
holder=
recv_pid=
qemus=()
cleanup() {
  [[ -n $recv_pid ]] && kill "$recv_pid" 2>/dev/null || true
  [[ -n $holder ]] && kill -9 "$holder" 2>/dev/null || true
  for q in "${qemus[@]+"${qemus[@]}"}"; do kill -9 "$q" 2>/dev/null || true; done
  rm -f "$src" "$dst"
  rm -rf "$work"
}
fs=$(stat -f -c %T "$dir")
pagesz=$(awk '$2 == "'"$dir"'" {print $4}' /proc/mounts | grep -o 'huge=[a-z_]*' || true)
trap cleanup EXIT
trap 'exit 130' INT TERM

head -c 32 /dev/urandom | base64 > "$work/secret"
if ((guest)); then
  bytes=$(numfmt --from=iec "$size")
  mb=$((bytes >> 20))
  img=$target_dir/tmp/rmem-guest
  migrate/guest/build.sh "$img" >/dev/null
else
  echo "filling $size of $src" >&2
  head -c "$size" /dev/urandom > "$src"
  bytes=$(stat -c %s "$src")
  sleep 100000 &
  holder=$!
  disown "$holder"
fi
port=$((20000 + RANDOM % 20000))

# qemu NAME RAMFILE [ARGS...]: the tests' guest with --size of RAM in RAMFILE, its monitor at
# $work/NAME.qmp, its console in $work/NAME.serial.
qemu() {
  local name=$1 ram=$2; shift 2
  qemu-system-x86_64 -machine pc,accel=tcg -smp 1 -m "${mb}M" -nodefaults -no-user-config \
    -display none -kernel "$img/vmlinuz" -initrd "$img/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 rmem.cold=$((mb * 3 / 4))" \
    -object "memory-backend-file,id=pc.ram,size=${mb}M,mem-path=$ram,share=on" \
    -machine memory-backend=pc.ram -qmp "unix:$work/$name.qmp,server=on,wait=off" \
    -serial "file:$work/$name.serial" "$@" > /dev/null 2>&1 &
  qemus+=($!)
  disown $!
}

# wait_for SECONDS FILE PATTERN
wait_for() {
  for _ in $(seq $(($1 * 10))); do grep -q "$3" "$2" 2>/dev/null && return 0; sleep 0.1; done
  echo "no '$3' in $2 after $1 s: $(tail -n 3 "$2" 2>/dev/null)" >&2
  return 1
}

perf_bw() {
  "$rmem" perf loopback --provider "$provider" --op write --bw -s 256K --tx-depth 32 \
    -n 8000 --warmup 500 --span "$1" --json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["bw"]["bytes_per_sec"])'
}

results=$work/results.jsonl
hot_before=$(perf_bw 0)
bw_before=$(perf_bw "$bytes")
for i in $(seq "$runs"); do
  rm -f "$dst"
  if ((guest)); then
    rm -f "$src" "$work"/*.serial "$work"/*.qmp
    echo "run $i: booting a ${mb} MiB guest and filling its RAM" >&2
    qemu src "$src"
    wait_for 300 "$work/src.serial" "^tick " || exit 1
    qemu dst "$dst" -incoming defer
    for _ in $(seq 100); do [[ -S $work/dst.qmp ]] && break; sleep 0.1; done
    "$rmem" migrate recv --provider "$provider" --listen "127.0.0.1:$port" --qmp "$work/dst.qmp" \
      --secret-file "$work/secret" --json > "$work/recv.$i" 2> "$work/recv.err.$i" &
  else
    "$rmem" migrate recv --provider "$provider" --listen "127.0.0.1:$port" --file "$dst" \
      --secret-file "$work/secret" --json > "$work/recv.$i" 2> "$work/recv.err.$i" &
  fi
  recv_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/recv.$i" 2>/dev/null && break; sleep 0.05; done
  if ((guest)); then
    from=(--qmp "$work/src.qmp")
  else
    kill -CONT "$holder" 2>/dev/null || true
    from=(--file "$src" --pid "$holder")
  fi
  "$rmem" migrate send --provider "$provider" "${from[@]}" \
    --to "127.0.0.1:$port" --mode stop-copy --secret-file "$work/secret" --json \
    > "$work/send.$i" 2> "$work/send.err.$i" || { cat "$work/send.err.$i" >&2; exit 1; }
  wait "$recv_pid" || { cat "$work/recv.err.$i" >&2; exit 1; }
  recv_pid=
  if ((guest)); then
    # Four ticks: twelve rounds, so at least one checked every cold page there.
    for _ in $(seq 1200); do (( $(grep -c '^tick ' "$work/dst.serial") >= 4 )) && break; sleep 0.1; done
    (( $(grep -c '^tick ' "$work/dst.serial") >= 4 )) ||
      { echo "run $i: the guest did not tick 4 times on the destination" >&2; exit 1; }
    if grep '^tick ' "$work/dst.serial" | grep -qv 'bad=0'; then
      echo "run $i: the guest found bad pages on the destination" >&2
      exit 1
    fi
    for q in "${qemus[@]}"; do kill -9 "$q" 2>/dev/null || true; done
    qemus=()
  elif ! cmp -s "$src" "$dst"; then
    echo "run $i: the destination's file differs from the source's" >&2
    exit 1
  fi
  python3 - "$work/send.$i" "$work/recv.$i" >> "$results" <<'EOF'
import json, sys
send = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
recv = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
r = send[-1]
at = lambda lines, ev, ph=None: next((l["at_ms"] for l in lines if l.get("event") == ev and (ph is None or l.get("phase") == ph)), None)
connected, receiving = at(recv, "connected"), at(recv, "phase", "receiving")
print(json.dumps({"total_ms": r["total_ms"], "pass_ms": r["last_pass_ms"], "downtime_ms": r["downtime_ms"],
                  "page_bytes": r["page_bytes"], "requests": r["requests"],
                  "dest_setup_ms": (receiving - connected) if None not in (connected, receiving) else None}))
EOF
  port=$((port + 1))
done
bw_after=$(perf_bw "$bytes")
hot_after=$(perf_bw 0)

python3 - "$results" "$bytes" "$bw_before" "$bw_after" "$runs" "$provider" "$dir ($fs${pagesz:+, $pagesz})" "$hot_before" "$hot_after" "$guest" <<'EOF'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size, bw1, bw2, runs, provider, where = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
hot1, hot2 = float(sys.argv[8]), float(sys.argv[9])
guest = sys.argv[10] == "1"
ram = size
if guest:
    # The bytes the migration moved: the guest's holes and zero pages are not sent.
    size = st.median(r["page_bytes"] for r in rows)
bw = (bw1 + bw2) / 2
ideal = size / bw * 1e3
hot = size / ((hot1 + hot2) / 2) * 1e3
med = lambda k: st.median(r[k] for r in rows if r[k] is not None)
what = f"a {ram >> 20} MiB QEMU guest (TCG), {int(size) >> 20} MiB of it data" if guest else f"{size >> 20} MiB (file + paused process"
print(f"## rmem migrate stop-copy of {what}, {provider} provider on loopback, RAM files in {where}), {runs} run(s)\n")
print(f"- transport: rmem perf loopback WRITE 256 KiB x 32 in flight, spread over {ram >> 20} MiB: {bw1 / 2**20:.0f} MiB/s before, {bw2 / 2**20:.0f} after; bytes / bandwidth = {ideal:.0f} ms")
print(f"- the same into one reused buffer (perftest's way, cache-resident): {hot1 / 2**20:.0f} and {hot2 / 2**20:.0f} MiB/s; bytes / bandwidth = {hot:.0f} ms\n")
print("| | median ms | min-max | x bytes/bandwidth (spread) | x bytes/bandwidth (reused) |\n|---|---|---|---|---|")
for k, name in [("total_ms", "total (send's start to result)"), ("pass_ms", "stop-copy pass (pages only)"),
                ("downtime_ms", "downtime (pause to destination done)"), ("dest_setup_ms", "destination setup (punch, allocate ahead, register)")]:
    vals = [r[k] for r in rows if r[k] is not None]
    if vals:
        print(f"| {name} | {med(k):.0f} | {min(vals):.0f}-{max(vals):.0f} | {med(k) / ideal:.2f} | {med(k) / hot:.2f} |")
check = "the guest checked every page on the destination and found no bad one" if guest else "the destination file equal to the source's"
print(f"\nEvery run: {check}; {rows[0]['page_bytes'] >> 20} MiB in {rows[0]['requests']} WRITEs.")
EOF
