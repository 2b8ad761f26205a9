#!/usr/bin/env bash
# Builds CRIU from source into a project-local prefix (default .criu/), because Debian
# bookworm's criu 3.17 fails on this kernel and 4.1.1 cannot dump TCP sockets on >= 6.16.
#
# Source selection (first that is set wins):
#   FASTVLLM_CRIU_TARBALL=/path/criu-X.Y.tar.xz   a local tarball
#   FASTVLLM_CRIU_GIT=URL [FASTVLLM_CRIU_REF=ref]  a git repository (e.g. a fork)
#   otherwise: Debian's source package criu/$FASTVLLM_CRIU_DEBIAN_SUITE (default sid),
#              fetched with apt-get source --download-only (only the .orig tarball is used).
# FASTVLLM_CRIU_VERSION (default 4.2.1) is what the Debian path expects to get.
# The project's own CRIU patches (patches/criu/*.patch, -p1 against the pristine 4.2.1 tree,
# applied in name order right after unpacking, whatever the source) add --restore-memory
# copy|hugepage|mmap (see patches/criu/0001-restore-memory-engines.patch).
# Idempotent: does nothing if $PREFIX/sbin/criu already reports the expected build stamp,
# which names the source and a hash of the patch files (a changed patch rebuilds).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${FASTVLLM_CRIU_PREFIX:-$ROOT/.criu}"
VERSION="${FASTVLLM_CRIU_VERSION:-4.2.1}"
SUITE="${FASTVLLM_CRIU_DEBIAN_SUITE:-sid}"
SRC_ROOT="$PREFIX/src"
if [[ -n "${FASTVLLM_CRIU_TARBALL:-}" ]]; then
  SOURCE_ID="tarball:$(readlink -f "$FASTVLLM_CRIU_TARBALL")"
elif [[ -n "${FASTVLLM_CRIU_GIT:-}" ]]; then
  SOURCE_ID="git:$FASTVLLM_CRIU_GIT@${FASTVLLM_CRIU_REF:-HEAD}"
else
  SOURCE_ID="debian:criu/$SUITE:$VERSION"
fi
PATCH_DIR="$ROOT/patches/criu"
shopt -s nullglob
PATCHES=("$PATCH_DIR"/*.patch)
shopt -u nullglob
if ((${#PATCHES[@]})); then
  PATCH_HASH=$(cd "$PATCH_DIR" && sha256sum -- *.patch | sha256sum | cut -c1-16)
else
  PATCH_HASH=none
fi
SOURCE_ID="$SOURCE_ID patches:$PATCH_HASH"
STAMP="$PREFIX/.build-stamp"

if [[ -x "$PREFIX/sbin/criu" && -f "$STAMP" && "$(cat "$STAMP")" == "$SOURCE_ID" ]]; then
  echo "[setup] criu: $("$PREFIX/sbin/criu" --version | head -1) already built in $PREFIX"
  exit 0
fi

mkdir -p "$SRC_ROOT"
cd "$SRC_ROOT"
rm -rf build && mkdir build

if [[ -n "${FASTVLLM_CRIU_TARBALL:-}" ]]; then
  echo "[setup] criu: unpacking $FASTVLLM_CRIU_TARBALL"
  tar -C build -xf "$FASTVLLM_CRIU_TARBALL"
elif [[ -n "${FASTVLLM_CRIU_GIT:-}" ]]; then
  echo "[setup] criu: cloning $FASTVLLM_CRIU_GIT (${FASTVLLM_CRIU_REF:-default branch})"
  git clone -q "$FASTVLLM_CRIU_GIT" build/criu-git
  if [[ -n "${FASTVLLM_CRIU_REF:-}" ]]; then git -C build/criu-git checkout -q "$FASTVLLM_CRIU_REF"; fi
else
  tarball="criu_${VERSION}.orig.tar.xz"
  if [[ ! -f "$tarball" ]]; then
    # A deb-src entry for $SUITE, on the same mirror and keyring as the machine's own
    # Debian entry. Source indexes only: no binary package from $SUITE is ever installed.
    list=/etc/apt/sources.list.d/fastvllm-criu-src.sources
    if [[ ! -f "$list" ]]; then
      base=$(grep -h -m1 -E '^URIs:.*debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' || true)
      if [[ -z "$base" ]]; then
        base=$(grep -h -m1 -E '^deb .*/debian/? ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' || true)
      fi
      if [[ -z "$base" ]]; then
        echo "[setup] criu: cannot find a Debian mirror in /etc/apt/sources.list*; set FASTVLLM_CRIU_TARBALL to a CRIU $VERSION tarball" >&2
        exit 1
      fi
      keyring=/usr/share/keyrings/debian-archive-keyring.gpg
      printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$base" "$SUITE" "$keyring" > "$list"
    fi
    apt-get update -qq
    echo "[setup] criu: fetching Debian source package criu/$SUITE"
    apt-get source --download-only "criu/$SUITE" >/dev/null 2>&1 || true
    if [[ ! -f "$tarball" ]]; then
      echo "[setup] criu: could not fetch $tarball from Debian ($SUITE); set FASTVLLM_CRIU_TARBALL or FASTVLLM_CRIU_GIT" >&2
      exit 1
    fi
  fi
  tar -C build -xf "$tarball"
fi

srcdir=$(find build -mindepth 1 -maxdepth 1 -type d | head -1)
for p in "${PATCHES[@]}"; do
  echo "[setup] criu: applying $(basename "$p")"
  patch -d "$srcdir" -p1 -s --forward < "$p" || {
    echo "[setup] criu: $(basename "$p") does not apply to $srcdir (the patches are written against CRIU 4.2.1)" >&2
    exit 1
  }
done
echo "[setup] criu: building in $srcdir (about a minute on 2 cores)"
cd "$srcdir"
# Headers/binaries are built without docs; the cuda plugin is built too (used on GPU hosts).
make -j"$(nproc)" PREFIX="$PREFIX" >"$PREFIX/build.log" 2>&1 || { tail -30 "$PREFIX/build.log" >&2; exit 1; }
# SKIP_PIP_INSTALL: pycriu/crit go into the project venv (setup_venv.sh), not system python.
make PREFIX="$PREFIX" SKIP_PIP_INSTALL=1 install-criu install-lib install-crit install-compel install-cuda_plugin \
  >>"$PREFIX/build.log" 2>&1 || { tail -30 "$PREFIX/build.log" >&2; exit 1; }
# Keep the built tree's python packages where setup_venv.sh can pip-install them.
rm -rf "$PREFIX/python" && mkdir -p "$PREFIX/python"
cp -r lib "$PREFIX/python/lib" && cp -r crit "$PREFIX/python/crit"
echo "$SOURCE_ID" > "$STAMP"
echo "[setup] criu: $("$PREFIX/sbin/criu" --version | head -1) installed in $PREFIX"
