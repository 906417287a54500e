#!/usr/bin/env bash
# The main job: build rmem and run the local demo (software provider, everything in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release -q
exec target/release/rmem demo "$@"
