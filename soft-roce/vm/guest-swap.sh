#!/bin/sh
# Runs inside the VM (see build-initramfs.sh): `rmem swap up` as the guest's only swap, three
# times: over tcp, over verbs on rxe0, and with two replicas while a donor is killed mid-run.
# Each time `rmem memcheck` fills checksummed memory worth 2.5x its cgroup's limit (the memory
# the workload may keep resident), so pages go out to the donors and come back, and every page
# is verified. Fails on any bad page, on too little swap traffic, or on a lost chunk. First, the
# device alone: with the donor stopped, 32 processes writing with O_DIRECT must put a whole
# queue in flight at once; then the bytes read back must match.
# The device is ublk where the guest kernel has ublk_drv (6.12), NBD elsewhere (6.1); the
# run checks that `rmem swap up` picked the one it should. `run.sh swap quick` leaves out the
# random pass over tcp (the slowest part under TCG).
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
export RMEM_SECRET="vm swap test secret"
IP=${RMEM_IP%/*}
DONOR_ARGS="--size 256M --no-pressure"

work_cgroup 64M
bash /bin/rxe.sh check rxe0 > /dev/null 2>&1 || { bash /bin/rxe.sh remove rxe0; bash /bin/rxe.sh add eth0 rxe0; } || exit 91

# up ARGS...: `rmem swap up` against the donors, waiting until swap is on.
up() {
  swap_up /tmp/swap.log 30 --size 192M --json "$@" || fail "swap did not come up ($*)" 81
  echo "== rmem swap up $*"; cat /proc/swaps
  want=nbd; [ -e /dev/ublk-control ] && want=ublk
  rmem swap status --json | grep -q "\"backend\":\"$want\"" || fail "not on $want" 81
}

# down: swap off, and every donor stopped (its port free for the next phase).
down() { swap_down; stop_donors; }

# work ARGS...: memcheck in the limited cgroup; fails the test on a bad page.
work() { limited rmem memcheck "$@" || fail "memcheck $*" 84; }

echo "== 0: the device alone (no swap), tcp: a full queue in flight, 32 writers and 32 readers, O_DIRECT"
# The donor is stopped (SIGSTOP) while 32 dd processes, one request in flight each, start
# writing: none can complete, so a whole queue must be in flight together (ublk: a queue's 16
# tags, all at the donor; NBD: a connection's 8 workers). Then it runs on, every writer
# completes, and every byte read back by 32 readers must be the byte written.
donor a 7470 tcp || fail "donor a" 81
dev_up /tmp/swap.log 30 --size 192M --donor "$IP:7470" --op-timeout 60 || fail "rmem device did not come up" 81
full=16; [ "$backend" = nbd ] && full=8
dd if=/dev/urandom of=/tmp/pattern bs=1M count=32 2> /dev/null
# The kernel scans a new disk for partitions, holding every open of it meanwhile: one read
# (its open waits for the scan) so none of the writers below is held there instead.
dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct 2> /dev/null || fail "first read of $dev" 84
kill -STOP "$(cat /tmp/a.pid)"
# (A bare `wait` would wait for the donor and the device's daemon too: the dd's pids only.)
i=0 ddp=""
while [ $i -lt 32 ]; do
  dd if=/tmp/pattern of="$dev" bs=4k skip=$((i * 256)) seek=$((i * 256)) count=256 \
    oflag=direct conv=notrunc 2> /dev/null &
  ddp="$ddp $!" i=$((i + 1))
done
full_queue() { [ "$(peak_in_flight)" -ge "$full" ]; }
wait_for "$full requests in flight at once (donor stopped)" 30 full_queue ||
  { kill -CONT "$(cat /tmp/a.pid)"; fail "peak in flight $(peak_in_flight), not $full" 88; }
kill -CONT "$(cat /tmp/a.pid)"
for p in $ddp; do wait "$p" || fail "a writer failed" 84; done
i=0 ddp=""
while [ $i -lt 32 ]; do
  dd if="$dev" of=/tmp/back.$i bs=4k skip=$((i * 256)) count=256 iflag=direct 2> /dev/null &
  ddp="$ddp $!" i=$((i + 1))
done
for p in $ddp; do wait "$p" || fail "a reader failed" 84; done
i=0
while [ $i -lt 32 ]; do cat /tmp/back.$i; i=$((i + 1)); done > /tmp/back
cmp /tmp/pattern /tmp/back || fail "data read back differs from data written" 84
echo "== $backend device $dev: $full requests in flight at once; 32 MiB written and read back" \
  "by 32 processes, equal"
rm -f /tmp/pattern /tmp/back /tmp/back.*
swap_down
stop_donors

echo "== 1: tcp, one replica"
donor a 7470 tcp || fail "donor a" 81
up --donor "$IP:7470"
mark; work --size 160M --passes 1
case " $RMEM_TEST_ARGS " in *" quick "*) ;; *) work --size 96M --passes 1 --random ;; esac
swapped 20000 10000 || fail "too little went through swap" 85
rmem swap status
down

echo "== 2: verbs on rxe0, one replica"
donor a 7470 verbs || fail "donor a" 81
up --donor "$IP:7470" --provider verbs --device rxe0
mark; work --size 160M --passes 1
swapped 20000 10000 || fail "too little went through swap" 85
rmem swap status
down

echo "== 3: tcp, two replicas, one donor killed mid-run"
for d in "a 7470" "b 7471" "c 7472"; do
  # shellcheck disable=SC2086 # name and port
  donor $d tcp || fail "donor $d" 81
done
up --donor "$IP:7470@a" --donor "$IP:7471@b" --donor "$IP:7472@c" --replicas 2 --op-timeout 2 \
  --metrics 127.0.0.1:9472
mark
# Donor a dies once 10000 pages (40 MiB) went out: early in the first of two passes.
inject_after 10000 "killing donor a" kill -9 "$(cat /tmp/a.pid)"
work --size 160M --passes 2
kill "$injector" 2>/dev/null; wait "$injector"
[ -e /tmp/injected ] || fail "donor a was not killed during the run" 87
swapped 20000 10000 || fail "too little went through swap" 85
wait_for "replicas rebuilt (no chunk degraded or lost)" 20 replicas_rebuilt ||
  { rmem swap status; fail "replicas not rebuilt" 87; }
rmem swap status
rmem swap status --json | grep -q '"healthy":false' || fail "the killed donor is not reported" 87
rmem swap status --json | grep -q '"lost":0' || fail "chunks lost" 87
m=$(wget -qO- http://127.0.0.1:9472/metrics) || fail "no metrics" 87
echo "$m" | grep -E '^rmem_swap_(donor_up|chunks_lost|chunks_rebuilt_total)'
echo "$m" | grep -q "^rmem_swap_donor_up{.*donor=\"$IP:7470\".*} 0$" || fail "metrics: donor a not down" 87
echo "$m" | grep -q '^rmem_swap_chunks_lost{.*} 0$' || fail "metrics: chunks lost" 87
down
echo "== swap: all passed"
