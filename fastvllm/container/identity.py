"""Which snapshot on the volume belongs to this container: a key over everything a
restored server depends on names its directory, and its manifest must agree.

The key covers the model (path, file names, sizes and contents), the
vLLM args, the level, the ``VLLM_*`` environment (less the API key) and the image's
versions (Python, torch, vLLM, CRIU, fastvllm's own source): a changed image or model never
even looks at an old snapshot. Host, port and API key are not in it: a snapshot is dumped
before its server listens, and every restore binds the address and key it is given, so
containers on different ports share one snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .. import api_key as keys
from .. import manifest
from ..errors import FastvllmError, SnapshotInvalid
from .config import Config

_HASHED_FILE_MAX = 16 << 20  # model files up to this size are hashed; larger ones (weights) by size


def snapshot_identity(cfg: Config, model: str, criu_version: str) -> dict:
    """Everything a restored server depends on; its digest names the snapshot directory."""
    versions = {k: v for k, v in manifest.host_versions(criu_version).items() if k != "kernel"}
    return {
        "model": model,
        "model_files": _model_fingerprint(model),
        "vllm_args": cfg.vllm_args,
        "level": cfg.snapshot_level,
        "vllm_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_") and k != keys.ENV},
        "versions": versions,
        "fastvllm_source": _source_digest(),
    }


def snapshot_path(cfg: Config, model: str, criu_version: str) -> Path:
    identity = json.dumps(snapshot_identity(cfg, model, criu_version), sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name or "model").strip("-.") or "model"
    return cfg.snapshot_root.absolute() / f"{name}-{digest}"


def _model_fingerprint(model: str) -> list:
    """The model's files by content: names and sizes, small files (config, tokenizer)
    hashed whole, weights by :mod:`fastvllm.model_identity` (xxh3-128 of their bytes and
    safetensors header, cached by inode, size and times, so a boot rehashes nothing that
    did not change). By size alone, a retrained checkpoint of the same shapes would get the
    old snapshot, and at level 0 or 1 serve the old weights with a matching canary."""
    from .. import model_identity

    root = Path(model)
    if not root.is_dir():
        return []  # a hub id: its revision is whatever the local cache holds
    try:
        weights = model_identity.identity(root)["files"]
    except FastvllmError:  # no recognised model files: the sizes and small files still key it
        weights = {}
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel, size = str(path.relative_to(root)), path.stat().st_size
        if size <= _HASHED_FILE_MAX:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = (weights.get(rel) or {}).get("xxh3_128")
        out.append([rel, size, digest])
    return out


def _source_digest() -> str:
    """fastvllm's own code is part of the restored memory: any change means a new snapshot."""
    pkg = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def check_matches(meta: dict, cfg: Config, model: str) -> None:
    """A snapshot at the right path must also say it is of this server (defence against a
    directory copied or renamed by hand)."""
    srv = meta.get("server", {})
    wanted = cfg.server_args()
    problems = []
    if meta.get("model") != model:
        problems.append(f"model {meta.get('model')!r}, not {model!r}")
    if meta.get("level", 0) != cfg.snapshot_level:
        problems.append(f"level {meta.get('level', 0)}, not {cfg.snapshot_level}")
    if list(srv.get("extra_args", []))[: len(wanted)] != wanted:
        problems.append(f"vLLM args {srv.get('extra_args')}, not {wanted}")
    if problems:
        raise SnapshotInvalid("it was taken with " + "; ".join(problems), fix="")
