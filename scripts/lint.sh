#!/usr/bin/env bash
# The lints CI runs before the tests: format, clippy, and the module import graph (each
# crate's modules import downwards only). Run it before every commit.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== modules import downwards only (no cycles)"
for crate in transport wire memserver swapclient migrate placement; do
    python3 scripts/import-graph.py "$crate/src"
done
