#!/usr/bin/env bash
# Build a Python 3.11 base image with no container registry, from Debian's own packages:
# debootstrap a minimal bookworm from deb.debian.org, add python3.11 + venv + pip from apt,
# import the tree as an image. For hosts that reach Debian's mirrors but no registry; the
# Containerfile then builds on it with --build-arg BASE=localhost/idlegrid-base:bookworm.
#
#   deploy/local-base.sh [TAG]      (default localhost/idlegrid-base:bookworm; needs root,
#                                    debootstrap and podman: apt-get install debootstrap podman)
# Environment: IDLEGRID_BUILD_DIR (default /var/tmp/idlegrid-base), DEBIAN_MIRROR.
set -euo pipefail
tag="${1:-localhost/idlegrid-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
work="${IDLEGRID_BUILD_DIR:-/var/tmp/idlegrid-base}"
root="$work/rootfs"
[ "$(id -u)" = 0 ] || { echo "local-base.sh: debootstrap needs root" >&2; exit 1; }
# A half-made tree from an interrupted run is not reused: debootstrap would trust it.
rm -rf "$root"
mkdir -p "$work"
# python3 gives /usr/bin/python3 (python:3.11-slim has it too, as /usr/local/bin/python3);
# ca-certificates so pip reaches PyPI over TLS from the image.
debootstrap --variant=minbase \
  --include=python3,python3.11,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror"
# Security updates as well, so an image built later gets them from `apt-get upgrade`.
cat > "$root/etc/apt/sources.list" <<LIST
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
LIST
# What debootstrap leaves that no image needs: downloaded .debs, package lists, logs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
  "$root"/debootstrap
tar -C "$root" --numeric-owner -cf - . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag"
rm -rf "$root"
podman run --rm "$tag" python3 -c 'import sys, venv, ensurepip; print("base ok:", sys.version.split()[0])'
