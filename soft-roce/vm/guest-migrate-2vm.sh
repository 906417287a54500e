#!/bin/sh
# Runs inside each VM of run.sh's migrate-2vm mode: `rmem migrate` moves a running process's
# memory, a shared 40 MiB file on tmpfs, from VM a to VM b over the verbs provider (rxe0 in each
# guest, across the socket network between the two kernels). No QEMU runs inside the VMs.
# VM a (RMEM_ROLE=server) is the source: it runs migrate/guest's writer (`writer --file PATH`
# rewrites an 8 MiB hot set every 100 ms, checks a 24 MiB cold set, fills an 8 MiB fresh one a
# page every 4 ms) and `rmem migrate send --file --pid`; VM b (client) is the destination,
# `rmem migrate recv --file`. Two migrations:
#   1. precopy with exact dirty pages: the writer runs under rmem's preload library and send
#      takes its userfaultfd (--preload-socket: async write-protect and PAGEMAP_SCAN, 6.7+);
#   2. stop-copy of a fresh writer and file, without the library.
# Each must exit 0 on both sides with "verified":true in send's result (precopy: the dirty pages
# found by write-protect, at least one round); the writer must have reported no bad page and be
# left stopped; and the sha256 of b's file, sent to a over the network, must equal a's file's.
# Both VMs' statuses count. Messages: b -> a on port 18700 ("ready N", "hash N SHA", "abort:
# WHY"), a -> b on port 18701 ("abort: WHY"), so a failure on one side ends the other at once.
# Some functions run only through wait_for:
# shellcheck disable=SC2317
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
ip=${RMEM_IP%/*}
peer=$RMEM_PEER
TO_A=18700 TO_B=18701
PRELOAD=/usr/lib/rmem/librmem_preload.so
echo "rmem migrate 2vm test secret" > /tmp/secret
FAIL_LOGS="/tmp/*.log"

# tell PORT MESSAGE: sends one message to the other VM, retrying for up to SECONDS (default 150)
# while it is busy or still booting.
tell() { wait_for -i 0.5 "VM $RMEM_PEER's port $1 (to send \"$2\")" "${3:-150}" tell_once "$1" "$2"; }
tell_once() { echo "$2" | nc "$peer" "$1" > /dev/null 2>&1; }

# --- both: what this test needs ---
kv=$(uname -r)
kmaj=${kv%%.*} krest=${kv#*.}
kmin=${krest%%[!0-9]*}
if [ "$kmaj" -lt 6 ] || { [ "$kmaj" -eq 6 ] && [ "$kmin" -lt 7 ]; }; then
  fail "step setup: kernel $kv is older than 6.7: no userfaultfd WP_ASYNC / PAGEMAP_SCAN (run.sh: RMEM_VM_KERNEL=backports)" 2
fi
for t in rmem writer sha256sum nc timeout; do
  command -v "$t" > /dev/null || fail "step setup: $t is not in the image" 2
done
mkdir -p /dev/shm
grep -q ' /dev/shm tmpfs' /proc/mounts || mount -t tmpfs shm /dev/shm || fail "step setup: mount tmpfs on /dev/shm" 2

# field KEY JSON: a number from one JSON line, rounded to an integer; "-" when null or absent.
field() {
  echo "$2" | sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" |
    awk '/^[0-9.]+$/ { printf "%.0f", $1; next } { printf "-" } END { if (!NR) printf "-" }'
}

# --- VM a: the source ---
if [ "$RMEM_ROLE" = server ]; then
  [ -f "$PRELOAD" ] || fail "step setup: $PRELOAD is not in the image" 2
  # shellcheck disable=SC2016 # $1 is fail's message when fail evaluates the hook
  FAIL_HOOK='tell "$TO_B" "abort: $1" 30'

  # hear N WANT: waits (up to 150 s) for the message "WANT ..." from b; a message "abort: ..."
  # fails this VM too. Sets $msg.
  hear() {
    msg=$(timeout 150 nc -l -p "$TO_A" < /dev/null)
    case $msg in
      "$2"*) ;;
      abort*) FAIL_HOOK="" fail "step $1: VM b gave up: ${msg#abort: }" 3 ;;
      "") fail "step $1: nothing from VM b within 150 s (waiting for \"$2\")" 3 ;;
      *) fail "step $1: VM b said \"$msg\" (waiting for \"$2\")" 3 ;;
    esac
  }

  # ticks LOG: the writer's "tick" lines so far.
  ticks() { grep -c '^tick ' "$1"; }
  # writer N FILE LOG [PRELOAD]: a fresh writer on FILE (under the preload library when asked);
  # returns once it is ready and ticked three times with no bad page. Sets $wpid.
  writer_up() {
    rm -f "$2" /tmp/w.sock
    if [ -n "${4:-}" ]; then
      LD_PRELOAD=$PRELOAD RMEM_PRELOAD_SOCKET=/tmp/w.sock writer --file "$2" > "$3" 2>&1 &
    else
      writer --file "$2" > "$3" 2>&1 &
    fi
    wpid=$!
    wait_for -p "$wpid" "writer $1: 3 ticks" 60 sh -c "[ \$(grep -c '^tick ' $3) -ge 3 ]" ||
      fail "step writer $1: the writer did not start" 4
    if [ -n "${4:-}" ]; then
      wait_for -p "$wpid" "writer $1: the preload library's socket /tmp/w.sock" 30 test -S /tmp/w.sock ||
        fail "step writer $1: no preload socket (LD_PRELOAD=$PRELOAD not loaded?)" 4
    fi
    no_bad "writer $1" "$3"
  }
  # no_bad STEP LOG: every tick so far says bad=0, and the writer said nothing else.
  no_bad() {
    _nb=$(grep -v '^rmem-guest ready$' "$2" | grep -v '^tick [0-9]* bad=0$' | head -3)
    [ -z "$_nb" ] || fail "step $1: the writer reported: $_nb" 5
  }

  # migrate N MODE FILE LOG ARGS...: `rmem migrate send` of the writer $wpid to b's migration N,
  # then the checks: exit 0, verified, the writer stopped with no bad page, b's hash equal.
  migrate() {
    _n=$1 _mode=$2 _file=$3 _log=$4
    shift 4
    hear "$_n ($_mode): b's rmem migrate recv" "ready $_n"
    _port=${msg##* }
    echo "== a: migration $_n ($_mode) to $peer:$_port, writer $wpid at tick $(ticks "$_log") ($(cut -d' ' -f1 /proc/uptime) s)"
    _rc=0
    rmem migrate send --file "$_file" --pid "$wpid" --to "$peer:$_port" --provider verbs \
      --mode "$_mode" --verify --json --secret-file /tmp/secret --timeout 120 "$@" \
      > "/tmp/send$_n.log" 2>&1 || _rc=$?
    cat "/tmp/send$_n.log"
    [ "$_rc" -eq 0 ] || fail "step $_n ($_mode): rmem migrate send exited $_rc" 10
    res=$(grep '"event":"result"' "/tmp/send$_n.log")
    [ -n "$res" ] || fail "step $_n ($_mode): no result line from rmem migrate send" 11
    echo "$res" | grep -q '"verified":true' || fail "step $_n ($_mode): not \"verified\":true" 11
    echo "== a: migration $_n ($_mode): rounds $(echo "$res" | grep -o '"round":' | wc -l)," \
      "pages sent $(field pages_sent "$res"), zero pages left out $(field zero_pages_skipped "$res")," \
      "final pages $(field final_pages "$res"), downtime $(field downtime_ms "$res") ms," \
      "total $(field total_ms "$res") ms; dirty pages found by:" \
      "$(echo "$res" | sed -n 's/.*"dirty_log":"\([^"]*\)".*/\1/p' | grep . || echo -)"
    grep -q '^State:[[:space:]]*T' "/proc/$wpid/status" ||
      fail "step $_n ($_mode): the writer is not stopped after the migration ($(grep State "/proc/$wpid/status"))" 12
    no_bad "$_n ($_mode)" "$_log"
    _ours=$(sha256sum "$_file" | cut -d' ' -f1)
    hear "$_n ($_mode): b's hash of its file" "hash $_n "
    _theirs=${msg##* }
    echo "== a: sha256 of a's $_file $_ours, b's file $_theirs"
    [ "$_ours" = "$_theirs" ] || fail "step $_n ($_mode): the files differ: a's sha256 $_ours, b's $_theirs" 13
  }

  echo "== a: writer 1, under the preload library"
  writer_up 1 /dev/shm/ram /tmp/writer1.log preload
  migrate 1 precopy /dev/shm/ram /tmp/writer1.log --preload-socket /tmp/w.sock
  echo "$res" | grep -q '"dirty_log":"[^"]*write-protect' ||
    fail "step 1 (precopy): the dirty pages were not found by write-protect" 11
  echo "$res" | grep -q '"rounds":\[{' || fail "step 1 (precopy): no pre-copy round" 11
  w1=$wpid
  echo "== a: writer 2, without the library"
  writer_up 2 /dev/shm/ram2 /tmp/writer2.log
  migrate 2 stop-copy /dev/shm/ram2 /tmp/writer2.log
  kill -9 "$w1" "$wpid"
  echo "== a: both migrations passed"
  exit 0
fi

# --- VM b: the destination ---
# shellcheck disable=SC2016 # $1 is fail's message when fail evaluates the hook
FAIL_HOOK='tell "$TO_A" "abort: $1" 30'
# a's "abort: ..." arrives here whenever a fails.
: > /tmp/from-a
nc -l -p "$TO_B" < /dev/null > /tmp/from-a 2>/dev/null &
listener=$!
# b's tell_once succeeds at once when a has given up: aborted then says so.
tell_once() { [ -s /tmp/from-a ] || echo "$2" | nc "$peer" "$1" > /dev/null 2>&1; }
aborted() {
  [ -s /tmp/from-a ] || return 0
  FAIL_HOOK="" fail "step $1: VM a gave up: $(sed 's/^abort: //' /tmp/from-a)" 3
}

# receive N PORT FILE: `rmem migrate recv` on PORT into FILE, then the hash of FILE to a.
receive() {
  _n=$1 _port=$2 _file=$3
  rm -f "$_file"
  rmem migrate recv --file "$_file" --listen "$ip:$_port" --provider verbs --secret-file /tmp/secret \
    --json --accept-timeout 150 --timeout 120 > "/tmp/recv$_n.log" 2>&1 &
  _pid=$!
  wait_for -p "$_pid" "rmem migrate recv $_n listening on $ip:$_port" 30 port_listening "$_port" ||
    fail "step $_n: rmem migrate recv did not start" 20
  tell "$TO_A" "ready $_n $_port" || fail "step $_n: VM a never asked for migration $_n" 3
  aborted "$_n"
  echo "== b: migration $_n: waiting on $ip:$_port ($(cut -d' ' -f1 /proc/uptime) s)"
  while kill -0 "$_pid" 2>/dev/null; do
    aborted "$_n"
    sleep 0.2
  done
  _rc=0
  wait "$_pid" || _rc=$?
  cat "/tmp/recv$_n.log"
  [ "$_rc" -eq 0 ] || fail "step $_n: rmem migrate recv exited $_rc" 21
  grep '"event":"result"' "/tmp/recv$_n.log" | grep -q '"status":"received"' ||
    fail "step $_n: rmem migrate recv's result is not \"status\":\"received\"" 22
  _h=$(sha256sum "$_file" | cut -d' ' -f1)
  echo "== b: sha256 of b's $_file $_h"
  tell "$TO_A" "hash $_n $_h" || fail "step $_n: could not send the hash to VM a" 3
}

receive 1 7480 /dev/shm/moved
receive 2 7481 /dev/shm/moved2
kill "$listener" 2>/dev/null
echo "== b: both files received"
exit 0
