#!/bin/sh
# Runs inside the Soft-RoCE VM (see build-initramfs.sh): rmem perf next to perftest and qperf on
# rxe0, server and client in this guest, each measurement run back to back for all three so they
# share the guest's state. Output between "=== BEGIN <name>" and "=== END <name> rc=<status>"
# markers; benches/compare-verbs.sh turns it into one table.
# $verbs and $pt hold several arguments each; rmem_client runs through section:
# shellcheck disable=SC2086,SC2317
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
ip=${RMEM_IP%/*}
verbs="--provider verbs --device rxe0 --local-ip $ip"
pt="-d rxe0 -x 1"      # perftest: device, and GID index 1 = the RoCE v2 GID of $ip
lat_n=${RMEM_LAT_ITERS:-3000}
bw_n=${RMEM_BW_ITERS:-3000}
status=0

# perftest NAME PROGRAM ARGS...: a perftest pair; the server is the same command without the peer
# address, and the client starts once the server listens on perftest's port (18515).
perftest() {
  name=$1 prog=$2
  shift 2
  $prog $pt "$@" > "/tmp/$name.srv" 2>&1 &
  spid=$!
  if wait_for -p $spid "$prog server listening on port 18515" 30 port_listening 18515; then
    section "$name" "$prog" $pt "$@" "$ip"
  else
    echo "=== BEGIN $name"; cat "/tmp/$name.srv"; echo "=== END $name rc=1"; status=1
    kill $spid 2>/dev/null
  fi
  wait $spid
}

# perftest converts TSC ticks with this figure; rmem reports the rate it measured (tsc_mhz).
echo "=== BEGIN cpu_mhz"
grep -m1 'cpu MHz' /proc/cpuinfo
echo "=== END cpu_mhz rc=0"
qperf > /tmp/qperf.srv 2>&1 &
qpid=$!
rmem perf server $verbs --listen "$ip:18600" --busy-poll > /tmp/rmem.srv 2>&1 &
rpid=$!
wait_for -p $qpid "qperf server listening on port 19765" 30 port_listening 19765 || status=1
wait_for -p $rpid "rmem perf server listening on $ip:18600" 30 grep -q listening /tmp/rmem.srv || status=1
rmem_client() { rmem perf client "$ip:18600" $verbs --busy-poll --json "$@"; }

for size in 8 4096; do
  perftest "perftest_read_lat_$size" ib_read_lat -s $size -n $lat_n
  section "rmem_read_lat_$size" rmem_client --op read -s $size -n $lat_n
  section "qperf_read_lat_$size" qperf -cm1 "$ip" -t 2 -m $size rc_rdma_read_lat
done
perftest perftest_write_lat_8 ib_write_lat -s 8 -n $lat_n
section rmem_write_lat_8 rmem_client --op write -s 8 -n $lat_n
perftest perftest_atomic_lat ib_atomic_lat -n $lat_n
section rmem_atomic_lat rmem_client --op atomic -n $lat_n
for op in write read; do
  perftest "perftest_${op}_bw" "ib_${op}_bw" -s 65536 -n $bw_n --report_gbits
  section "rmem_${op}_bw" rmem_client --op $op --bw -s 64K -n $bw_n --tx-depth 128
done
section qperf_write_bw qperf -cm1 "$ip" -t 2 -m 64K rc_rdma_write_bw
section qperf_read_bw qperf -cm1 "$ip" -t 2 -m 64K rc_rdma_read_bw

kill $rpid $qpid 2>/dev/null
exit $status
