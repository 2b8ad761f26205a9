"""Short names for well-known models, and where the local Hugging Face cache keeps them.

``fastvllm serve llama-3.2-3b`` is easier to type, and to put in a benchmark table, than
``meta-llama/Llama-3.2-3B-Instruct``. These machines cannot reach the hub, so a name (or a
hub id) is only ever resolved to a copy already in the local cache, laid out as
huggingface_hub lays it out (``models--ORG--NAME/snapshots/REV/``, ``refs/main``), and
vLLM is then given that directory: it loads it offline, by path, like any local model.

The table is deliberately short: models people benchmark cold starts with. A name maps to
the Instruct checkpoint (what gets served); a hub id can always be passed instead. Names
with a ``like`` preset can be stood in for by ``fastvllm make-model DIR --like NAME``
(same architecture and tensor shapes, random weights) where the real weights are absent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import FastvllmError

# name -> hub id. Lower-case names; lookups ignore case.
WELL_KNOWN: dict[str, str] = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
}

# The hub's repo id rule: ORG/NAME of letters, digits, '-', '_', '.', no '--' or '..'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def hub_id(name: str) -> str | None:
    """The hub id of a well-known name, the argument itself if it is shaped like a hub id,
    else None."""
    known = WELL_KNOWN.get(name.lower())
    if known:
        return known
    if _HUB_ID.match(name) and "--" not in name and ".." not in name:
        return name
    return None


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub would pick it, read now rather than at import:
    huggingface_hub reads HF_HUB_CACHE / HF_HOME once, when it is first imported."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot directory of ``repo_id`` (``refs/main`` unless ``revision``),
    or None when the cache holds no complete copy with a config.json."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(hub_cache_dir()),
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: no usable local copy
        return None
    return path if (path / "config.json").is_file() else None


def resolve(name: str) -> Path:
    """The local directory of a well-known name or hub id, from the cache; one-line errors
    that say how to get it here otherwise."""
    from . import model_maker

    repo = hub_id(name)
    if repo is None:
        raise FastvllmError(f"{name!r} is not a model directory, a well-known name or a hub id (ORG/NAME)",
                            fix=f"pass a local model directory, a hub id, or one of: {', '.join(WELL_KNOWN)}")
    path = cached_snapshot(repo)
    if path is None:
        short = next((n for n, r in WELL_KNOWN.items() if r == repo), None)
        stand_in = (f", or serve a random stand-in with its shapes: fastvllm make-model DIR --like {short}"
                    if short in model_maker.LIKE else "")
        raise FastvllmError(f"{repo} is not in the local Hugging Face cache {hub_cache_dir()} "
                            "(fastvllm never downloads models)",
                            fix=f"on a machine with hub access run `hf download {repo}` (huggingface-cli download "
                                f"on older huggingface_hub) with the same HF_HUB_CACHE and copy the cache here, "
                                f"then run with HF_HUB_OFFLINE=1; or pass a local model directory{stand_in}")
    return path
