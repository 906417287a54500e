#!/usr/bin/env bash
# Runs rmem's verbs conformance suite over Soft-RoCE (rxe) in a QEMU VM, on a host without RDMA.
#
#   soft-roce/vm/run.sh [test filter or libtest arguments...]
#
# Installs what it needs with apt-get (QEMU, a Debian kernel with rdma_rxe, busybox, rdma-core),
# builds the conformance test binary with --features verbs-hw, builds an initramfs around it
# (build-initramfs.sh), boots it under TCG (KVM does not work nested here), prints the guest's
# console and exits with the guest's status (124 when the VM times out). Arguments go to the
# test binary: `run.sh atomics` runs one case, `run.sh --skip send_recv` all but one.
#
# Known on rxe (Linux 6.1, also later kernels' rxe_mr.c): `send_recv` fails because a SEND larger
# than the receive buffer completes as RemOpErr/LocQpOpErr instead of RemInvReqErr/LocLenErr
# (rxe's copy_data returns -EINVAL where the responder expects -ENOSPC).
#
# Environment: RMEM_VM_KERNEL (kernel version; default: the newest installed one with rdma_rxe),
# RMEM_VM_TIMEOUT (seconds, default 1500), RMEM_VM_LOG (console log file),
# RMEM_VM_GUEST (guest script, default guest-conformance.sh), CARGO_TARGET_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
timeout_s=${RMEM_VM_TIMEOUT:-1500}
guest=${RMEM_VM_GUEST:-$here/guest-conformance.sh}

pkgs=(qemu-system-x86 linux-image-amd64 busybox-static kmod cpio xz-utils rdma-core
      ibverbs-providers ibverbs-utils iproute2)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$repo/scripts/deps.sh"

kver=${RMEM_VM_KERNEL:-}
if [[ -z $kver ]]; then
  for d in $(ls -d /lib/modules/*/ | sort -V -r); do
    v=$(basename "$d")
    if [[ -e /boot/vmlinuz-$v ]] && find "$d" -name 'rdma_rxe.ko*' | grep -q .; then kver=$v; break; fi
  done
fi
[[ -n $kver && -e /boot/vmlinuz-$kver ]] || { echo "run.sh: no kernel with rdma_rxe installed" >&2; exit 1; }

echo "== building the conformance binary (release, --features verbs-hw)"
cd "$repo"
json=$(cargo test --release --locked -p rmem-transport --features verbs-hw --test conformance_verbs \
  --no-run --message-format=json)
bin=$(printf '%s\n' "$json" | grep '"name":"conformance_verbs"' | grep -o '"executable":"[^"]*"' |
  tail -1 | cut -d'"' -f4)
[[ -x $bin ]] || { echo "run.sh: conformance binary not found" >&2; exit 1; }
cargo build --release --locked --bin rmem
rmem_bin=${CARGO_TARGET_DIR:-$repo/target}/release/rmem
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Stable names in the guest's /bin: conformance_verbs, rmem, and `rmem-devices`.
cp "$bin" "$work/conformance_verbs"
printf '#!/bin/sh\nexec /bin/rmem devices "$@"\n' > "$work/rmem-devices"
chmod +x "$work/rmem-devices"

echo "== building the initramfs (kernel $kver)"
"$here/build-initramfs.sh" -k "$kver" -o "$work/initramfs.cpio.gz" -g "$guest" \
  -e "RMEM_TEST_ARGS=$*" -e "RUST_BACKTRACE=1" \
  "$work/conformance_verbs" "$rmem_bin" "$work/rmem-devices"
log=${RMEM_VM_LOG:-$work/console.log}

echo "== booting (TCG, 2 vCPUs; timeout ${timeout_s} s)"
set +e
timeout "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 2G \
  -nographic -no-reboot -kernel "/boot/vmlinuz-$kver" -initrd "$work/initramfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=4" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 < /dev/null > "$log" 2>&1
qemu_rc=$?
set -e
echo "== guest console"
tr -d '\r' < "$log"
status=$(tr -d '\r' < "$log" | sed -n 's/^RMEM-GUEST-EXIT=\([0-9]*\)$/\1/p' | tail -1)
if [[ -z $status ]]; then
  echo "run.sh: the guest did not finish (qemu exit $qemu_rc)" >&2
  [[ $qemu_rc -eq 124 ]] && exit 124
  exit 1
fi
echo "== guest exit status $status"
exit "$status"
