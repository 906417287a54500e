#!/usr/bin/env bash
# The test suite: unit, property, conformance (tcp provider) and integration tests of the whole
# workspace, with the verbs provider built in (its no-device path is tested on hosts without RDMA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo test --workspace --locked
