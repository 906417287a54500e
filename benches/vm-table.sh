# shellcheck shell=bash
# Sourced by the VM benchmarks (swap-compare.sh, fio-compare.sh): runs one soft-roce/vm/run.sh
# mode and picks its table out of the guest's console.
#
#   vm_table MODE HEADLINE [ARGS...]
# runs `soft-roce/vm/run.sh MODE ARGS...` with the console in a temporary log, prints the guest's
# line matching HEADLINE (a grep pattern) and the rows between "=== BEGIN MODE table" and
# "=== END MODE table"; leaves those rows in the file $table and run.sh's status in $vm_rc.
# The caller removes "$table" (and "$table.*") when done.
vm_table() {
  local mode=$1 headline=$2 log
  shift 2
  log=$(mktemp)
  table=$log.table
  vm_rc=0
  RMEM_VM_LOG=$log soft-roce/vm/run.sh "$mode" "$@" || vm_rc=$?
  echo
  tr -d '\r' < "$log" | grep "$headline" || true
  tr -d '\r' < "$log" | sed -n "/^=== BEGIN $mode table/,/^=== END $mode table/p" | sed '1d;$d' |
    tee "$table"
  rm -f "$log"
}
