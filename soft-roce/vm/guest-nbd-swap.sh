#!/bin/sh
# Runs inside the VM (see build-initramfs.sh): a donor with an NBD export, attached by the
# kernel's stock NBD client, used as the only swap device; `rmem memcheck` then fills more
# checksummed memory than its cgroup may keep resident, so pages go out to the export and come
# back, and every page is verified. Fails when nothing was swapped or any page differs.
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
export RMEM_SECRET="vm nbd swap test secret"
rmem server --listen 127.0.0.1:7470 --size 640M --slab-size 16M --export swap0=512M \
  --nbd-listen 127.0.0.1:10809 --no-admin --no-pressure --hugepages never > /tmp/donor.log 2>&1 &
donor=$!
wait_for -p $donor "the donor's NBD export swap0 on 127.0.0.1:10809" 60 grep -q '^NBD exports' /tmp/donor.log &&
  nbd-client -N swap0 127.0.0.1 10809 /dev/nbd0 > /tmp/nbd.log 2>&1 || { cat /tmp/nbd.log /tmp/donor.log; exit 81; }
echo "== nbd-client attached swap0 as /dev/nbd0 ($(cat /sys/block/nbd0/size) sectors)"
mkswap /dev/nbd0 > /dev/null && swapon /dev/nbd0 || exit 82
cat /proc/swaps

work_cgroup 96M
mark
status=0
# Sequential, then random order (every fault a separate 4 KiB read: slow under emulation, so
# smaller). The workload runs in the limited cgroup; the donor stays outside.
for args in "--size 256M --passes 2" "--size 160M --passes 1 --random"; do
  # shellcheck disable=SC2086 # $args holds several arguments
  limited rmem memcheck $args || status=84
done
swapped 10000 10000 || { echo "too little went through swap"; status=85; }
swapoff /dev/nbd0 && nbd-client -d /dev/nbd0 > /dev/null 2>&1
kill $donor
exit $status
