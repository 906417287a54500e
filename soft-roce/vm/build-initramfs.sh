#!/usr/bin/env bash
# Builds a small initramfs that boots a Debian kernel straight into a Soft-RoCE test run:
# busybox, the kernel modules rxe needs (with their dependencies, decompressed, loaded in order
# with insmod), libibverbs with the rxe provider, the `rdma` tool, and the programs to run.
#
#   soft-roce/vm/build-initramfs.sh -k <kernel version> -o <out.cpio.gz> -g <guest script> \
#       [-t] [-e KEY=VALUE]... [-m MODULE]... [-M MODULE]... [-L LIBRARY]... <program>...
#
# The guest script becomes /guest.sh, with guest-lib.sh (its shared functions) next to it as
# /guest-lib.sh. Each <program> is copied to /bin in the guest with the shared libraries `ldd`
# names; -L copies a shared library (one to LD_PRELOAD, such as rmem's librmem_preload.so) to
# /usr/lib/rmem in the guest, with its own libraries; -t adds the peers rmem is measured against
# (perftest's ib_* programs and qperf) and nbd-client. -m adds a kernel module the run needs (the build fails when the kernel lacks it),
# -M one it may use when the kernel has it (ublk_drv is always such a one: 6.12 has it, 6.1 does
# not). /init mounts the usual filesystems, prints "RMEM-GUEST-ALIVE" (run.sh watches for it),
# loads the modules, gives eth0 the address named on the kernel command line (rmem.ip=A.B.C.D/N,
# default 10.0.2.15/24 for QEMU user networking), creates rxe0 over eth0, waits (guest-lib.sh's
# wait_for) for its port and its RoCE v2 GID, raises the locked-memory limit, runs the
# guest script with the -e variables and RMEM_IP, RMEM_ROLE (rmem.role=) and RMEM_PEER
# (rmem.peer=) set, prints "RMEM-GUEST-EXIT=<status>" and powers off (reboot -f; QEMU runs
# with -no-reboot). One image serves every VM of a multi-VM run.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

kver="" out="" guest="" envs=() tools=0 extra_mods=() optional_mods=(ublk_drv) libs=()
while getopts "k:o:g:e:m:M:L:th" opt; do
  case $opt in
    k) kver=$OPTARG ;;
    o) out=$OPTARG ;;
    g) guest=$OPTARG ;;
    e) envs+=("$OPTARG") ;;
    t) tools=1 ;;
    m) extra_mods+=("$OPTARG") ;;
    M) optional_mods+=("$OPTARG") ;;
    L) libs+=("$OPTARG") ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ -n $kver && -n $out && -n $guest ]] || usage
[[ -d /lib/modules/$kver ]] || { echo "no modules for kernel $kver in /lib/modules" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,lib,lib64,usr/bin,usr/lib} "$root/etc/libibverbs.d"

# busybox: /init installs its applet links at boot.
cp /bin/busybox "$root/bin/busybox"

# Copies a file to the same path in the image, with the libraries it links.
copy_with_libs() {
  local f=$1 dest=${2:-$1}
  mkdir -p "$root/$(dirname "$dest")"
  cp -L "$f" "$root/$dest"
  # Scripts and static programs have no libraries: ldd fails and grep finds nothing.
  { ldd "$f" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
    [[ -e "$root$lib" ]] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# Verbs userspace: the rxe provider is dlopened, so ldd of a program does not name it.
provider=/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
[[ -e $provider ]] || { echo "missing $provider: install ibverbs-providers" >&2; exit 1; }
copy_with_libs "$provider"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
# glibc dlopens libgcc_s when a thread exits; without it such programs abort.
for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
  if [[ -e $d/libgcc_s.so.1 ]]; then copy_with_libs "$d/libgcc_s.so.1"; break; fi
done
copy_with_libs "$(command -v rdma)" /usr/bin/rdma
# bash, for soft-roce/rxe.sh (the real-host script, exercised in the guest).
copy_with_libs /bin/bash /bin/bash
cp "$(dirname "$0")/../rxe.sh" "$root/bin/rxe.sh"
for tool in ibv_devinfo ibv_devices; do
  t=$(command -v "$tool" || true)
  [[ -n $t ]] && copy_with_libs "$t" "/usr/bin/$tool"
done
for p in "$@"; do
  copy_with_libs "$p" "/bin/$(basename "$p")"
done
for l in "${libs[@]+"${libs[@]}"}"; do
  [[ -f $l ]] || { echo "missing library $l" >&2; exit 1; }
  copy_with_libs "$l" "/usr/lib/rmem/$(basename "$l")"
done
if ((tools)); then
  for tool in ib_read_lat ib_write_lat ib_read_bw ib_write_bw ib_atomic_lat qperf nbd-client; do
    t=$(command -v "$tool") || { echo "missing $tool: install perftest, qperf and nbd-client" >&2; exit 1; }
    copy_with_libs "$t" "/usr/bin/$tool"
  done
fi

# Kernel modules, in load order, decompressed (busybox insmod reads plain ELF only; 6.12's are
# .ko.xz). A required module the kernel lacks fails the build; an optional one is left out.
mods=(crc32_generic virtio_pci virtio_net ib_uverbs rdma_rxe rdma_ucm ib_umad nbd
      "${extra_mods[@]+"${extra_mods[@]}"}")
for m in "${optional_mods[@]}"; do
  modinfo -k "$kver" "$m" > /dev/null 2>&1 && mods+=("$m")
done
: > "$root/modules.list"
for m in "${mods[@]}"; do
  deps=$(modprobe -S "$kver" --show-depends "$m" 2>&1) ||
    { echo "kernel $kver lacks module $m: $deps" >&2; exit 1; }
  printf '%s\n' "$deps" | awk '$1 == "insmod" {print $2}' |
    while read -r ko; do
      name=$(basename "$ko"); name=${name%.xz}; name=${name%.zst}
      grep -qx "/lib/modules/$name" "$root/modules.list" && continue
      mkdir -p "$root/lib/modules"
      case $ko in
        *.xz) xz -dc "$ko" > "$root/lib/modules/$name" ;;
        *.zst) zstd -qdc "$ko" > "$root/lib/modules/$name" ;;
        *) cp "$ko" "$root/lib/modules/$name" ;;
      esac
      echo "/lib/modules/$name" >> "$root/modules.list"
    done
done

cp "$guest" "$root/guest.sh"
# The guest scripts' shared functions, next to the script (they source it from their directory);
# /init uses its wait_for.
cp "$(dirname "$0")/guest-lib.sh" "$root/guest-lib.sh"
: > "$root/guest.env"
for kv in "${envs[@]+"${envs[@]}"}"; do
  printf 'export %q\n' "$kv" >> "$root/guest.env"
done

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "rmem-vm: kernel $(uname -r), $(nproc) cpus"
# run.sh watches for this line: the guest is alive (and the accelerator works).
echo "RMEM-GUEST-ALIVE"
. /guest-lib.sh

# rmem.ip=, rmem.role= and rmem.peer= on the kernel command line configure this VM.
RMEM_IP=10.0.2.15/24 RMEM_ROLE=single RMEM_PEER=
for arg in $(cat /proc/cmdline); do
  case $arg in
    rmem.ip=*) RMEM_IP=${arg#rmem.ip=} ;;
    rmem.role=*) RMEM_ROLE=${arg#rmem.role=} ;;
    rmem.peer=*) RMEM_PEER=${arg#rmem.peer=} ;;
  esac
done
export RMEM_IP RMEM_ROLE RMEM_PEER
ip4=${RMEM_IP%/*}
# The RoCE v2 GID of an IPv4 address is ::ffff:a.b.c.d, as sysfs prints it.
gid=$(echo "$ip4" | awk -F. '{printf "0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x", $1, $2, $3, $4}')

port_active() { grep -qi active /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null; }
has_gid() { grep -qx "$gid" /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null; }
setup() {
  while read -r ko; do
    insmod "$ko" || { echo "rmem-vm: insmod $ko failed"; return 1; }
  done < /modules.list
  wait_for "eth0 (/sys/class/net/eth0)" 10 test -e /sys/class/net/eth0 || return 1
  ip link set lo up && ip link set eth0 up && ip addr add "$RMEM_IP" dev eth0 || return 1
  rdma link add rxe0 type rxe netdev eth0 || { echo "rmem-vm: rdma link add failed"; return 1; }
  wait_for "rxe0 port 1 active" 20 port_active || return 1
  wait_for "the RoCE v2 GID of $ip4 on rxe0" 20 has_gid || return 1
  echo "rmem-vm: rxe0 ready at $(cut -d' ' -f1 /proc/uptime) s"
}

if setup; then
  ulimit -l unlimited
  . /guest.env
  sh /guest.sh
  rc=$?
else
  rc=90
fi
echo "RMEM-GUEST-EXIT=$rc"
sync
reboot -f
INIT
chmod +x "$root/init" "$root/guest.sh"

mkdir -p "$(dirname "$out")"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
echo "initramfs: $out ($(du -h "$out" | cut -f1), $(wc -l < "$root/modules.list") modules)"
