"""gc decisions on real files in private directories (no other processes involved here;
tests/integration/test_gc_processes.py has the live-process cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvllm import gc, registry


@pytest.fixture(autouse=True)
def own_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "run"))


@pytest.fixture
def shm(tmp_path):
    """A private sweep directory, so the real /dev/shm is never touched."""
    d = tmp_path / "shm"
    d.mkdir()
    return d


def _partial(parent: Path, name="snap", token="ab12cd34", size=4096) -> Path:
    p = parent / f".{name}.partial-{token}"
    (p / "criu").mkdir(parents=True)
    (p / "criu" / "pages-1.img").write_bytes(os.urandom(size))
    return p


def _dead_pid() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "import psutil,os; print(psutil.Process().create_time())"],
                            stdout=subprocess.PIPE, text=True)
    created = float(proc.stdout.read())
    proc.wait()
    return proc.pid, created


def test_register_unregister_roundtrip(tmp_path, shm):
    p = _partial(tmp_path)
    gc.register_partial(p)
    records = list(gc.partials_dir().glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["pid"] == os.getpid()
    report = gc.collect(shm_dir=shm)  # our own partial: we are alive
    assert report.removed == [] and [k.why for k in report.kept] == [f"its snapshot (pid {os.getpid()}) is still running"]
    assert p.exists()
    gc.unregister_partial(p)
    assert list(gc.partials_dir().glob("*.json")) == []


def test_registered_partial_of_a_dead_creator_is_removed(tmp_path, shm):
    p = _partial(tmp_path, size=1 << 20)
    pid, created = _dead_pid()
    gc._record_path(p).write_text(json.dumps({"path": str(p), "pid": pid, "create_time": created}))
    dry = gc.collect(dry_run=True, shm_dir=shm)
    assert [(i.kind, i.path) for i in dry.removed] == [("partial", str(p))] and p.exists()
    assert dry.bytes_freed >= 1 << 20
    report = gc.collect(shm_dir=shm)
    assert [(i.kind, i.path) for i in report.removed] == [("partial", str(p))]
    assert f"pid {pid}" in report.removed[0].why
    assert not p.exists() and list(gc.partials_dir().glob("*.json")) == []


def test_record_of_a_vanished_partial_is_dropped(tmp_path, shm):
    pid, created = _dead_pid()
    rec = gc._record_path(tmp_path / ".x.partial-1")
    rec.write_text(json.dumps({"path": str(tmp_path / ".x.partial-1"), "pid": pid, "create_time": created}))
    assert [i.kind for i in gc.collect(shm_dir=shm).removed] == ["partial-record"] and not rec.exists()


def test_unregistered_partials_by_path_need_age(tmp_path, shm):
    old = _partial(tmp_path, "old", "11111111")
    young = _partial(tmp_path, "young", "22222222")
    keep = tmp_path / "finished-snapshot"
    keep.mkdir()
    report = gc.collect([tmp_path], shm_dir=shm, min_age_s=3600)
    assert report.removed == [] and {i.path for i in report.kept} == {str(old), str(young)}
    assert all("younger than 3600 s" in i.why for i in report.kept)
    time.sleep(1.1)
    (young / "criu" / "pages-1.img").write_bytes(b"fresh")
    report = gc.collect([tmp_path], shm_dir=shm, min_age_s=1)
    assert [i.path for i in report.removed] == [str(old)] and [i.path for i in report.kept] == [str(young)]
    assert not old.exists() and young.exists() and keep.exists()


def test_a_partial_passed_itself_and_non_partials_are_left(tmp_path, shm):
    p = _partial(tmp_path)
    other = tmp_path / "data"
    other.mkdir()
    report = gc.collect([p, other], shm_dir=shm, min_age_s=0)
    assert [i.path for i in report.removed] == [str(p)] and other.exists()


def test_shm_names_and_age(shm):
    for name in ("psm_1a2b", "sem.mp-x7", "link_remap.12", "sem.mp-xb9vb_i_.cr.1.ghost", "notours", "sem.other",
                 "psm_1.txt"):
        (shm / name).write_bytes(b"x" * 32)
    report = gc.collect(shm_dir=shm, min_age_s=3600)
    assert report.removed == [] and len(report.kept) == 4
    report = gc.collect(shm_dir=shm, min_age_s=0)
    assert sorted(Path(i.path).name for i in report.removed) == [
        "link_remap.12", "psm_1a2b", "sem.mp-x7", "sem.mp-xb9vb_i_.cr.1.ghost"]
    assert sorted(os.listdir(shm)) == ["notours", "psm_1.txt", "sem.other"]


def test_shm_is_left_while_a_fastvllm_lock_is_held(shm, tmp_path):
    from fastvllm import locks

    (shm / "psm_abc").write_bytes(b"x")
    with locks.restore_lock(tmp_path):
        report = gc.collect(shm_dir=shm, min_age_s=0)
    assert report.removed == [] and "is running" in report.kept[0].why
    assert [Path(i.path).name for i in gc.collect(shm_dir=shm, min_age_s=0).removed] == ["psm_abc"]


def test_dead_and_corrupt_server_records_are_removed(shm):
    pid, created = _dead_pid()
    dead = registry.ServerRecord(root_pid=pid, pids=[pid], endpoint="http://127.0.0.1:1", model="m", how="serve",
                                 log="/dev/null", create_time=created)
    (registry.servers_dir() / f"{pid}.json").write_text(json.dumps(dead.__dict__))
    (registry.servers_dir() / "999999999.json").write_text("{not json")
    registry.add(registry.ServerRecord(root_pid=os.getpid(), pids=[os.getpid()], endpoint="http://127.0.0.1:2",
                                       model="m", how="serve", log="/dev/null"))
    dry = gc.collect(dry_run=True, shm_dir=shm)
    assert len(dry.removed) == 2 and len(list(registry.servers_dir().glob("*.json"))) == 3
    report = gc.collect(shm_dir=shm)
    assert sorted(i.why for i in report.removed) == [f"server pid {pid} is gone", "unreadable record"]
    assert [p.name for p in registry.servers_dir().glob("*.json")] == [f"{os.getpid()}.json"]


def test_shm_of_another_user_is_left(shm):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    (shm / "psm_theirs").write_bytes(b"x")
    os.chown(shm / "psm_theirs", 12345, 12345)
    report = gc.collect(shm_dir=shm, min_age_s=0)
    assert report.removed == [] and "owned by uid 12345" in report.kept[0].why


def test_model_hash_records_of_gone_or_changed_files_are_dropped(tmp_path, shm):
    from fastvllm import model_identity

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        (model / name).write_text("{}")
    model_identity.identity(model)
    assert len(list(model_identity.cache_dir().glob("*.json"))) == 3
    (model / "tokenizer.json").unlink()
    (model / "config.json").write_text('{"changed": 1}')
    report = gc.collect(shm_dir=shm)
    assert sorted(i.why.split(" ")[-1] for i in report.removed if i.kind == "model-hash-record") == \
        ["gone", "hashed"]
    assert len(list(model_identity.cache_dir().glob("*.json"))) == 1


def test_an_unbound_server_whose_fastvllm_died_is_killed_and_a_driven_one_is_not(shm):
    """A SIGKILLed snapshot/restore leaves its server unbound for ever (loading, released,
    half woken): gc kills that tree. One whose fastvllm still runs is left alone, and so is
    a bound server whatever became of the command that started it."""
    orphan = subprocess.Popen(["sleep", "60"])
    driven = subprocess.Popen(["sleep", "60"])
    bound = subprocess.Popen(["sleep", "60"])
    dead_owner, dead_created = _dead_pid()
    try:
        registry.add(registry.ServerRecord(root_pid=orphan.pid, pids=[orphan.pid], endpoint="unbound", model="m",
                                           how="restore", log="/dev/null", owner_pid=dead_owner,
                                           owner_create_time=dead_created))
        registry.add(registry.ServerRecord(root_pid=driven.pid, pids=[driven.pid], endpoint="unbound", model="m",
                                           how="snapshot", log="/dev/null"))  # owned by this (live) process
        registry.add(registry.ServerRecord(root_pid=bound.pid, pids=[bound.pid], endpoint="http://127.0.0.1:3",
                                           model="m", how="serve", log="/dev/null", owner_pid=dead_owner,
                                           owner_create_time=dead_created))
        assert [i.kind for i in gc.collect(dry_run=True, shm_dir=shm).removed] == ["orphan-server"]
        assert orphan.poll() is None, "a dry run kills nothing"
        report = gc.collect(shm_dir=shm)
        assert [i.kind for i in report.removed] == ["orphan-server"] and str(orphan.pid) in report.removed[0].why
        orphan.wait(timeout=10)  # gc reaped it already (it is our child here)
        import psutil

        assert not psutil.pid_exists(orphan.pid)
        assert driven.poll() is None and bound.poll() is None
        assert sorted(int(p.stem) for p in registry.servers_dir().glob("*.json")) == sorted([driven.pid, bound.pid])
    finally:
        for proc in (orphan, driven, bound):
            proc.kill()
            proc.wait()
