#!/bin/sh
# Runs inside the VM (see build-initramfs.sh): `rmem swap up` as the guest's only swap, three
# times: over tcp, over verbs on rxe0, and with two replicas while a donor is killed mid-run.
# Each time `rmem memcheck` fills checksummed memory worth 2.5x its cgroup's limit (the memory
# the workload may keep resident), so pages go out to the donors and come back, and every page
# is verified. Fails on any bad page, on too little swap traffic, or on a lost chunk.
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
