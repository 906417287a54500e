#!/bin/sh
# Runs inside the VM of run.sh's swap-compare mode (see build-initramfs.sh): the same workload
# as guest-swap.sh (`rmem memcheck` in a 64 MiB memory cgroup: 160 MiB sequential, then 96 MiB
# in random order, every page verified) with each of these as the guest's only swap, one after
# the other: rmem swap over tcp to a donor in this guest, rmem swap over verbs on rxe0, zram,
# and a swap file on ext4 on the virtio disk run.sh attaches (/dev/vda). Prints one table:
# fill (mostly swap-out) and verify (mostly swap-in) throughput of the sequential run, the random
# run's throughput (fill and verify together), and pswpout/pswpin deltas of both runs.
# A benchmark: it fails only when a backend cannot be set up or a page comes back different.
# Arguments (run.sh swap-compare seq=SIZE random=SIZE limit=SIZE) shrink the workload for a
# quick check of the harness; the defaults are guest-swap.sh's.
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
export RMEM_SECRET="vm swap compare secret"
IP=${RMEM_IP%/*}
DONOR_ARGS="--size 256M"
SWAP=192M SEQ=160M RND=96M LIMIT=64M
for a in $RMEM_TEST_ARGS; do
  case $a in
    seq=*) SEQ=${a#seq=} ;;
    random=*) RND=${a#random=} ;;
    limit=*) LIMIT=${a#limit=} ;;
    *) echo "unknown argument $a"; exit 2 ;;
  esac
done
work_cgroup "$LIMIT"

# rmem_up PROVIDER ARGS...: a donor over PROVIDER, and `rmem swap up ARGS...` against it.
rmem_up() {
  donor a 7470 "$1" || fail "donor ($1)" 81
  shift
  swap_up /tmp/swap.log 30 --size "$SWAP" --donor "$IP:7470" "$@" || fail "swap did not come up ($*)" 81
}
rmem_down() { swap_down; stop_donors; }

# Each setup leaves exactly one swap device on; its teardown leaves none.
setup_tcp() { rmem_up tcp; }
teardown_tcp() { rmem_down; }
setup_verbs() { rmem_up verbs --provider verbs --device rxe0; }
teardown_verbs() { rmem_down; }
setup_zram() {
  [ -e /sys/block/zram0 ] || fail "no /dev/zram0" 82
  echo "$SWAP" > /sys/block/zram0/disksize && mkswap /dev/zram0 > /dev/null && swapon /dev/zram0 ||
    fail "zram swap" 82
}
teardown_zram() { swapoff /dev/zram0 && echo 1 > /sys/block/zram0/reset; }
setup_disk() {
  [ -b /dev/vda ] || fail "no virtio disk /dev/vda" 82
  mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt/disk && mount -t ext4 /dev/vda /mnt/disk || fail "ext4 on /dev/vda" 82
  # Written out, not sparse: swapon refuses files with holes.
  dd if=/dev/zero of=/mnt/disk/swapfile bs=1M count="${SWAP%M}" 2> /dev/null && chmod 600 /mnt/disk/swapfile &&
    mkswap /mnt/disk/swapfile > /dev/null && sync && swapon /mnt/disk/swapfile || fail "swap file on ext4" 82
  # The swap file's own writes are not part of the figures.
  echo 3 > /proc/sys/vm/drop_caches
}
teardown_disk() { swapoff /mnt/disk/swapfile && umount /mnt/disk; }

# field JSON KEY: a number from memcheck's one-line JSON.
field() { echo "$1" | sed -n "s/.*\"$2\":\([-0-9.e+]*\).*/\1/p"; }

# memcheck ARGS...: the workload in the limited cgroup; its JSON line in $result.
memcheck() {
  result=$(limited rmem memcheck --json "$@") ||
    fail "memcheck $* (bad pages or a crash): $result" 84
  echo "   memcheck $*: $result"
}

table=/tmp/table
printf '| %-23s | %s | %s | %s | %s | %s |\n' backend "seq swap-out (fill) MiB/s" \
  "seq swap-in (verify) MiB/s" "random MiB/s" "pages out" "pages in" > "$table"
printf '|%s|%s|%s|%s|%s|%s|\n' ------------------------- ---: ---: ---: ---: ---: >> "$table"

for b in tcp verbs zram disk; do
  case $b in
    tcp) label="rmem swap, tcp" ;;
    verbs) label="rmem swap, verbs (rxe0)" ;;
    zram) label="zram" ;;
    disk) label="swap file, ext4, virtio" ;;
  esac
  echo "== $label"
  "setup_$b"
  cat /proc/swaps
  [ "$(grep -c '^/' /proc/swaps)" -eq 1 ] || fail "expected exactly one swap device" 82
  mark
  memcheck --size "$SEQ" --passes 1; seq=$result
  memcheck --size "$RND" --passes 1 --random; rnd=$result
  out=$(( $(vmstat pswpout) - out0 )); in=$(( $(vmstat pswpin) - in0 ))
  echo "   pages swapped out: $out, in: $in"
  "teardown_$b" || fail "teardown of $b" 86
  grep -q '^/' /proc/swaps && fail "swap still on after $b" 86
  printf '| %-23s | %.1f | %.1f | %.1f | %d | %d |\n' "$label" "$(field "$seq" fill_mib_per_sec)" \
    "$(field "$seq" verify_mib_per_sec)" "$(field "$rnd" mib_per_sec)" "$out" "$in" >> "$table"
done

echo "== swap backends, kernel $(uname -r), $(nproc) vCPUs, memory.max $LIMIT;" \
  "seq: memcheck --size $SEQ --passes 1; random: --size $RND --passes 1 --random (fill and verify)"
echo "=== BEGIN swap-compare table"
cat "$table"
echo "=== END swap-compare table"
