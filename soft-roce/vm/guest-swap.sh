#!/bin/sh
# Runs inside the VM (see build-initramfs.sh): `rmem swap up` as the guest's only swap, three
# times: over tcp, over verbs on rxe0, and with two replicas while a donor is killed mid-run.
# Each time `rmem memcheck` fills checksummed memory worth 2.5x its cgroup's limit (the memory
# the workload may keep resident), so pages go out to the donors and come back, and every page
# is verified. Fails on any bad page, on too little swap traffic, or on a lost chunk.
# The device is ublk where the guest kernel has ublk_drv (6.12), NBD elsewhere (6.1); the
# run checks that `rmem swap up` picked the one it should. `run.sh swap quick` leaves out the
# random pass over tcp (the slowest part under TCG).
export RMEM_SECRET="vm swap test secret"
IP=10.0.2.15
fail() { echo "FAIL: $*"; for f in /tmp/*.log; do echo "--- $f"; tail -20 "$f"; done; exit "${2:-80}"; }

mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || exit 83
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/work
echo 64M > /sys/fs/cgroup/work/memory.max
bash /bin/rxe.sh check rxe0 > /dev/null 2>&1 || { bash /bin/rxe.sh remove rxe0; bash /bin/rxe.sh add eth0 rxe0; } || exit 91

# donor NAME PORT PROVIDER: a donor in the background, its pid in $NAME.pid.
donor() {
  extra=""
  [ "$3" = verbs ] && extra="--device rxe0"
  rmem server --listen "$IP:$2" --size 256M --slab-size 8M --provider "$3" $extra \
    --no-admin --no-pressure --hugepages never > "/tmp/donor-$1.log" 2>&1 &
  echo $! > "/tmp/$1.pid"
}

# up ARGS...: starts `rmem swap up` and waits until swap is on.
up() {
  rmem swap up --size 192M --json "$@" > /tmp/swap.log 2>&1 &
  echo $! > /tmp/swapd.pid
  n=0
  until grep -Eq '^/dev/(nbd|ublkb)' /proc/swaps; do
    n=$((n + 1)); [ $n -gt 150 ] && fail "swap did not come up ($*)" 81
    kill -0 "$(cat /tmp/swapd.pid)" 2>/dev/null || fail "rmem swap up exited ($*)" 81
    sleep 0.2
  done
  echo "== rmem swap up $*"; cat /proc/swaps
  want=nbd; [ -e /dev/ublk-control ] && want=ublk
  rmem swap status --json | grep -q "\"backend\":\"$want\"" || fail "not on $want" 81
}

down() {
  rmem swap down > /dev/null || fail "rmem swap down" 86
  grep -Eq '^/dev/(nbd|ublkb)' /proc/swaps && fail "still swapping after down" 86
  wait "$(cat /tmp/swapd.pid)" 2>/dev/null
  for p in /tmp/*.pid; do [ "$(basename "$p")" = swapd.pid ] || kill "$(cat "$p")" 2>/dev/null; rm -f "$p"; done
  sleep 0.5
}

# work ARGS...: memcheck in the limited cgroup; fails the test on a bad page.
work() {
  sh -c "echo \$\$ > /sys/fs/cgroup/work/cgroup.procs && exec rmem memcheck $*" || fail "memcheck $*" 84
}

swapped() {
  out=$(( $(awk '/^pswpout/ {print $2}' /proc/vmstat) - out0 ))
  in=$(( $(awk '/^pswpin/ {print $2}' /proc/vmstat) - in0 ))
  echo "== pages swapped out: $out, in: $in"
  [ "$out" -gt 20000 ] && [ "$in" -gt 10000 ] || fail "too little went through swap" 85
}
mark() { out0=$(awk '/^pswpout/ {print $2}' /proc/vmstat); in0=$(awk '/^pswpin/ {print $2}' /proc/vmstat); }

echo "== 1: tcp, one replica"
donor a 7470 tcp; sleep 1
up --donor "$IP:7470"
mark; work --size 160M --passes 1
case " $RMEM_TEST_ARGS " in *" quick "*) ;; *) work --size 96M --passes 1 --random ;; esac
swapped
rmem swap status
down

echo "== 2: verbs on rxe0, one replica"
donor a 7470 verbs; sleep 1
up --donor "$IP:7470" --provider verbs --device rxe0
mark; work --size 160M --passes 1; swapped
rmem swap status
down

echo "== 3: tcp, two replicas, one donor killed mid-run"
donor a 7470 tcp; donor b 7471 tcp; donor c 7472 tcp; sleep 1
up --donor "$IP:7470@a" --donor "$IP:7471@b" --donor "$IP:7472@c" --replicas 2 --op-timeout 2 \
  --metrics 127.0.0.1:9472
mark
( sleep 8; echo "== killing donor a"; kill -9 "$(cat /tmp/a.pid)" ) &
work --size 160M --passes 2
swapped
n=0
# Keys come sorted: check each figure on its own.
rebuilt() { st=$(rmem swap status --json) && echo "$st" | grep -q '"degraded":0' && echo "$st" | grep -q '"lost":0'; }
until rebuilt; do
  n=$((n + 1)); [ $n -gt 100 ] && { rmem swap status; fail "replicas not rebuilt" 87; }
  sleep 0.2
done
rmem swap status
rmem swap status --json | grep -q '"healthy":false' || fail "the killed donor is not reported" 87
rmem swap status --json | grep -q '"lost":0' || fail "chunks lost" 87
m=$(wget -qO- http://127.0.0.1:9472/metrics) || fail "no metrics" 87
echo "$m" | grep -E '^rmem_swap_(donor_up|chunks_lost|chunks_rebuilt_total)'
echo "$m" | grep -q "^rmem_swap_donor_up{.*donor=\"$IP:7470\".*} 0$" || fail "metrics: donor a not down" 87
echo "$m" | grep -q '^rmem_swap_chunks_lost{.*} 0$' || fail "metrics: chunks lost" 87
down
echo "== swap: all passed"
