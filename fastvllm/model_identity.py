"""A model's identity from its bytes, not its file names and sizes.

The container's snapshot key covered the weight files by name and size only: a retrained
checkpoint with the same shapes has the same sizes, gets the old snapshot, and at level 0
(weights inside the image) the old model is served while the canary still matches
(issue 12, case 1). So a model is identified by

- every safetensors file's JSON header (tensor names, dtypes, shapes, offsets), digested:
  cheap, and it names *what* changed when shapes change;
- an xxh3-128 digest of every file's full content (weights and the small config,
  tokenizer and generation files vLLM reads), which catches same-shape retraining.

Hashing gigabytes at every container boot would cost seconds to minutes, so each file's
digest is cached in the run dir, keyed by what changes whenever its bytes do: device,
inode, size, mtime and ctime (ns). ctime is in the key as well as mtime because mtime can
be set back with ``utime`` and ctime cannot: a rewrite that restores the old mtime still
misses the cache. (A new hard link also changes ctime: that costs one rehash.) The cache
is one small JSON file per inode, written by rename, so concurrent boots never see half a
record. Files are found through symlinks (a Hugging Face cache snapshot links into blobs),
and the cache keys the target.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import FastvllmError
from .paths import run_dir

_MAX_HEADER = 100 << 20  # safetensors refuses headers over 100 MB too
# What vLLM reads from a model directory besides the weights (hidden files and the
# ``original/`` subfolder of some checkpoints are not read, so not part of the identity).
_META_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja", ".py")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_dir() -> Path:
    path = run_dir() / "model-hashes"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def identity(model_dir: Path, *, stats: dict | None = None) -> dict:
    """``{"digest": hex, "files": {name: {"size", "xxh3_128"[, "header_xxh3_128", "tensors"]}}}``.

    ``digest`` covers every file's name and content digest: one value for a snapshot key.
    ``stats`` (optional, filled in) counts files hashed and cache hits.
    """
    import xxhash

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FastvllmError(f"model directory {model_dir} does not exist", fix="check the path")
    counts = stats if stats is not None else {}
    counts.setdefault("hashed", 0)
    counts.setdefault("cached", 0)
    files = {}
    for path in _model_files(model_dir):
        entry = _file_entry(path, counts)
        files[path.name] = entry
    if not files:
        raise FastvllmError(f"{model_dir} holds no model files", fix="pass a model directory")
    total = xxhash.xxh3_128()
    for name, entry in sorted(files.items()):
        total.update(f"{name}\0{entry['size']}\0{entry['xxh3_128']}\n".encode())
    return {"digest": total.hexdigest(), "files": files}


def changed(recorded: dict, model_dir: Path, missing_ok: bool = False) -> list[str]:
    """What differs between a recorded identity and the model directory now (empty: same).
    ``missing_ok``: a recorded file that is gone is not a difference (no newer model there)."""
    now = identity(model_dir)
    was_files, now_files = recorded.get("files", {}), now["files"]
    out = []
    for name in sorted(set(was_files) | set(now_files)):
        was, cur = was_files.get(name), now_files.get(name)
        if was is None:
            out.append(f"{name}: new file")
        elif cur is None:
            if not missing_ok:
                out.append(f"{name}: missing")
        elif was.get("header_xxh3_128") and was["header_xxh3_128"] != cur.get("header_xxh3_128"):
            out.append(f"{name}: tensor table differs (names, shapes or dtypes)")
        elif was.get("size") != cur["size"]:
            out.append(f"{name}: size {was.get('size')} -> {cur['size']}")
        elif was.get("xxh3_128") != cur["xxh3_128"]:
            out.append(f"{name}: content differs (same size" + (" and tensor table)" if "header_xxh3_128" in cur else ")"))
    return out


def _model_files(model_dir: Path) -> list[Path]:
    out = []
    for path in sorted(model_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(_META_SUFFIXES):
            out.append(path)
    return out


def _file_entry(path: Path, counts: dict) -> dict:
    st = path.stat()  # follows symlinks: the blob behind a hub-cache link
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    record_path = cache_dir() / f"{st.st_dev}-{st.st_ino}.json"
    try:
        cached = json.loads(record_path.read_text())
        if cached.get("key") == key:
            counts["cached"] += 1
            return cached["entry"]
    except (OSError, ValueError, AttributeError):
        pass
    entry = {"size": st.st_size, "xxh3_128": hash_file(path)}
    counts["hashed"] += 1
    if path.name.endswith(".safetensors"):
        header = safetensors_header(path)
        import xxhash

        entry["header_xxh3_128"] = xxhash.xxh3_128_hexdigest(header)
        try:
            entry["tensors"] = sum(1 for k in json.loads(header) if k != "__metadata__")
        except ValueError:
            raise FastvllmError(f"{path} has a corrupt safetensors header", fix="re-save the checkpoint") from None
    after = path.stat()
    if [after.st_size, after.st_mtime_ns, after.st_ctime_ns] == key[2:]:  # unchanged while hashed
        tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "path": str(path), "entry": entry}))
        os.replace(tmp, record_path)
    return entry


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes (the expensive step the cache exists to skip): the same
    digest the snapshot's images are sealed with."""
    from .integrity import digest

    return digest(path)


def safetensors_header(path: Path) -> bytes:
    """The JSON header bytes of a safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise FastvllmError(f"{path} is too short to be a safetensors file", fix="re-save the checkpoint")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise FastvllmError(f"{path} has a safetensors header of {length} bytes", fix="re-save the checkpoint")
        header = fh.read(length)
    if len(header) != length:
        raise FastvllmError(f"{path} is truncated inside its safetensors header", fix="re-save the checkpoint")
    return header
