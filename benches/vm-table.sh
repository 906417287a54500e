# shellcheck shell=bash
# Sourced by the VM benchmarks (swap-compare.sh, fio-compare.sh): runs one soft-roce/vm/run.sh
# mode and picks its table out of the guest's console.
#
#   vm_table MODE HEADLINE [ARGS...]
# runs `soft-roce/vm/run.sh MODE ARGS...` with the console in a temporary log, prints the guest's
# line matching HEADLINE (a grep pattern) and the rows between "=== BEGIN MODE table" and
# "=== END MODE table"; leaves those rows in the file $table and run.sh's status in $vm_rc.
# The caller removes "$table" (and "$table.*") when done.
#
#   vm_compare MODE HEADLINE BARS_PY [--svg FILE] [ARGS...]
# the whole of a comparison script: vm_table, then with --svg the table drawn as bars by
# `rmem perf plot`, from the bars JSON that the Python program BARS_PY writes to
# sys.argv[2]; it starts with the table read: `head` (its header's cells) and `body` (its rows'
# cells), and `json` imported. Returns run.sh's status; removes its files on exit.
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

# What every BARS_PY starts with.
table_py='import json, sys
rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in open(sys.argv[1]) if l.startswith("|")]
head, body = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]
'
vm_compare() {
  local mode=$1 headline=$2 bars_py=$3 svg_out=""
  shift 3
  if [[ "${1:-}" == "--svg" ]]; then svg_out=${2:?--svg needs a file}; shift 2; fi
  table=""
  trap 'rm -f "$table" "$table.bars"' EXIT
  vm_table "$mode" "$headline" "$@"
  if [[ -n $svg_out && -s $table ]]; then
    python3 -c "$table_py$bars_py" "$table" "$table.bars"
    target/release/rmem perf plot --bars "$table.bars" --out "$svg_out"
  fi
  return "$vm_rc"
}
