#!/usr/bin/env bash
# Soft-RoCE on a real host: create, check and remove an rxe device over a network interface.
#
#   soft-roce/rxe.sh add <netdev> [name]     load rdma_rxe and create <name> (default rxe_<netdev>)
#   soft-roce/rxe.sh check [name]            show rxe devices, their state, GIDs and memlock limit
#   soft-roce/rxe.sh remove [name]           delete <name> (default: every rxe device)
#
# Exit status: 0 done, 1 failure, 2 usage, 3 the kernel cannot do Soft-RoCE here.
set -euo pipefail

die() { echo "rxe.sh: $2" >&2; exit "$1"; }
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

need_tools() {
  command -v rdma >/dev/null || die 1 "the 'rdma' tool is missing: install iproute2 (and rdma-core for ibv_devices)"
}

load_module() {
  [[ -d /sys/module/rdma_rxe ]] && return 0
  if ! command -v modprobe >/dev/null; then
    die 3 "no modprobe here and rdma_rxe is not loaded: this kernel cannot host Soft-RoCE (try soft-roce/vm)"
  fi
  if ! modprobe -n rdma_rxe 2>/dev/null; then
    die 3 "kernel $(uname -r) has no rdma_rxe module (CONFIG_RDMA_RXE): use a distribution kernel, or the VM harness in soft-roce/vm"
  fi
  # rdma_rxe computes ICRCs with crc32; without a crc32 provider 'rdma link add' fails with ENOENT.
  modprobe crc32_generic 2>/dev/null || true
  modprobe rdma_rxe || die 3 "modprobe rdma_rxe failed (module loading disabled, or not root?)"
  modprobe ib_uverbs 2>/dev/null || true
}

cmd_add() {
  local netdev=${1:-}; [[ -n "$netdev" ]] || usage
  local name=${2:-rxe_$netdev}
  [[ -e /sys/class/net/$netdev ]] || die 1 "no network interface named $netdev (see: ip link)"
  need_tools
  load_module
  if [[ -e /sys/class/infiniband/$name ]]; then
    echo "$name already exists"; cmd_check "$name"; return 0
  fi
  [[ "$(cat /sys/class/net/"$netdev"/operstate)" == "down" ]] && echo "warning: $netdev is down; rxe ports follow it" >&2
  rdma link add "$name" type rxe netdev "$netdev" || die 1 "rdma link add $name failed"
  # The port comes up and its GIDs appear shortly after the link is added.
  local n=0
  until grep -qi active "/sys/class/infiniband/$name/ports/1/state" 2>/dev/null &&
        grep -qx 'RoCE v2' "/sys/class/infiniband/$name/ports/1/gid_attrs/types/"* 2>/dev/null; do
    n=$((n + 1)); ((n > 100)) && die 1 "$name did not become active with a RoCE v2 GID within 10 s"
    sleep 0.1
  done
  cmd_check "$name"
}

cmd_check() {
  need_tools
  local names=("$@")
  ((${#names[@]})) || mapfile -t names < <(ls /sys/class/infiniband 2>/dev/null)
  ((${#names[@]})) || die 1 "no RDMA devices: create one with 'soft-roce/rxe.sh add <netdev>'"
  for d in "${names[@]}"; do
    [[ -e /sys/class/infiniband/$d ]] || die 1 "no RDMA device named $d"
    echo "== $d"
    rdma link show "$d/1" 2>/dev/null || true
    for g in /sys/class/infiniband/"$d"/ports/1/gids/*; do
      local i=${g##*/} gid; gid=$(cat "$g" 2>/dev/null) || continue
      [[ "$gid" == "0000:0000:0000:0000:0000:0000:0000:0000" ]] && continue
      echo "   gid[$i] $gid $(cat /sys/class/infiniband/"$d"/ports/1/gid_attrs/types/"$i" 2>/dev/null) $(cat /sys/class/infiniband/"$d"/ports/1/gid_attrs/ndevs/"$i" 2>/dev/null)"
    done
  done
  local lim; lim=$(ulimit -l)
  [[ "$lim" == unlimited ]] || echo "note: locked-memory limit is ${lim} KiB; registering memory needs more (ulimit -l unlimited)" >&2
}

cmd_remove() {
  need_tools
  local names=("$@")
  ((${#names[@]})) || mapfile -t names < <(rdma link show 2>/dev/null | awk '{split($2,a,"/"); print a[1]}' | grep -E '^rxe' || true)
  ((${#names[@]})) || { echo "no rxe devices"; return 0; }
  for d in "${names[@]}"; do rdma link delete "$d" && echo "removed $d"; done
}

case "${1:-}" in
  add) shift; cmd_add "$@" ;;
  check) shift; cmd_check "$@" ;;
  remove) shift; cmd_remove "$@" ;;
  *) usage ;;
esac
