#!/usr/bin/env bash
# Checks run.sh's watch for a guest that never comes alive, with its test hook
# RMEM_VM_SILENT_BOOTS (the boots it lists by number get no kernel: the BIOS finds nothing to boot
# and the guest stays silent) and a short RMEM_VM_BOOT_TIMEOUT (default here 30 s):
#   1. one VM, its first boot silent: killed, booted again, the run passes;
#   2. one VM, its first two boots silent: the run fails after the second, saying so;
#   3. two VMs, b's first boot silent (boot 2): b alone is booted again, the run passes;
#   4. two VMs, a's two boots silent: the run fails before b is started.
# The guest script only says hello. Not part of scripts/test.sh: it boots QEMU seven times and
# waits out six silences (about 5 minutes under TCG).
#
#   soft-roce/vm/check-boot-watch.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export RMEM_VM_BOOT_TIMEOUT=${RMEM_VM_BOOT_TIMEOUT:-30}
# The hook's silent boots must not be taken for a KVM that hangs (auto would remember that).
export RMEM_VM_ACCEL=tcg

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/hello.sh" <<'EOF'
#!/bin/sh
echo "== guest script ran ($RMEM_ROLE)"
EOF

failed=0
# case NAME WANT_STATUS SILENT_BOOTS MODE: runs run.sh, then checks its status and its output
# against the patterns that follow the arguments ("!" before a pattern: must not appear).
case_() {
  local name=$1 want=$2 silent=$3 mode=$4 rc=0 out=$tmp/$1.out start=$SECONDS; shift 4
  echo "== case $name: RMEM_VM_SILENT_BOOTS=$silent run.sh $mode"
  if [[ $mode == two-vm ]]; then
    RMEM_VM_SILENT_BOOTS=$silent RMEM_VM_GUEST=$tmp/hello.sh "$here/run.sh" two-vm > "$out" 2>&1 || rc=$?
  else
    RMEM_VM_SILENT_BOOTS=$silent "$here/run.sh" script "$tmp/hello.sh" > "$out" 2>&1 || rc=$?
  fi
  local ok=1 p
  [[ $rc -eq $want ]] || { echo "   status $rc, expected $want"; ok=0; }
  for p in "$@"; do
    if [[ $p == !* ]]; then
      grep -q -- "${p#!}" "$out" && { echo "   unexpected: ${p#!}"; ok=0; }
    else
      grep -q -- "$p" "$out" || { echo "   missing: $p"; ok=0; }
    fi
  done
  grep -E '^== (test hook|rmem|VM|guest exit)|^run\.sh: |no sign of life|guest script ran' "$out" | sed 's/^/   | /'
  if ((ok)); then echo "   ok ($((SECONDS - start)) s)"; else echo "   FAILED (output in $out)"; failed=1; cp "$out" "/tmp/check-boot-watch-$name.out"; fi
}

t=$RMEM_VM_BOOT_TIMEOUT
case_ one-silent-boot 0 1 script \
  "rmem: no sign of life within $t s" "killed it, booting it again" "guest script ran (single)" \
  "!twice in a row"
case_ two-silent-boots 1 1,2 script \
  "rmem: no sign of life within $t s" "rmem gave no sign of life within $t s twice in a row" \
  "!guest script ran"
case_ b-silent-once 0 2 two-vm \
  "rmem-b: no sign of life within $t s" "guest script ran (client)" "guest script ran (server)" \
  "!rmem-a: no sign of life"
case_ a-silent-twice 1 1,2 two-vm \
  "rmem-a gave no sign of life within $t s twice in a row" "!rmem-b" "!guest script ran"
if ((failed)); then echo "check-boot-watch: FAILED"; exit 1; fi
echo "check-boot-watch: all cases passed"
