#!/bin/sh
# Runs inside each VM of run.sh's two-vm mode: VM a (RMEM_ROLE=server) lends a buffer with
# `rmem perf server` and answers perftest; VM b (client) measures and verifies across the socket
# network between the two kernels, then tells a it is done. b's status is the run's.
ip=${RMEM_IP%/*}
peer=$RMEM_PEER
verbs="--provider verbs --device rxe0 --local-ip $ip"
pt="-d rxe0 -x 1"

retry() { # tries a command for up to a minute (the peer may still be booting)
  n=0
  until "$@"; do
    n=$((n + 1)); [ $n -ge 120 ] && return 1
    sleep 0.5
  done
}

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
section() {
  name=$1; shift
  echo "=== BEGIN $name"
  "$@"
  rc=$?
  echo "=== END $name rc=$rc"
  [ "$rc" -eq 0 ] || status=1
}
client() { rmem perf client "$peer:18600" $verbs --verify --json "$@"; }

echo "== waiting for the server at $peer"
retry rmem perf client "$peer:18600" $verbs -n 10 --warmup 0 > /dev/null 2>&1 || { echo "server unreachable"; exit 5; }
section rmem_read_lat client --op read -s 8 -s 4K -n 1000 --busy-poll
section rmem_write_bw client --op write --bw -s 4K -s 64K -n 500 --tx-depth 128
section rmem_atomic_lat client --op atomic -n 1000 --busy-poll
section perftest_read_lat retry ib_read_lat $pt -s 4096 -n 1000 "$peer"
section perftest_write_bw retry ib_write_bw $pt -s 65536 -n 500 --report_gbits "$peer"
retry sh -c "echo done | nc $peer 18601"
exit $status
