#!/usr/bin/env bash
# Builds the migration tests' guest into OUT_DIR: OUT_DIR/vmlinuz (a Debian kernel from /boot,
# the newest 6.1 one, else the newest of any) and OUT_DIR/initramfs.cpio.gz (cpio newc, gzip)
# whose /init is init.c built static; and OUT_DIR/writer, the same program built dynamically
# (run as a process with --file PATH). Does nothing when both are up to date; callers running at
# once wait for each other (a lock in OUT_DIR).
#
#   migrate/guest/build.sh OUT_DIR
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR" >&2; exit 2; }
[[ $# -eq 1 && $1 != -* ]] || usage
out=$1
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

# The kernel: Debian's linux-image-amd64 puts it in /boot.
kernel=$(ls /boot/vmlinuz-6.1.* 2>/dev/null | sort -V | tail -n 1 || true)
[[ -n $kernel ]] || kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z $kernel ]]; then
  echo "$0: no kernel in /boot (vmlinuz-*): install linux-image-amd64" >&2
  exit 1
fi
[[ -r $kernel ]] || { echo "$0: $kernel is not readable (run as root)" >&2; exit 1; }
if ! cmp -s "$kernel" "$out/vmlinuz"; then
  cp "$kernel" "$out/vmlinuz.tmp"
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi

# /init, and the image holding it, rebuilt only when this script or init.c changed.
if [[ ! -e $out/init || $src/init.c -nt $out/init || $0 -nt $out/init ]]; then
  gcc -O2 -static -pthread -Wall -Wextra -Werror -o "$out/init.tmp" "$src/init.c"
  mv "$out/init.tmp" "$out/init"
fi
# The same program as a process over a shared file, linked dynamically so LD_PRELOAD works.
if [[ ! -e $out/writer || $src/init.c -nt $out/writer || $0 -nt $out/writer ]]; then
  gcc -O2 -pthread -Wall -Wextra -Werror -o "$out/writer.tmp" "$src/init.c"
  mv "$out/writer.tmp" "$out/writer"
fi
if [[ ! -e $out/initramfs.cpio.gz || $out/init -nt $out/initramfs.cpio.gz ]]; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir "$root/dev" "$root/proc"
  cp "$out/init" "$root/init"
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner=0:0 --reproducible) | gzip -n -9 >"$out/initramfs.cpio.gz.tmp"
  mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
fi
echo "$out/vmlinuz $out/initramfs.cpio.gz"
