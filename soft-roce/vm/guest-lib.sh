# shellcheck shell=sh
# What the guest scripts (soft-roce/vm/guest-*.sh) and the image's /init share. build-initramfs.sh
# puts this file next to the guest script (/guest-lib.sh beside /guest.sh); a script sources it
# from its own directory:  . "$(dirname "$0")/guest-lib.sh"
# POSIX sh as busybox runs it. There is no `local` in POSIX sh: a function's working variables
# start with an underscore and the function's initials, so they clash with no caller's.

# --- waiting for readiness ---

# uptime_s: whole seconds since the guest booted.
uptime_s() { read -r _us _ < /proc/uptime; echo "${_us%.*}"; }

# wait_for [-p PID] [-i STEP] DESC SECONDS CMD...: runs CMD every STEP seconds (default 0.2) until
# it succeeds. Returns 1, printing "NOT READY ...: DESC", after SECONDS (guest uptime), or at once
# when process PID is gone. CMD polls the thing that must be ready (a port, a line in a log, a
# file in /sys, a device), never the clock.
wait_for() {
  _wf_pid="" _wf_step=0.2
  while :; do
    case $1 in
      -p) _wf_pid=$2; shift 2 ;;
      -i) _wf_step=$2; shift 2 ;;
      *) break ;;
    esac
  done
  _wf_desc=$1 _wf_secs=$2
  shift 2
  _wf_end=$(( $(uptime_s) + _wf_secs ))
  until "$@"; do
    if [ -n "$_wf_pid" ] && ! kill -0 "$_wf_pid" 2>/dev/null; then
      echo "NOT READY: $_wf_desc (process $_wf_pid exited)"
      return 1
    fi
    if [ "$(uptime_s)" -ge "$_wf_end" ]; then
      echo "NOT READY after $_wf_secs s: $_wf_desc"
      return 1
    fi
    sleep "$_wf_step"
  done
}

# port_listening PORT: a TCP socket of this guest listens on PORT (/proc/net/tcp or tcp6, state
# 0A). It does not connect: a one-shot server such as perftest's would take that for its client.
port_listening() {
  _pl=$(printf ':%04X ' "$1")
  grep -q "${_pl}[0-9A-F]*:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# --- reporting ---

# section NAME CMD...: CMD's output between "=== BEGIN NAME" and "=== END NAME rc=<status>"
# markers (benches/compare-verbs.sh reads them); a failing CMD sets status=1.
section() {
  _s_name=$1
  shift
  echo "=== BEGIN $_s_name"
  "$@"
  _s_rc=$?
  echo "=== END $_s_name rc=$_s_rc"
  # shellcheck disable=SC2034 # the calling script's overall status
  [ "$_s_rc" -eq 0 ] || status=1
}

# fail MESSAGE [STATUS]: prints "FAIL: MESSAGE", then the first warnings and the tail of each
# log in $FAIL_LOGS (default /tmp/*.log), runs $FAIL_HOOK when set (swap-2vm: tell VM a to
# stop), and exits with STATUS (default 80).
fail() {
  echo "FAIL: $1"
  for _f_log in ${FAIL_LOGS:-/tmp/*.log}; do
    [ -e "$_f_log" ] || continue
    # The first warnings say what went wrong first; the tail says where it ended.
    echo "--- $_f_log (first warnings)"; grep -m 15 -E "WARN|ERROR" "$_f_log"
    echo "--- $_f_log (last lines)"; tail -20 "$_f_log"
  done
  if [ -n "${FAIL_HOOK:-}" ]; then eval "$FAIL_HOOK"; fi
  exit "${2:-80}"
}

# --- donors and rmem swap ---

# donor NAME PORT PROVIDER: `rmem server` in the background on this guest's address ($RMEM_IP)
# and PORT, 8 MiB slabs, no admin endpoint, plus $DONOR_ARGS (its --size, --no-pressure...); log
# /tmp/donor-NAME.log, pid /tmp/NAME.pid. Returns once it listens (its start-up line), 1 when it
# exits first or is not listening within 60 s.
donor() {
  _d_extra=""
  [ "$3" = verbs ] && _d_extra="--device rxe0"
  # shellcheck disable=SC2086 # $_d_extra and $DONOR_ARGS hold several arguments
  rmem server --listen "${RMEM_IP%/*}:$2" --slab-size 8M --provider "$3" $_d_extra \
    --no-admin --hugepages never ${DONOR_ARGS:-} > "/tmp/donor-$1.log" 2>&1 &
  _d_pid=$!
  echo "$_d_pid" > "/tmp/$1.pid"
  wait_for -p "$_d_pid" "donor $1 listening on ${RMEM_IP%/*}:$2 ($3)" 60 \
    grep -q '^rmem server lending' "/tmp/donor-$1.log"
}

# stop_donors: stops every donor `donor` started and waits until each has exited, so its port is
# free for the next one.
stop_donors() {
  for _sd in /tmp/*.pid; do
    if [ ! -e "$_sd" ] || [ "$_sd" = /tmp/swapd.pid ]; then continue; fi
    _sd_pid=$(cat "$_sd")
    kill "$_sd_pid" 2>/dev/null
    wait "$_sd_pid" 2>/dev/null
    rm -f "$_sd"
  done
}

# rmem_swap_on: an rmem swap device (NBD or ublk) is in /proc/swaps.
rmem_swap_on() { grep -Eq '^/dev/(nbd|ublkb)' /proc/swaps; }

# swap_up LOG SECONDS ARGS...: `rmem swap up ARGS...` in the background (output in LOG, pid in
# /tmp/swapd.pid). Returns once its device is swapped on; 1 when the daemon exits first or
# SECONDS pass.
swap_up() {
  _su_log=$1 _su_secs=$2
  shift 2
  rmem swap up "$@" > "$_su_log" 2>&1 &
  _su_pid=$!
  echo "$_su_pid" > /tmp/swapd.pid
  wait_for -p "$_su_pid" "rmem swap up $*: its device in /proc/swaps" "$_su_secs" rmem_swap_on
}

# dev_up LOG SECONDS ARGS...: `rmem swap up --no-swapon ARGS...` in the background (output in
# LOG, pid in /tmp/swapd.pid): a block device only. Returns once it is there, with its path in
# $dev and its kind (ublk or nbd) in $backend; 1 when the daemon exits first or SECONDS pass.
dev_up() {
  _du_log=$1 _du_secs=$2
  shift 2
  rmem swap up --no-swapon "$@" > "$_du_log" 2>&1 &
  _du_pid=$!
  echo "$_du_pid" > /tmp/swapd.pid
  wait_for -p "$_du_pid" "rmem swap up --no-swapon $*: its device" "$_du_secs" dev_ready
}
dev_ready() {
  _dr=$(rmem swap status --json 2> /dev/null) || return 1
  dev=$(echo "$_dr" | sed -n 's/.*"device":"\([^"]*\)".*/\1/p')
  # shellcheck disable=SC2034 # the caller's
  backend=$(echo "$_dr" | sed -n 's/.*"backend":"\([^"]*\)".*/\1/p')
  [ -b "$dev" ]
}

# peak_in_flight: the most requests the running rmem device has had in flight at once.
peak_in_flight() { rmem swap status --json | sed -n 's/.*"peak_in_flight":\([0-9]*\).*/\1/p'; }

# swap_down: `rmem swap down`, checked, and the daemon waited for.
swap_down() {
  rmem swap down > /dev/null || fail "rmem swap down" 86
  rmem_swap_on && fail "still swapping after down" 86
  wait "$(cat /tmp/swapd.pid)" 2>/dev/null
  rm -f /tmp/swapd.pid
}

# replicas_rebuilt: `rmem swap status` shows no degraded and no lost chunk (keys come sorted:
# each figure is checked on its own).
replicas_rebuilt() {
  _rr=$(rmem swap status --json) && echo "$_rr" | grep -q '"degraded":0' &&
    echo "$_rr" | grep -q '"lost":0'
}

# --- memory and swap traffic ---

# work_cgroup LIMIT: the memory cgroup /sys/fs/cgroup/work, limited to LIMIT (memory.max). A
# guest without cgroup2 exits 83.
work_cgroup() {
  if ! { mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup; }; then exit 83; fi
  echo +memory > /sys/fs/cgroup/cgroup.subtree_control
  mkdir /sys/fs/cgroup/work
  echo "$1" > /sys/fs/cgroup/work/memory.max
}

# limited CMD...: runs CMD inside the work cgroup; the caller (and the donors) stay outside.
limited() {
  # shellcheck disable=SC2016 # $$ and $@ are the inner shell's
  sh -c 'echo $$ > /sys/fs/cgroup/work/cgroup.procs && exec "$@"' limited "$@"
}

# vmstat KEY: a counter from /proc/vmstat.
vmstat() { awk -v k="$1" '$1 == k {print $2}' /proc/vmstat; }

# mark: remembers the swap counters and the time (out0, in0, t0).
mark() { out0=$(vmstat pswpout); in0=$(vmstat pswpin); t0=$(cut -d' ' -f1 /proc/uptime); }

# swapped MIN_OUT MIN_IN: prints the pages swapped out and in since `mark`; 1 unless at least
# MIN_OUT went out and MIN_IN came back.
swapped() {
  _sw_out=$(( $(vmstat pswpout) - out0 ))
  _sw_in=$(( $(vmstat pswpin) - in0 ))
  echo "== pages swapped out: $_sw_out, in: $_sw_in (at least $1 and $2 required);" \
    "$t0 -> $(cut -d' ' -f1 /proc/uptime) s"
  [ "$_sw_out" -ge "$1" ] && [ "$_sw_in" -ge "$2" ]
}

# inject_after PAGES DESC CMD...: in the background, once PAGES pages went out to swap since
# `mark` (mid-run, however fast the host is), prints "== DESC" and runs CMD; /tmp/injected exists
# once CMD succeeded. Its pid is in $injector: the caller stops it once the run is over.
inject_after() {
  _ia_pages=$1 _ia_desc=$2
  shift 2
  rm -f /tmp/injected
  (
    # Polls the swap counter twice a second until the run has gone far enough.
    while [ $(( $(vmstat pswpout) - out0 )) -lt "$_ia_pages" ]; do sleep 0.5; done
    echo "== $_ia_desc ($(cut -d' ' -f1 /proc/uptime) s)"
    "$@" && touch /tmp/injected
  ) &
  # shellcheck disable=SC2034 # the caller's
  injector=$!
}
