#!/usr/bin/env bash
# The donor under attack, long form: legitimate clients allocate, write, read back, verify and
# free while hostile peers (idle sockets and slow hellos on every port, garbage, an authenticated
# reconnect flood, NBD clients that never read their replies) run beside them. Prints the
# legitimate clients' p50/p99 before, during and after the attack, and the donor's RSS and
# descriptors; fails if any legitimate operation failed or the donor's RSS or descriptors did not
# come back. The test command runs the same soak for 4 s a phase in a debug build.
#
#   benches/soak.sh [SECONDS_PER_PHASE] [CLIENTS]     (defaults 60 and 4)
set -euo pipefail
cd "$(dirname "$0")/.."
export RMEM_SOAK_SECS=${1:-60} RMEM_SOAK_CLIENTS=${2:-4}
cargo test --release --locked --test soak -- --nocapture
