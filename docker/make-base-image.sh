#!/usr/bin/env bash
# Build a local Python 3.11 base image from Debian bookworm's packages, for machines that reach
# a Debian mirror but no container registry. It stands in for python:3.11-slim-bookworm:
#
#   docker/make-base-image.sh [TAG]          # default TAG: two-tower-retrieval/python:3.11-bookworm
#   docker build -f docker/Dockerfile --build-arg PYTHON_IMAGE=TAG -t two-tower-retrieval:cpu .
#
# The image holds Python 3.11 with venv and pip (`python` and `python3` both work), CA
# certificates, and a non-root user `retrieval` (uid/gid 10001, the uid the Dockerfiles run as).
# The mirror is the first Debian one this machine's apt uses (DEBIAN_MIRROR overrides it).
# Needs root (debootstrap chroots), debootstrap and a running Docker engine; takes a minute or
# two and about 150 MB of downloads.
set -euo pipefail

tag=${1:-two-tower-retrieval/python:3.11-bookworm}
suite=bookworm

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    # deb822 sources (URIs: ...) first, then one-line sources (deb URL SUITE ...).
    mirror=$(
        { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
          grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'; } |
            grep -v -e security -e '^$' | grep -m1 debian || true
    )
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap $suite from $mirror into $rootfs" >&2
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd \
    "$suite" "$rootfs" "$mirror" >&2

chroot "$rootfs" /bin/sh -ec '
    groupadd --gid 10001 retrieval
    useradd --uid 10001 --gid retrieval --home-dir /home/retrieval --create-home \
        --shell /usr/sbin/nologin retrieval
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* \
        /usr/share/info/* /var/log/*.log
'
# No network traffic from the chroot at run time: the mirror was only for the bootstrap.
: > "$rootfs/etc/resolv.conf"

tar --numeric-owner -C "$rootfs" -c . |
    docker import \
        --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        --message "Debian $suite minbase + Python 3.11 (docker/make-base-image.sh)" \
        - "$tag" >/dev/null
docker run --rm --network none "$tag" python -c 'import sys, venv, ensurepip; print("base image ok:", sys.version.split()[0])' >&2
echo "$tag"
