#!/usr/bin/env bash
# Boots Debian's stock kernel under QEMU with Soft-RoCE (rxe) and runs rmem's verbs tests in it,
# on hosts whose own kernel has no RDMA.
#
#   soft-roce/vm/run.sh [conformance] [test args...]   the verbs conformance suite on rxe0 (default)
#   soft-roce/vm/run.sh perf                            rmem perf next to perftest and qperf, one VM
#   soft-roce/vm/run.sh two-vm                          two VMs joined by a QEMU socket network (UDP), one
#                                                       rxe each: rmem perf and data checks across a
#                                                       real wire between two kernels, next to perftest
#   soft-roce/vm/run.sh nbd-swap                        the donor's NBD export as swap through the guest
#                                                       kernel's stock nbd client: mkswap, swapon,
#                                                       checksummed pages pushed out and read back
#   soft-roce/vm/run.sh swap                            `rmem swap` as the guest's swap over tcp, over
#                                                       verbs, and with 2 replicas as a donor dies
#   soft-roce/vm/run.sh swap-2vm [size=NM] [min_free_kbytes=N]
#                                                       rmem swap across two VMs: a lends (donors on tcp
#                                                       and verbs), b borrows with little RAM (384M)
#                                                       and no memory cgroup, memcheck of about twice
#                                                       its RAM over tcp, verbs, and 2 replicas as a
#                                                       donor dies (see guest-swap-2vm.sh)
#   soft-roce/vm/run.sh swap-compare [seq=S random=S limit=S]
#                                                       a benchmark, not a test: swap's workload with
#                                                       rmem swap (tcp, verbs), zram and a swap file on
#                                                       ext4 on a virtio disk, one table (arguments
#                                                       shrink the workload for a quick check)
#   soft-roce/vm/run.sh fio-compare [runtime=S]         a benchmark, not a test: fio (4 KiB random at
#                                                       iodepth 16, 1 MiB sequential) on the rmem device
#                                                       (tcp, verbs), a ublk null target (rublk, 6.12
#                                                       only), the kernel NBD client to nbdkit's memory
#                                                       plugin and the virtio disk, one table; run it with
#                                                       RMEM_VM_KERNEL=backports for ublk (see
#                                                       guest-fio-compare.sh)
#   RMEM_VM_KERNEL=backports soft-roce/vm/run.sh migrate-2vm
#                                                       `rmem migrate` over verbs between two VMs, no
#                                                       QEMU inside: a moves a running writer's 32 MiB
#                                                       tmpfs file to b, pre-copy with exact dirty
#                                                       pages (preload library) then stop-copy; each
#                                                       verified, no bad page, equal sha256 on both
#                                                       sides (see guest-migrate-2vm.sh); needs a
#                                                       6.7+ guest kernel and refuses older ones
#   soft-roce/vm/run.sh script FILE [args...]           any guest script (args in $RMEM_TEST_ARGS)
#
# It installs what it needs with apt-get (QEMU, a Debian kernel with rdma_rxe, busybox,
# rdma-core, perftest, qperf), builds rmem (and the conformance binary with --features verbs-hw),
# builds an initramfs (build-initramfs.sh), boots, prints the guests' consoles and exits with the
# guest's status (the client's in two-vm mode); 124 when a VM times out; 125 when a guest kernel
# panicked (two-VM modes). A VM that shows no sign
# of life (its init's first line on the console) within RMEM_VM_BOOT_TIMEOUT seconds is killed
# and booted again, once, and the run says so; a second silent boot fails the run (status 1).
#
# Environment: RMEM_VM_ACCEL (auto, tcg or kvm; auto tries KVM once per host and kernel and falls
# back to TCG when the guest shows no sign of life), RMEM_VM_KERNEL (which guest kernel: unset or
# "default" is the newest installed 6.1 kernel, bookworm's, even when a newer one is installed;
# "backports" is bookworm-backports' 6.12 kernel, which has ublk_drv: run.sh adds that suite to
# apt's sources and installs the versioned linux-image-6.12...-amd64 package when missing; or an
# exact version from /lib/modules), RMEM_VM_TIMEOUT (seconds, default 1500; swap-compare 5400, fio-compare 2400,
# swap-2vm 2700, migrate-2vm 600), RMEM_VM_BOOT_TIMEOUT (seconds to a VM's first sign of life, default 120; a
# boot takes 3-6 s), RMEM_VM_SILENT_BOOTS (a test hook: the boots it lists by number get no
# kernel and stay silent; see check-boot-watch.sh), RMEM_VM_LOG (console log file; two-vm,
# swap-2vm and migrate-2vm add .a and .b), RMEM_VM_GUEST (two-vm: another guest script), RMEM_VM_BORROWER_MEM
# (swap-2vm: VM b's RAM, default 384M), RMEM_VM_DISK_DIR (swap-compare, fio-compare: where the virtio disk's
# file lives, default /var/tmp), CARGO_TARGET_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

mode=conformance
case "${1:-}" in
  conformance|perf|two-vm|swap-2vm|migrate-2vm|nbd-swap|swap|swap-compare|fio-compare) mode=$1; shift ;;
  script) mode=script; shift; guest_script=$(realpath "${1:?script needs a FILE}"); shift ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
# swap-compare runs the swap workload four times and swap-2vm swaps twice a VM's RAM three times:
# under TCG they take far longer than the tests.
case $mode in
  swap-compare) timeout_s=${RMEM_VM_TIMEOUT:-5400} ;;
  # Five devices, five fio jobs each: about 10 minutes under TCG.
  fio-compare) timeout_s=${RMEM_VM_TIMEOUT:-2400} ;;
  # Three memchecks of twice a 384 MiB guest's RAM: 1,000-1,500 s under TCG on a 2-core host.
  swap-2vm) timeout_s=${RMEM_VM_TIMEOUT:-2700} ;;
  # Two boots and two migrations of 32 MiB: about 2 minutes under TCG.
  migrate-2vm) timeout_s=${RMEM_VM_TIMEOUT:-600} ;;
  *) timeout_s=${RMEM_VM_TIMEOUT:-1500} ;;
esac

pkgs=(qemu-system-x86 linux-image-amd64 busybox-static kmod cpio xz-utils rdma-core
      ibverbs-providers ibverbs-utils iproute2 perftest qperf nbd-client)
# migrate-2vm builds migrate/guest's writer (migrate/guest/build.sh).
[[ $mode == migrate-2vm ]] && pkgs+=(gcc libc6-dev)
[[ $mode == fio-compare ]] && pkgs+=(fio nbdkit)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$repo/scripts/deps.sh"

# has_rxe VERSION: the kernel and its rdma_rxe module are installed.
has_rxe() { [[ -e /boot/vmlinuz-$1 ]] && find "/lib/modules/$1" -name 'rdma_rxe.ko*' 2>/dev/null | grep -q .; }
# newest_kernel GLOB: the newest installed kernel version matching GLOB that has rdma_rxe.
newest_kernel() {
  local d v
  for d in $(printf '%s\n' /lib/modules/*/ | sort -V -r); do
    v=$(basename "$d")
    # shellcheck disable=SC2053 # GLOB is a pattern on purpose
    [[ $v == $1 ]] && has_rxe "$v" && { echo "$v"; return 0; }
  done
  return 1
}
# backports_kernel: the kernel of bookworm-backports' linux-image-amd64, installed if missing.
# Only the versioned package is installed (never the linux-image-amd64 meta-package), so the
# default kernel below does not move.
backports_kernel() {
  local v sudo="" para uris keyring pkg
  if v=$(newest_kernel '6.1[2-9].*-amd64') || v=$(newest_kernel '[7-9].*-amd64'); then echo "$v"; return 0; fi
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # The same mirror and keyring as the deb822 paragraph that lists the bookworm suite itself.
    para=$(awk 'BEGIN { RS = "" } /(^|\n)Suites:([^\n]*[ \t])?bookworm([ \t\n]|$)/ { print; exit }' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    uris=$(printf '%s\n' "$para" | sed -n 's/^URIs: *//p' | head -1)
    keyring=$(printf '%s\n' "$para" | sed -n 's/^Signed-By: *//p' | head -1)
    echo "== adding bookworm-backports (${uris:-http://deb.debian.org/debian}) to apt's sources" >&2
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
      "${uris:-http://deb.debian.org/debian}" "${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}" |
      $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources > /dev/null
  fi
  $sudo apt-get update -qq >&2
  # The meta-package's dependency names the versioned image package (linux-image-6.12...-amd64).
  pkg=$(apt-cache show 'linux-image-amd64/bookworm-backports' 2>/dev/null | sed -n 's/^Depends: *//p' |
    head -1 | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*-amd64' | head -1)
  [[ -n $pkg ]] || { echo "run.sh: bookworm-backports offers no linux-image-amd64" >&2; return 1; }
  echo "== installing $pkg from bookworm-backports" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg" >&2
  v=${pkg#linux-image-}
  has_rxe "$v" || { echo "run.sh: $pkg has no rdma_rxe" >&2; return 1; }
  echo "$v"
}

case ${RMEM_VM_KERNEL:-} in
  # The default stays on bookworm's 6.1 series whatever else is installed: figures and
  # behaviour stay comparable from run to run.
  ''|default) kver=$(newest_kernel '6.1.*-amd64') ||
    { echo "run.sh: no 6.1 kernel with rdma_rxe installed (apt-get install linux-image-amd64)" >&2; exit 1; } ;;
  backports) kver=$(backports_kernel) || exit 1 ;;
  *) kver=$RMEM_VM_KERNEL ;;
esac
has_rxe "$kver" || { echo "run.sh: kernel $kver is not installed with rdma_rxe" >&2; exit 1; }
# migrate-2vm's exact dirty pages need userfaultfd's async write-protect and PAGEMAP_SCAN (6.7).
if [[ $mode == migrate-2vm ]] && ! printf '6.7\n%s\n' "${kver%%[-+]*}" | sort -V -C; then
  echo "run.sh: migrate-2vm needs a guest kernel 6.7 or newer (userfaultfd WP_ASYNC, PAGEMAP_SCAN);" \
    "kernel $kver is older: run it with RMEM_VM_KERNEL=backports" >&2
  exit 2
fi

work=$(mktemp -d)
pids=() cleanup_files=()
# shellcheck disable=SC2317 # the EXIT trap calls it
cleanup() {
  for p in "${pids[@]+"${pids[@]}"}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work" "${cleanup_files[@]+"${cleanup_files[@]}"}"
}
trap cleanup EXIT

cd "$repo"
programs=() initramfs_libs=()
if [[ $mode == conformance ]]; then
  echo "== building the conformance binary (release, --features verbs-hw)"
  json=$(cargo test --release --locked -p rmem-transport --features verbs-hw --test conformance_verbs \
    --no-run --message-format=json)
  bin=$(printf '%s\n' "$json" | grep '"name":"conformance_verbs"' | grep -o '"executable":"[^"]*"' |
    tail -1 | cut -d'"' -f4)
  [[ -x $bin ]] || { echo "run.sh: conformance binary not found" >&2; exit 1; }
  cp "$bin" "$work/conformance_verbs"
  programs+=("$work/conformance_verbs")
fi
echo "== building rmem (release)"
cargo build --release --locked --bin rmem
programs+=("${CARGO_TARGET_DIR:-$repo/target}/release/rmem")
if [[ $mode == migrate-2vm ]]; then
  echo "== building rmem's preload library (release) and migrate/guest's writer"
  cargo build --release --locked -p rmem-preload --lib
  initramfs_libs=(-L "${CARGO_TARGET_DIR:-$repo/target}/release/librmem_preload.so")
  # The writer built dynamically, so LD_PRELOAD works on it.
  migrate/guest/build.sh "$work/guest" > /dev/null
  programs+=("$work/guest/writer")
fi

case $mode in
  conformance) guest_script=$here/guest-conformance.sh ;;
  perf) guest_script=$here/guest-perf.sh ;;
  nbd-swap) guest_script=$here/guest-nbd-swap.sh ;;
  swap) guest_script=$here/guest-swap.sh ;;
  swap-compare) guest_script=$here/guest-swap-compare.sh ;;
  fio-compare) guest_script=$here/guest-fio-compare.sh ;;
  two-vm) guest_script=${RMEM_VM_GUEST:-$here/guest-two-vm.sh} ;;
  swap-2vm) guest_script=$here/guest-swap-2vm.sh ;;
  migrate-2vm) guest_script=$here/guest-migrate-2vm.sh ;;
esac
initramfs_args=("${initramfs_libs[@]+"${initramfs_libs[@]}"}") vm_args=()
if [[ $mode == swap-compare ]]; then
  # zram, and ext4 on a virtio disk for a swap file (crc32c_generic: ext4's checksums).
  initramfs_args+=(-m zram -m virtio_blk -m crc32c_generic -m ext4)
  programs+=("$(command -v mkfs.ext4)")
fi
if [[ $mode == fio-compare ]]; then
  initramfs_args+=(-m virtio_blk -L /usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-memory-plugin.so)
  programs+=("$(command -v fio)" "$(command -v nbdkit)")
  # rublk (crates.io) serves the ublk null target, the ublk path's floor: installed once into
  # RMEM_RUBLK_ROOT (default /var/tmp/rmem-rublk), left out where it does not build.
  rublk_root=${RMEM_RUBLK_ROOT:-/var/tmp/rmem-rublk}
  if [[ ! -x $rublk_root/bin/rublk ]]; then
    echo "== installing rublk into $rublk_root (cargo install)"
    cargo install --quiet --root "$rublk_root" rublk ||
      echo "== NOTE: rublk did not build: the table has no ublk null row"
  fi
  [[ -x $rublk_root/bin/rublk ]] && programs+=("$rublk_root/bin/rublk")
fi
if [[ $mode == swap-compare || $mode == fio-compare ]]; then
  # The disk is a sparse raw file opened with cache=none (O_DIRECT): the guest's swap I/O then
  # reaches the host's disk instead of being served from the host's page cache, which would make
  # the "disk" a second RAM. Files on tmpfs (a common /tmp) cannot be opened with O_DIRECT, so
  # the file lives in RMEM_VM_DISK_DIR (default /var/tmp), probed first; where O_DIRECT fails the
  # run falls back to cache=writeback and says that the disk's figures include the host's cache.
  disk_dir=${RMEM_VM_DISK_DIR:-/var/tmp}
  disk=$(mktemp "$disk_dir/rmem-vm-disk.XXXXXX")
  cleanup_files+=("$disk")
  truncate -s 512M "$disk"
  if dd if=/dev/zero of="$disk" bs=4096 count=1 oflag=direct conv=notrunc status=none 2>/dev/null; then
    cache=none
  else
    cache=writeback
    echo "== NOTE: $disk_dir has no O_DIRECT: the virtio disk runs with cache=writeback (host page cache)"
  fi
  vm_args+=(-drive "file=$disk,format=raw,if=virtio,cache=$cache,aio=threads")
  initramfs_args+=(-e "DISK_CACHE=$cache")
fi
echo "== building the initramfs (kernel $kver)"
"$here/build-initramfs.sh" -k "$kver" -o "$work/initramfs.cpio.gz" -g "$guest_script" -t \
  -e "RMEM_TEST_ARGS=$*" -e "RUST_BACKTRACE=1" "${initramfs_args[@]+"${initramfs_args[@]}"}" "${programs[@]}"

# --- accelerator: KVM when it works on this host, TCG otherwise ---
qemu_ver=$(qemu-system-x86_64 --version | head -1 | grep -o '[0-9][0-9.]*' | head -1)
verdict_file=/var/tmp/rmem-vm-accel-$qemu_ver-$kver
accel=${RMEM_VM_ACCEL:-auto}
if [[ $accel == auto ]]; then
  if [[ -s $verdict_file ]]; then accel=$(cat "$verdict_file")
  elif [[ -r /dev/kvm && -w /dev/kvm ]]; then accel=try-kvm
  else accel=tcg; fi
fi

accel_args() {
  case $1 in
    kvm|try-kvm) echo "-accel kvm -cpu host" ;;
    *) echo "-accel tcg,thread=multi -cpu max" ;;
  esac
}

# A guest shows its first sign of life, the RMEM-GUEST-ALIVE line of the image's /init, about 3-6 s
# after QEMU starts under TCG. One that says nothing for this long (seen once: QEMU busy for 38
# minutes with nothing after the BIOS, while the next boot of the same image ran at once) is
# killed and booted again, once.
boot_timeout=${RMEM_VM_BOOT_TIMEOUT:-120}
boots=0

# start_vm NAME LOG SMP MEM APPEND NETDEV... : boots one VM in the background; sets $vm_pid.
start_vm() {
  local name=$1 log=$2 smp=$3 mem=$4 append=$5; shift 5
  local kernel=(-kernel "/boot/vmlinuz-$kver" -initrd "$work/initramfs.cpio.gz"
                -append "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=4 $append")
  boots=$((boots + 1))
  # Test hook (soft-roce/vm/check-boot-watch.sh): the boots RMEM_VM_SILENT_BOOTS lists by number
  # (in start order, retries included: "1", "2,3") get no kernel, so the BIOS finds nothing to
  # boot and the guest never says a word.
  if [[ ,${RMEM_VM_SILENT_BOOTS:-}, == *,$boots,* ]]; then
    echo "== test hook: boot $boots ($name) gets no kernel and stays silent"
    kernel=()
  fi
  # shellcheck disable=SC2046 # accel_args is several words on purpose
  timeout "$timeout_s" qemu-system-x86_64 $(accel_args "$accel") -smp "$smp" -m "$mem" \
    -nographic -no-reboot -name "$name" "${kernel[@]+"${kernel[@]}"}" "$@" \
    < /dev/null > "$log" 2>&1 &
  vm_pid=$!
  pids+=("$vm_pid")
}

# stop_vm PID: stops a VM (its timeout wrapper passes the signal on to QEMU) and reaps it.
stop_vm() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# alive LOG PID SECONDS: waits for the guest's first words on its console (the LOG file QEMU's
# serial console goes to): 0 once they are there, 1 when SECONDS pass without them, 2 when QEMU
# exits first.
alive() {
  local end=$((SECONDS + $3))
  while ((SECONDS < end)); do
    grep -q RMEM-GUEST-ALIVE "$1" 2>/dev/null && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      grep -q RMEM-GUEST-ALIVE "$1" 2>/dev/null && return 0
      return 2
    fi
    sleep 0.1
  done
  return 1
}

# console_tail LOG: what a console said last (printable characters, last non-empty line).
console_tail() {
  printf '%s bytes, last line "%s"' "$(wc -c < "$1")" \
    "$(tr -d '\r' < "$1" | tr -cd '[:print:]\n' | grep . | tail -1 | cut -c1-100)"
}

# boot NAME LOG SMP MEM APPEND NETDEV...: start_vm, with the KVM trial and fallback, then waits
# for the guest's first words. A guest silent for boot_timeout seconds is killed and booted once
# more; a second silent boot ends the run (status 1). A QEMU that exits first is left to finish.
boot() {
  local name=$1 log=$2 rc=0
  start_vm "$@"
  if [[ $accel == try-kvm ]]; then
    if alive "$log" "$vm_pid" 30; then
      accel=kvm
    else
      echo "== KVM gave no sign of life within 30 s; using TCG from now on (verdict kept in $verdict_file)"
      stop_vm "$vm_pid"
      accel=tcg
      start_vm "$@"
    fi
    echo "$accel" > "$verdict_file" 2>/dev/null || true
  fi
  alive "$log" "$vm_pid" "$boot_timeout" || rc=$?
  ((rc == 1)) || return 0
  echo "== $name: no sign of life within $boot_timeout s (console: $(console_tail "$log")); killed it, booting it again"
  stop_vm "$vm_pid"
  start_vm "$@"
  rc=0
  alive "$log" "$vm_pid" "$boot_timeout" || rc=$?
  ((rc == 1)) || return 0
  local said
  said=$(console_tail "$log")
  stop_vm "$vm_pid"
  echo "run.sh: $name gave no sign of life within $boot_timeout s twice in a row (console: $said); giving up" >&2
  exit 1
}

guest_status() { tr -d '\r' < "$1" | sed -n 's/^RMEM-GUEST-EXIT=\([0-9]*\)$/\1/p' | tail -1; }

# finish LOG PID LABEL: waits for the VM, prints its console, sets $st to the guest's status.
finish() {
  local qrc=0
  wait "$2" || qrc=$?
  echo "== console: $3"
  tr -d '\r' < "$1"
  st=$(guest_status "$1")
  if [[ -z $st ]]; then
    local why=""
    grep -q 'Kernel panic' "$1" && why=": its kernel panicked ($(tr -d '\r' < "$1" | grep -m1 -E 'BUG|Oops|panic' | cut -c1-100))"
    echo "run.sh: $3 did not finish (qemu exit $qrc)$why" >&2
    if [[ $qrc -eq 124 ]]; then st=124; else st=1; fi
  fi
}

log=${RMEM_VM_LOG:-$work/console.log}
if [[ $mode == two-vm || $mode == swap-2vm || $mode == migrate-2vm ]]; then
  mem_a=1G mem_b=1G
  # swap-2vm: a holds three 1G donors at once; b is the small borrower.
  [[ $mode == swap-2vm ]] && mem_a=3G mem_b=${RMEM_VM_BORROWER_MEM:-384M}
  # Two UDP ports on loopback: the socket backend's UDP mode needs no connection, so the VMs
  # can start in any order.
  read -r pa pb < <(python3 -c 'import socket
s = [socket.socket(type=socket.SOCK_DGRAM) for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))' 2>/dev/null || echo "18701 18702")
  echo "== booting two VMs ($accel, 1 vCPU each, a $mem_a, b $mem_b; socket network over UDP 127.0.0.1:$pa <-> $pb;" \
    "each has ${boot_timeout} s to a sign of life)"
  start=$SECONDS
  boot rmem-a "$log.a" 1 "$mem_a" "rmem.ip=10.0.3.1/24 rmem.role=server rmem.peer=10.0.3.2" \
    -netdev "socket,id=n0,udp=127.0.0.1:$pb,localaddr=127.0.0.1:$pa" \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:00:03:01
  pid_a=$vm_pid
  boot rmem-b "$log.b" 1 "$mem_b" "rmem.ip=10.0.3.2/24 rmem.role=client rmem.peer=10.0.3.1" \
    -netdev "socket,id=n0,udp=127.0.0.1:$pa,localaddr=127.0.0.1:$pb" \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:00:03:02
  pid_b=$vm_pid
  finish "$log.b" "$pid_b" "VM b (client)"; st_b=$st
  # b tells a when it is done, even when it fails; a VM a left waiting (b crashed) is stopped.
  for _ in $(seq 300); do kill -0 "$pid_a" 2>/dev/null || break; sleep 0.2; done
  kill "$pid_a" 2>/dev/null || true
  finish "$log.a" "$pid_a" "VM a (server)"; st_a=$st
  echo "== guest exit status: client $st_b, server $st_a; $((SECONDS - start)) s from boot to power-off"
  # A guest kernel that panicked (rxe has crashed under load on 6.12) fails the run with its
  # own status, so a caller can tell it from a failure of rmem.
  if [[ $st_a -ne 0 || $st_b -ne 0 ]] && grep -qs 'Kernel panic' "$log.a" "$log.b"; then
    echo "run.sh: a guest kernel panicked: status 125" >&2
    exit 125
  fi
  [[ $st_b -ne 0 ]] && exit "$st_b"
  exit "$st_a"
fi

echo "== booting ($accel, 2 vCPUs; timeout ${timeout_s} s, ${boot_timeout} s to a sign of life)"
boot rmem "$log" 2 2G "" -netdev user,id=n0 -device virtio-net-pci,netdev=n0 "${vm_args[@]+"${vm_args[@]}"}"
finish "$log" "$vm_pid" "VM"
echo "== guest exit status $st"
exit "$st"
