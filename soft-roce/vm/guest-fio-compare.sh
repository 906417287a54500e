#!/bin/sh
# Runs inside the VM of run.sh's fio-compare mode (see build-initramfs.sh): the same fio jobs on
# each block device below, one after the other, one table at the end. A benchmark: it fails only
# when a device cannot be set up or fio reports an error (a verify mismatch is one).
#   rmem, tcp       `rmem swap up --no-swapon` to a donor in this guest over tcp (ublk where the
#                   kernel has ublk_drv, NBD elsewhere: the table says which)
#   rmem, verbs     the same over verbs on rxe0
#   ublk null       rublk's null target (`rublk add null`): the ublk path's own floor, no data
#                   moved (only where the kernel has ublk_drv and run.sh found rublk)
#   nbd, nbdkit     the kernel's NBD client (nbd-client) to nbdkit's memory plugin in this guest
#   virtio disk     the raw virtio disk run.sh attaches (/dev/vda), a file on the host's disk
# Jobs (fio, libaio, O_DIRECT, each for RUNTIME seconds over the first 128 MiB): 4 KiB random
# read and random write at iodepth 16, 1 MiB sequential read and write at iodepth 4; first a
# 1 MiB write of the whole range with crc32c verification (not on the null target, which keeps
# nothing), so reads find data and a wrong byte fails the run. Arguments (run.sh fio-compare runtime=S): RUNTIME, default 10.
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
export RMEM_SECRET="vm fio compare secret"
IP=${RMEM_IP%/*}
DONOR_ARGS="--size 320M --no-pressure"
RUNTIME=10 SIZE=128M
for a in $RMEM_TEST_ARGS; do
  case $a in
    runtime=*) RUNTIME=${a#runtime=} ;;
    *) echo "unknown argument $a"; exit 2 ;;
  esac
done
bash /bin/rxe.sh check rxe0 > /dev/null 2>&1 || { bash /bin/rxe.sh remove rxe0; bash /bin/rxe.sh add eth0 rxe0; } || exit 91

dev=""
# has_size GLOB: a block device under /sys/block matching GLOB has a size; its path in $dev.
has_size() {
  for _hs in /sys/block/$1; do
    [ -e "$_hs/size" ] && [ "$(cat "$_hs/size")" -gt 0 ] && { dev=/dev/${_hs##*/}; return 0; }
  done
  return 1
}

# rmem_up PROVIDER ARGS...: a donor over PROVIDER and an rmem device on it, swap left off.
rmem_up() {
  donor a 7470 "$1" || fail "donor ($1)" 81
  shift
  dev_up /tmp/swap.log 30 --size 256M --donor "$IP:7470" "$@" || fail "rmem device did not come up" 81
}
rmem_down() { peak=$(peak_in_flight); swap_down; stop_donors; }

setup_tcp() { rmem_up tcp; label="rmem, tcp ($backend)"; }
teardown_tcp() { rmem_down; }
setup_verbs() { rmem_up verbs --provider verbs --device rxe0; label="rmem, verbs ($backend)"; }
teardown_verbs() { rmem_down; }
setup_null() {
  # rmem's own layout: a queue per vCPU (at most 4), 16 tags of 256 KiB each.
  _q=$(nproc); [ "$_q" -gt 4 ] && _q=4
  rublk add null -q "$_q" -d 16 -b 256KiB --quiet > /tmp/rublk.log 2>&1 || fail "rublk add null" 82
  wait_for "ublk null device" 30 has_size 'ublkb*' || fail "no ublk null device" 82
  label="ublk null (rublk)"
}
teardown_null() { rublk del -a > /dev/null 2>&1; }
setup_nbdkit() {
  nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10810 /usr/lib/rmem/nbdkit-memory-plugin.so 256M \
    > /tmp/nbdkit.log 2>&1 &
  echo $! > /tmp/nbdkit.pid
  wait_for "nbdkit listening" 30 port_listening 10810 || fail "nbdkit" 82
  nbd-client 127.0.0.1 10810 /dev/nbd1 -b 4096 > /tmp/nbd.log 2>&1 || fail "nbd-client to nbdkit" 82
  dev=/dev/nbd1 label="nbd, nbdkit memory"
}
teardown_nbdkit() {
  nbd-client -d /dev/nbd1 > /dev/null 2>&1
  kill "$(cat /tmp/nbdkit.pid)"; wait "$(cat /tmp/nbdkit.pid)" 2> /dev/null; rm -f /tmp/nbdkit.pid
}
setup_disk() {
  [ -b /dev/vda ] || fail "no virtio disk /dev/vda" 82
  dev=/dev/vda label="virtio disk (host file, cache=$DISK_CACHE)"
}
teardown_disk() { :; }

# job NAME ARGS...: one fio job on $dev; its terse line in $terse. fio's error fails the run.
job() {
  _j_name=$1
  shift
  terse=$(fio --name="$_j_name" --filename="$dev" --direct=1 --ioengine=libaio --size="$SIZE" \
    --output-format=terse "$@" 2> /tmp/fio.err) || fail "fio $_j_name on $dev: $(cat /tmp/fio.err)" 84
  [ -s /tmp/fio.err ] && cat /tmp/fio.err
  [ "$(echo "$terse" | cut -d';' -f5)" = 0 ] || fail "fio $_j_name on $dev: error in $terse" 84
}
timed() { job "$@" --runtime="$RUNTIME" --time_based; }
# Terse v3: read bandwidth (KiB/s) and IOPS are fields 7 and 8, write's 48 and 49.
rd_iops() { echo "$terse" | cut -d';' -f8; }
wr_iops() { echo "$terse" | cut -d';' -f49; }
rd_mib() { echo "$terse" | awk -F';' '{printf "%.1f", $7 / 1024}'; }
wr_mib() { echo "$terse" | awk -F';' '{printf "%.1f", $48 / 1024}'; }

table=/tmp/table
printf '| %-30s | %s | %s | %s | %s | %s |\n' device "4K randread IOPS qd16" \
  "4K randwrite IOPS qd16" "1M read MiB/s" "1M write MiB/s" "peak in flight" > "$table"
printf '|%s|%s|%s|%s|%s|%s|\n' -------------------------------- ---: ---: ---: ---: ---: >> "$table"

devices="tcp verbs"
if [ -e /dev/ublk-control ] && command -v rublk > /dev/null; then devices="$devices null"; fi
devices="$devices nbdkit disk"
for d in $devices; do
  peak="-" dev="" backend=""
  "setup_$d"
  echo "== $label: $dev"
  # The data every read below meets, written once and verified (the null target keeps none).
  if [ "$d" = null ]; then
    job fill --rw=write --bs=1M --iodepth=4
  else
    job fill --rw=write --bs=1M --iodepth=4 --verify=crc32c --do_verify=1
  fi
  timed randread --rw=randread --bs=4k --iodepth=16; rr=$(rd_iops)
  timed randwrite --rw=randwrite --bs=4k --iodepth=16; rw=$(wr_iops)
  timed seqread --rw=read --bs=1M --iodepth=4; sr=$(rd_mib)
  timed seqwrite --rw=write --bs=1M --iodepth=4; sw=$(wr_mib)
  "teardown_$d" || fail "teardown of $d" 86
  printf '| %-30s | %s | %s | %s | %s | %s |\n' "$label" "$rr" "$rw" "$sr" "$sw" "$peak" >> "$table"
done

echo "== fio on block devices, kernel $(uname -r), $(nproc) vCPUs, ${RUNTIME} s per job," \
  "libaio, O_DIRECT, first $SIZE of each device"
echo "=== BEGIN fio-compare table"
cat "$table"
echo "=== END fio-compare table"
