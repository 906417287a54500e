#!/bin/sh
# Runs inside each VM of run.sh's swap-2vm mode. VM a (RMEM_ROLE=server) is the donor host:
# it starts and stops donors when VM b asks over a tiny control port. VM b (client) is the
# borrower with little RAM: `rmem swap up` against a's donors is its only swap, with no memory
# cgroup, and `rmem memcheck` fills and verifies about twice b's RAM, sequentially: over tcp,
# over verbs on rxe0, then over tcp with two replicas on three donors while a kills one of them
# (b asks once enough pages went out) and the survivors rebuild the lost copies.
# b fails on any bad page, too little swap traffic, a lost chunk or missing rebuild; its status
# is the run's. An argument size=SIZE (run.sh swap-2vm size=64M) replaces the workload's size:
# with less than b's RAM nothing needs to swap, a quick check of the harness only; and
# min_free_kbytes=N sets vm.min_free_kbytes in b (a larger reserve for the daemon's allocations);
# phases=3 (or 1,3...) runs only those phases.
# Under TCG, b with 384M (MemTotal 329 MiB), memcheck 658M, each phase takes 2.5-3.5 minutes.
# With `rmem swap up --min-free keep` (the kernel's 2.2 MiB reserve) phase 1 stalls within
# seconds: the daemon's socket sends wait for memory that only the swap-out they carry would
# free (see docs/swap.md); rmem's default reserve is what lets the whole guest swap.
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
export RMEM_SECRET="vm swap 2vm test secret"
peer=$RMEM_PEER
CTL=18700

# --- VM a: donors on demand ---
if [ "$RMEM_ROLE" = server ]; then
  DONOR_ARGS="--size 1G --no-pressure"
  # The donors' logs go to the console as they are written: a borrower that hangs or panics
  # never asks for them, and they say why a donor dropped it.
  for n in a b c; do : > "/tmp/donor-$n.log"; done
  tail -F /tmp/donor-a.log /tmp/donor-b.log /tmp/donor-c.log > /dev/console 2>&1 &
  # start NAME PORT PROVIDER: a donor (b's `rmem swap up` finds out whether it came up).
  start() { donor "$@" || echo "== a: donor $1 did not start"; }
  # One command per connection: tcp, verbs, replicas, kill-a, done.
  while :; do
    cmd=$(nc -l -p "$CTL" < /dev/null)
    echo "== a: $cmd ($(cut -d' ' -f1 /proc/uptime) s)"
    case $cmd in
      tcp) stop_donors; start a 7470 tcp ;;
      verbs) stop_donors; start a 7470 verbs ;;
      replicas) stop_donors; start a 7470 tcp; start b 7471 tcp; start c 7472 tcp ;;
      kill-a) kill -9 "$(cat /tmp/a.pid)"; rm -f /tmp/a.pid ;;
      done) stop_donors; break ;;
      *) echo "== a: unknown command" ;;
    esac
  done
  for f in /tmp/donor-*.log; do echo "--- $f"; tail -5 "$f"; done
  exit 0
fi

# --- VM b: the borrower ---
# ctl CMD: asks VM a, retrying while a boots or is between two commands (up to 150 s).
ctl() { wait_for -i 0.5 "VM a's control port $peer:$CTL (to send $1)" 150 ctl_send "$1"; }
ctl_send() { echo "$1" | nc "$peer" "$CTL" > /dev/null 2>&1; }
FAIL_LOGS="/tmp/*.log /run/rmem-log/*.log"
FAIL_HOOK="ctl done"

mem_kib=$(awk '/^MemTotal/ {print $2}' /proc/meminfo)
size_mib=$((mem_kib * 2 / 1024))
phases="1 2 3"
for a in $RMEM_TEST_ARGS; do
  case $a in
    size=*M) size_mib=${a#size=}; size_mib=${size_mib%M} ;;
    min_free_kbytes=*) echo "${a#*=}" > /proc/sys/vm/min_free_kbytes ;;
    phases=*) phases=$(echo "${a#phases=}" | tr , ' ') ;;
    *) echo "unknown argument $a (size=NM, min_free_kbytes=N, phases=1,2,3)"; ctl "done"; exit 2 ;;
  esac
done
swap_mib=$((size_mib + 256))
# The pages that cannot stay resident: at least half of them must go out and come back.
excess=$(( (size_mib * 1024 - mem_kib) / 4 ))
echo "== b: MemTotal $((mem_kib / 1024)) MiB; memcheck ${size_mib}M; swap ${swap_mib}M; no memory cgroup;" \
  "vm.min_free_kbytes $(cat /proc/sys/vm/min_free_kbytes)"

# The swap daemon's log lives on ramfs, which is never swapped: on tmpfs (the initramfs's /tmp)
# a page of the log file can be swapped out to the very device the daemon serves, and the
# daemon's next log line would then wait for a swap-in only it can serve.
mkdir -p /run/rmem-log && mount -t ramfs ramfs /run/rmem-log
# Its log also goes to the console as it is written, for a run that ends in a hang or a panic.
: > /run/rmem-log/swap.log; tail -F /run/rmem-log/swap.log > /dev/console 2>&1 &

# up ARGS...: `rmem swap up` against a's donors, waiting until swap is on. VM a starts its donors
# when asked and cannot answer when they listen: a daemon that exits because a donor does not
# answer yet is started again, a second later (at most 30 times).
up() {
  tries=0
  until swap_up /run/rmem-log/swap.log 60 --size "${swap_mib}M" "$@"; do
    kill -0 "$(cat /tmp/swapd.pid)" 2>/dev/null && fail "swap did not come up ($*)" 81
    tries=$((tries + 1)); [ $tries -gt 30 ] && fail "rmem swap up keeps exiting ($*)" 81
    sleep 1
  done
  echo "== rmem swap up $* ($(cut -d' ' -f1 /proc/uptime) s)"; cat /proc/swaps
  # The kernel may hand over at most 32 requests of 256 KiB: none waits near its timeout.
  q=/sys/block/$(awk '/nbd/ {sub("/dev/", "", $1); print $1; exit}' /proc/swaps)/queue
  echo "== NBD queue: nr_requests $(cat "$q/nr_requests"), max_sectors_kb $(cat "$q/max_sectors_kb")"
  [ "$(cat "$q/nr_requests")" -le 32 ] && [ "$(cat "$q/max_sectors_kb")" -le 256 ] ||
    fail "the NBD queue is not limited" 81
  # Watermark boosting is off while the device is swap (see docs/swap.md).
  [ "$(cat /proc/sys/vm/watermark_boost_factor)" = 0 ] || fail "watermark boosting still on" 81
}

down() { swap_down; }
# watchdog: when swap traffic stops for 10 s (and every 30 s after), the kernel's view of who
# is blocked (SysRq w) and of memory (SysRq m) goes to the console: what a failing run leaves to
# read. It never forks (no sleep, awk or cat): with memory gone, a fork would wait like the rest.
echo 10 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
echo 1 > /proc/sys/kernel/hung_task_all_cpu_backtrace 2>/dev/null
echo 8 > /proc/sys/kernel/printk 2>/dev/null  # the stacks are KERN_INFO
echo 1 > /proc/sys/kernel/sysrq 2>/dev/null
mkfifo /tmp/wd.fifo 2>/dev/null
watchdog() {
  exec 3<> /tmp/wd.fifo
  last=""; still=0
  while :; do
    # shellcheck disable=SC3045 # busybox sh has read -t: a 2 s tick that needs no fork
    read -r -t 2 _ <&3
    cur=""
    while read -r k v; do
      case $k in pswpin|pswpout) cur="$cur $v" ;; esac
    done < /proc/vmstat
    if [ "$cur" = "$last" ]; then still=$((still + 2)); else still=0; last=$cur; fi
    if [ $still -ge 10 ] && [ $(( (still - 10) % 30 )) -eq 0 ]; then
      echo "== watchdog: no swap traffic for $still s (pswpin/out$cur)"
      echo w > /proc/sysrq-trigger
      echo m > /proc/sysrq-trigger
    fi
  done
}
# check_swapped: at least half the pages that cannot stay resident went out and came back.
check_swapped() { swapped $((excess / 2)) $((excess / 2)) || fail "too little went through swap" 85; }
# work: memcheck of size_mib with the watchdog on.
work() {
  watchdog & wd=$!
  rmem memcheck --size "${size_mib}M" --passes 1 || { kill $wd; fail "memcheck" 84; }
  kill $wd
}

phase1() {
  echo "== 1: tcp, one replica"
  ctl tcp || fail "VM a does not answer" 5
  up --donor "$peer:7470"
  mark; work; check_swapped
  rmem swap status
  down
}

phase2() {
  echo "== 2: verbs on rxe0, one replica"
  ctl verbs || fail "VM a does not answer" 5
  up --donor "$peer:7470" --provider verbs --device rxe0
  mark; work; check_swapped
  rmem swap status
  down
}

phase3() {
  echo "== 3: tcp, two replicas on three donors, donor a killed mid-run"
  ctl replicas || fail "VM a does not answer" 5
  up --donor "$peer:7470@a" --donor "$peer:7471@b" --donor "$peer:7472@c" --replicas 2 --op-timeout 2
  mark
  # Asks a to kill donor a once a quarter of the excess went out: mid-run, whatever the speed.
  inject_after $((excess / 4)) "asking VM a to kill donor a" ctl kill-a
  work
  kill "$injector" 2>/dev/null; wait "$injector"
  [ -e /tmp/injected ] || fail "donor a was not killed during the run" 87
  check_swapped
  wait_for "replicas rebuilt (no chunk degraded or lost)" 60 replicas_rebuilt ||
    { rmem swap status; fail "replicas not rebuilt" 87; }
  rmem swap status
  rmem swap status --json | grep -q '"healthy":false' || fail "the killed donor is not reported" 87
  rmem swap status --json | grep -q '"lost":0' || fail "chunks lost" 87
  down
}

for ph in $phases; do "phase$ph"; done
ctl "done"
echo "== swap-2vm: all passed"
