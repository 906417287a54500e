#!/usr/bin/env bash
# Builds the Debian package: the release binary and preload library, man pages and shell
# completions generated from the clap definitions (target/dist/), then cargo-deb. Prints the
# .deb's path. Installs cargo-deb (cargo) and lintian (apt) when missing, and runs lintian.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
cargo build --release --locked -p rmem -p rmem-preload
# cargo-deb finds target/release/ wherever CARGO_TARGET_DIR puts it; the generated pages and
# completions stay in this tree's target/dist, where the package metadata names them.
rmem=${CARGO_TARGET_DIR:-target}/release/rmem
out=target/dist
rm -rf "$out"; mkdir -p "$out/man" "$out/completions"
"$rmem" man --dir "$out/man" 2>/dev/null
gzip -9n "$out"/man/*.1
"$rmem" completions bash > "$out/completions/rmem.bash"
"$rmem" completions zsh > "$out/completions/_rmem"
"$rmem" completions fish > "$out/completions/rmem.fish"
# Stripped: a backtrace still names functions; full debug info is for the build tree.
deb=$(cargo deb --no-build --strip -p rmem | tail -1)
if ! command -v lintian >/dev/null; then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq lintian >/dev/null
fi
# Overrides with their reasons: dist/lintian-overrides.
lintian --suppress-tags-from-file dist/lintian-overrides "$deb" >&2 || true
echo "$deb"
