#!/bin/sh
# Runs inside each VM of run.sh's two-vm mode: VM a (RMEM_ROLE=server) lends a buffer with
# `rmem perf server` and answers perftest; VM b (client) measures and verifies across the socket
# network between the two kernels, then tells a it is done. b's status is the run's.
# $verbs and $pt hold several arguments each; b's functions run through section and wait_for:
# shellcheck disable=SC2086,SC2317
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
ip=${RMEM_IP%/*}
peer=$RMEM_PEER
verbs="--provider verbs --device rxe0 --local-ip $ip"
pt="-d rxe0 -x 1"
# VM b's: the peer may still be booting, or between two perftest servers, so each of b's steps
# polls it for up to a minute.
client() { rmem perf client "$peer:18600" $verbs --verify --json "$@"; }
server_answers() { rmem perf client "$peer:18600" $verbs -n 10 --warmup 0 > /dev/null 2>&1; }

if [ "$RMEM_ROLE" = server ]; then
  rmem perf server $verbs --listen "$ip:18600" > /tmp/rmem.srv 2>&1 &
  rpid=$!
  ib_read_lat $pt -s 4096 -n 1000 > /tmp/pt1.log 2>&1
  ib_write_bw $pt -s 65536 -n 500 --report_gbits > /tmp/pt2.log 2>&1
  echo "== waiting for the client to finish"
  nc -l -p 18601
  kill $rpid
  echo "== server log"; cat /tmp/rmem.srv
  exit 0
fi

status=0
echo "== waiting for the server at $peer"
wait_for -i 0.5 "rmem perf server at $peer:18600" 60 server_answers || exit 5
section rmem_read_lat client --op read -s 8 -s 4K -n 1000 --busy-poll
section rmem_write_bw client --op write --bw -s 4K -s 64K -n 500 --tx-depth 128
section rmem_atomic_lat client --op atomic -n 1000 --busy-poll
section perftest_read_lat wait_for -i 0.5 "ib_read_lat against $peer" 60 ib_read_lat $pt -s 4096 -n 1000 "$peer"
section perftest_write_bw wait_for -i 0.5 "ib_write_bw against $peer" 60 ib_write_bw $pt -s 65536 -n 500 --report_gbits "$peer"
wait_for -i 0.5 "VM a's port 18601 (to tell it we are done)" 60 sh -c "echo done | nc $peer 18601"
exit $status
