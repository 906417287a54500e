#!/usr/bin/env bash
# Installs what building rmem needs on Debian/Ubuntu: a C toolchain, rdma-core's headers plus
# libclang for the verbs provider's bindings, and protoc with the protobuf headers for the etcd
# client's generated code (placement's shared registry). Rust (1.87 or newer) comes from rustup.
set -euo pipefail
pkgs=(build-essential pkg-config libibverbs-dev librdmacm-dev libclang-dev clang protobuf-compiler libprotobuf-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "rmem needs Rust 1.87 or newer: install it with rustup (https://rustup.rs) and rerun." >&2
  exit 1
fi
