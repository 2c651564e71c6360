#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm when no registry can be reached: Debian bookworm minbase
# (debootstrap, from the host's configured apt mirror) + Debian's python3.11 and venv, as a rootfs tarball.
#   docker/e2e/base.sh OUT.tar      (cached by the caller; ~40 s, ~45 MB compressed)
# `docker import OUT.tar IMAGE` turns it into an image with the same entry points the Dockerfile uses
# (`python`, `python -m venv`).
set -euo pipefail
out=${1:?usage: base.sh OUT.tar}
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
# The host's bookworm mirror (deb822 first, then one-line sources), else Debian's CDN.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[[ -n $mirror ]] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[[ -n $mirror ]] || mirror=http://deb.debian.org/debian
root=$(mktemp -d /tmp/softserve-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
log=$root.log
nice -n 10 debootstrap --variant=minbase bookworm "$root" "$mirror" >"$log" 2>&1 \
    || { tail -20 "$log" "$root/debootstrap/debootstrap.log"; exit 1; }
# python3.11-venv inside debootstrap's own configure pass fails (its postinst needs a complete system).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
mount --bind /proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null; rm -rf "$root" "$log"' EXIT
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv ca-certificates \
    >>"$log" 2>&1 || { tail -30 "$log"; exit 1; }
umount "$root/proc"
: >"$root/etc/resolv.conf"
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$root/etc/apt/sources.list"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/var/log/*.log "$root"/tmp/*
tar -C "$root" --numeric-owner -czf "$out.tmp" .
mv "$out.tmp" "$out"
rm -rf "$root" "$log"
