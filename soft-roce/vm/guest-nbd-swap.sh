#!/bin/sh
# Runs inside the VM (see build-initramfs.sh): a donor with an NBD export, attached by the
# kernel's stock NBD client, used as the only swap device; `rmem memcheck` then fills more
# checksummed memory than its cgroup may keep resident, so pages go out to the export and come
# back, and every page is verified. Fails when nothing was swapped or any page differs.
export RMEM_SECRET="vm nbd swap test secret"
rmem server --listen 127.0.0.1:7470 --size 640M --slab-size 16M --export swap0=512M \
  --nbd-listen 127.0.0.1:10809 --no-admin --no-pressure --hugepages never > /tmp/donor.log 2>&1 &
donor=$!
n=0
until nbd-client -N swap0 127.0.0.1 10809 /dev/nbd0 > /tmp/nbd.log 2>&1; do
  n=$((n + 1)); [ $n -gt 50 ] && { cat /tmp/nbd.log /tmp/donor.log; exit 81; }
  sleep 0.2
done
echo "== nbd-client attached swap0 as /dev/nbd0 ($(cat /sys/block/nbd0/size) sectors)"
mkswap /dev/nbd0 > /dev/null && swapon /dev/nbd0 || exit 82
cat /proc/swaps

mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || exit 83
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/work
echo 96M > /sys/fs/cgroup/work/memory.max
out_before=$(awk '/^pswpout/ {print $2}' /proc/vmstat)
in_before=$(awk '/^pswpin/ {print $2}' /proc/vmstat)
status=0
# Sequential, then random order (every fault a separate 4 KiB read: slow under emulation, so
# smaller). A subshell moved into the limited cgroup runs the workload; the donor stays outside.
for args in "--size 256M --passes 2" "--size 160M --passes 1 --random"; do
  sh -c "echo \$\$ > /sys/fs/cgroup/work/cgroup.procs && exec rmem memcheck $args" || status=84
done
out=$(( $(awk '/^pswpout/ {print $2}' /proc/vmstat) - out_before ))
in=$(( $(awk '/^pswpin/ {print $2}' /proc/vmstat) - in_before ))
echo "== pages swapped out: $out, swapped in: $in"
[ "$out" -gt 10000 ] && [ "$in" -gt 10000 ] || { echo "too little went through swap"; status=85; }
swapoff /dev/nbd0 && nbd-client -d /dev/nbd0 > /dev/null 2>&1
kill $donor
exit $status
