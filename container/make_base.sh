#!/bin/sh
# Makes a local stand-in for the python:3.11-slim base image where no image registry can be
# reached: a Debian bookworm minbase root file system (debootstrap) with Debian's Python 3.11 and
# its venv module, imported into buildah/podman storage as IMAGE.
#
#   container/make_base.sh [IMAGE]        (default localhost/flare-base:bookworm-python3.11)
#
# Needs root, and Debian's debootstrap and buildah. Does nothing when IMAGE is already in the
# storage (FORCE=1 rebuilds it). MIRROR overrides the Debian mirror (default: deb.debian.org).
set -eu

image=${1:-localhost/flare-base:bookworm-python3.11}
mirror=${MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv

say() { printf 'make_base: %s\n' "$*"; }
die() { printf 'make_base: error: %s\n' "$*" >&2; exit 1; }

for tool in debootstrap buildah tar; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool not found (apt-get install debootstrap buildah)"
done
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"

if [ "${FORCE:-0}" != 1 ] && buildah inspect --type image "$image" >/dev/null 2>&1; then
    say "$image is already in the image storage (FORCE=1 rebuilds it)"
    exit 0
fi

previous=$(buildah inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)
work=$(mktemp -d "${TMPDIR:-/var/tmp}/flare-base.XXXXXX")
container=""
cleanup() {
    if [ -n "$container" ]; then
        buildah rm "$container" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$(date +%s)
say "debootstrap --variant=minbase bookworm with $packages from $mirror (a few minutes)"
debootstrap --variant=minbase --include="$packages" bookworm "$work/root" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)"
}

# What a slim image leaves out too: package caches and lists, documentation, other locales.
rm -rf "$work/root/var/cache/apt/"* "$work/root/var/lib/apt/lists/"* \
    "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"* "$work/root/usr/share/info/"* \
    "$work/root/var/log/"*.log "$work/root/var/cache/debconf/"*-old
find "$work/root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
    -exec rm -rf {} +

# A tar archive keeps owners, modes and links; buildah add unpacks it. /dev, /proc and /sys are
# filled by the container runtime, so they go in empty.
tar -C "$work/root" --numeric-owner --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
    -cf "$work/root.tar" .
container=$(buildah from scratch)
buildah add --quiet "$container" "$work/root.tar" / >/dev/null
buildah config --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash \
    --label "org.opencontainers.image.description=Debian bookworm minbase with python3" \
    "$container"
buildah commit --quiet --rm "$container" "$image" >/dev/null
container=""
if [ -n "$previous" ]; then
    # The replaced base goes too, unless images built on it still use it.
    buildah rmi "$previous" >/dev/null 2>&1 || true
fi
say "$image made in $(($(date +%s) - start)) s:"
buildah images "$image"
