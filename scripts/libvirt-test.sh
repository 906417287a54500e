#!/usr/bin/env bash
# docs/migrate.md's libvirt set-up, run for real: two transient libvirt domains on this host
# (the migration tests' guest, QEMU TCG, 128 MiB in a shared file that libvirt places in
# /dev/shm, a second QMP monitor and the preload library through <qemu:commandline>), the
# second one waiting with -incoming defer, and `rmem migrate send`/`recv` between them in three
# modes: stop-copy, pre-copy with exact dirty pages, post-copy. Each must end with the guest
# running on the destination, libvirt reporting it running, and the guest's own check of its
# memory (12 ticks after the switch-over) finding no bad page.
#
# Needs root. Installs libvirt-daemon-system when virsh is missing. When no libvirt daemon
# answers, it sets memory_backing_dir = "/dev/shm" in /etc/libvirt/qemu.conf, starts virtlogd
# and libvirtd for its run, and puts both back after; a daemon already running must have that
# setting. Post-copy needs QEMU (libvirt's unprivileged user) to create a userfaultfd for
# minor faults: the script sets vm.unprivileged_userfaultfd=1 for that run and puts it back.
#
#   scripts/libvirt-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "$0: needs root (libvirt's system daemon)" >&2; exit 2; }

if ! command -v virsh >/dev/null || ! command -v libvirtd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libvirt-daemon-system libvirt-clients >/dev/null
fi
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --locked -q -p rmem -p rmem-preload
rmem=$target/release/rmem

work=/var/lib/libvirt/rmem-test
run=/run/rmem-libvirt-test
conf=/etc/libvirt/qemu.conf
V="virsh -q -c qemu:///system"
started_daemons=0
saved_sysctl=$(sysctl -n vm.unprivileged_userfaultfd)
recv_pid=""

cleanup() {
  set +e
  [[ -n $recv_pid ]] && kill "$recv_pid" 2>/dev/null
  for d in rmem-test-src rmem-test-dst; do $V destroy "$d" >/dev/null 2>&1; done
  sysctl -qw vm.unprivileged_userfaultfd="$saved_sysctl"
  if ((started_daemons)); then
    pkill -x libvirtd; pkill -x virtlogd
    [[ -e $conf.rmem-test ]] && mv "$conf.rmem-test" "$conf"
  fi
  rm -rf "$run"
}
trap cleanup EXIT

if ! $V version >/dev/null 2>&1; then
  cp "$conf" "$conf.rmem-test"
  sed -i 's|^#\?memory_backing_dir = .*|memory_backing_dir = "/dev/shm"|' "$conf"
  grep -q '^memory_backing_dir = "/dev/shm"' "$conf" || echo 'memory_backing_dir = "/dev/shm"' >> "$conf"
  started_daemons=1
  virtlogd -d
  libvirtd -d
  for _ in $(seq 50); do $V version >/dev/null 2>&1 && break; sleep 0.2; done
elif ! grep -q '^memory_backing_dir = "/dev/shm"' "$conf"; then
  echo "$0: a libvirt daemon runs without memory_backing_dir = \"/dev/shm\" in $conf" >&2
  exit 1
fi

mkdir -p "$work"
migrate/guest/build.sh "$target/tmp/rmem-guest" >/dev/null
cp "$target/tmp/rmem-guest/vmlinuz" "$target/tmp/rmem-guest/initramfs.cpio.gz" "$work/"
cp "$target/release/librmem_preload.so" "$work/"
chmod 755 "$work"; chmod 644 "$work"/*
rm -rf "$run"; mkdir -p "$run"; chmod 1777 "$run"
head -c 32 /dev/urandom | base64 > "$run/secret"

# domain NAME [EXTRA]: the domain XML of docs/migrate.md's libvirt section.
domain() {
  cat <<EOF
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>rmem-test-$1</name>
  <memory unit='MiB'>128</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$work/vmlinuz</kernel>
    <initrd>$work/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <devices>
    <serial type='file'><source path='$run/$1.serial'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/><qemu:arg value='unix:$run/$1.qmp,server=on,wait=off'/>
    ${2:-}
    <qemu:env name='LD_PRELOAD' value='$work/librmem_preload.so'/>
    <qemu:env name='RMEM_PRELOAD_SOCKET' value='$run/$1.uffd'/>
  </qemu:commandline>
</domain>
EOF
}

fail() { echo "FAIL: $*" >&2; exit 1; }

# ticks FILE: how many "tick" lines the guest wrote so far.
ticks() { grep -c '^tick ' "$1" 2>/dev/null || true; }

# wait_ticks FILE N SECONDS: until FILE holds N tick lines.
wait_ticks() {
  local t=0
  until (( $(ticks "$1") >= $2 )); do
    (( t++ < $3 * 10 )) || fail "$1: fewer than $2 ticks after $3 s: $(tail -n 3 "$1" 2>/dev/null)"
    sleep 0.1
  done
}

# one MODE SEND-ARGS...: boots both domains, migrates, checks the destination.
one() {
  local mode=$1; shift
  echo "== libvirt: rmem migrate send --mode $mode $*"
  rm -f "$run"/*.serial "$run"/*.out "$run"/*.err
  domain src > "$run/src.xml"
  domain dst "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>" > "$run/dst.xml"
  $V create "$run/src.xml" >/dev/null
  wait_ticks "$run/src.serial" 3 120
  $V create "$run/dst.xml" >/dev/null
  for _ in $(seq 100); do [[ -S $run/dst.qmp && -S $run/dst.uffd ]] && break; sleep 0.1; done
  "$rmem" migrate recv --listen 127.0.0.1:0 --qmp "$run/dst.qmp" --preload-socket "$run/dst.uffd" \
    --secret-file "$run/secret" --run-dir "$run" --json > "$run/recv.out" 2> "$run/recv.err" &
  recv_pid=$!
  local addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*"addr":"\([^"]*\)".*"event":"listening".*/\1/p' "$run/recv.out" | head -n 1)
    [[ -n $addr ]] && break; sleep 0.1
  done
  [[ -n $addr ]] || fail "recv did not listen: $(cat "$run/recv.err")"
  "$rmem" migrate send --qmp "$run/src.qmp" --to "$addr" --mode "$mode" --secret-file "$run/secret" \
    --run-dir "$run" --json "$@" > "$run/send.out" 2> "$run/send.err" ||
    fail "send --mode $mode exited $?: $(tail -n 3 "$run/send.err")"
  wait "$recv_pid" || fail "recv exited $?: $(tail -n 3 "$run/recv.err")"
  recv_pid=""
  grep '"event":"result"' "$run/send.out" | cut -c1-400
  local at
  at=$(ticks "$run/dst.serial")
  wait_ticks "$run/dst.serial" $((at + 12)) 60
  local bad
  bad=$(tr -d '\r' < "$run/dst.serial" | grep '^tick ' | grep -v 'bad=0$' || true)
  [[ -z $bad ]] || fail "the guest found bad pages after --mode $mode: $bad"
  [[ $($V domstate rmem-test-dst) == running ]] || fail "libvirt says the destination is $($V domstate rmem-test-dst)"
  [[ $($V domstate rmem-test-src) == paused ]] || fail "libvirt says the source is $($V domstate rmem-test-src)"
  echo "   destination running under libvirt, $(ticks "$run/dst.serial") ticks, no bad page"
  $V destroy rmem-test-src >/dev/null; $V destroy rmem-test-dst >/dev/null
}

one stop-copy
one precopy --preload-socket "$run/src.uffd"
sysctl -qw vm.unprivileged_userfaultfd=1
one postcopy --preload-socket "$run/src.uffd"
sysctl -qw vm.unprivileged_userfaultfd="$saved_sysctl"
echo "== libvirt: all three modes passed"
