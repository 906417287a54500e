#!/usr/bin/env bash
# Installs the Debian package on a clean Debian 12 root (debootstrap, minbase) and checks it
# there: apt resolves its dependencies, `rmem --version` runs, `man rmem-swap` shows the page,
# completions are in place, and each unit passes `systemd-analyze verify`. Needs root and the
# Debian mirror. Usage: scripts/package-test.sh [path.deb]  (builds it with package.sh if none)
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(scripts/package.sh | tail -1)}
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
root=$(mktemp -d /var/tmp/rmem-root.XXXXXX)
cleanup() { umount -R "$root/proc" 2>/dev/null || true; rm -rf "$root"; }
trap cleanup EXIT
echo "== debootstrap bookworm (minbase) into $root"
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
mount -t proc proc "$root/proc"
cp "$deb" "$root/tmp/rmem.deb"
echo "== apt install the package (with man-db and systemd to check pages and units)"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq man-db systemd /tmp/rmem.deb >/dev/null
chroot "$root" rmem --version
chroot "$root" dpkg -s rmem | grep -E "^(Version|Depends):"
page=$(chroot "$root" env MANPAGER=cat COLUMNS=100 man rmem-swap 2>/dev/null)
grep -q "rmem-swap-up" <<<"$page" || { echo "man rmem-swap does not list rmem-swap-up" >&2; exit 1; }
echo "man rmem-swap: $(wc -l <<<"$page") lines"
page=$(chroot "$root" env MANPAGER=cat COLUMNS=100 man rmem-swap-up 2>/dev/null)
grep -q -- "--placement" <<<"$page" || { echo "man rmem-swap-up lacks --placement" >&2; exit 1; }
echo "man rmem-swap-up: $(wc -l <<<"$page") lines"
for f in /usr/share/bash-completion/completions/rmem /usr/share/zsh/vendor-completions/_rmem \
         /usr/share/fish/vendor_completions.d/rmem.fish /usr/lib/rmem/librmem_preload.so; do
  [[ -s $root$f ]] || { echo "missing $f" >&2; exit 1; }
done
cp "$root/lib/systemd/system/rmem-swap@.service" "$root/lib/systemd/system/rmem-swap@check.service"
for u in rmem-server.service rmem-place.service rmem-swap@check.service; do
  chroot "$root" systemd-analyze verify --man=no "/lib/systemd/system/$u"
  echo "systemd-analyze verify $u: ok"
done
echo "== the package installs and checks out on a clean Debian 12 root"
