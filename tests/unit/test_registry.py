"""The registry finds live servers by PID, URL or port, and forgets dead or corrupt ones."""

from __future__ import annotations

import json
import subprocess
import time

import psutil
import pytest

from fastvllm import registry
from fastvllm.registry import ServerRecord


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def sleeper():
    procs = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "30"])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _record(pid: int, port: int = 8123, pids: list[int] | None = None) -> ServerRecord:
    return ServerRecord(root_pid=pid, pids=pids or [pid], endpoint=f"http://127.0.0.1:{port}", model="/m/tiny",
                        how="restore", log="/var/tmp/x.log", snapshot="/snaps/a")


def test_add_live_find_and_stale(run_dir, sleeper):
    proc = sleeper()
    added = registry.add(_record(proc.pid, pids=[proc.pid, 999_999_999]))
    path = run_dir / "servers" / f"{proc.pid}.json"
    assert path.is_file()
    assert json.loads(path.read_text())["root_pid"] == proc.pid
    assert added.create_time > 0
    assert not list((run_dir / "servers").glob("*.tmp"))

    live = registry.live()
    assert [r.root_pid for r in live] == [proc.pid]
    assert live[0].endpoint == "http://127.0.0.1:8123" and live[0].snapshot == "/snaps/a"

    for target in (str(proc.pid), "999999999", "http://127.0.0.1:8123", "http://127.0.0.1:8123/", ":8123"):
        assert [r.root_pid for r in registry.find(target)] == [proc.pid], target
    for target in (":8124", "8123", "http://127.0.0.1:812", "12345678"):
        assert registry.find(target) == [], target

    proc.kill()
    proc.wait()
    assert registry.live() == []
    assert not path.exists()
    assert registry.find(str(proc.pid)) == []


def test_zombie_is_not_live(run_dir, sleeper):
    proc = sleeper()
    registry.add(_record(proc.pid))
    proc.kill()  # not reaped: the PID stays, as a zombie
    deadline = time.monotonic() + 5
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    assert registry.live() == []


def test_two_servers_are_told_apart(run_dir, sleeper):
    a, b = sleeper(), sleeper()
    registry.add(_record(a.pid, port=8001))
    registry.add(_record(b.pid, port=8002))
    assert sorted(r.root_pid for r in registry.live()) == sorted([a.pid, b.pid])
    assert [r.root_pid for r in registry.find(":8002")] == [b.pid]
    assert [r.root_pid for r in registry.find(str(a.pid))] == [a.pid]
    registry.remove(a.pid)
    registry.remove(a.pid)  # twice is harmless
    assert [r.root_pid for r in registry.live()] == [b.pid]


def test_reused_pid_is_not_trusted(run_dir, sleeper):
    proc = sleeper()
    registry.add(_record(proc.pid))
    path = run_dir / "servers" / f"{proc.pid}.json"
    data = json.loads(path.read_text())
    data["create_time"] -= 3600  # the recorded process started an hour earlier: another process
    path.write_text(json.dumps(data))
    assert registry.live() == []
    assert not path.exists()


def test_corrupt_record_is_dropped(run_dir, sleeper):
    proc = sleeper()
    registry.add(_record(proc.pid))
    servers = run_dir / "servers"
    (servers / "111.json").write_text("{ this is not json")
    (servers / "222.json").write_text(json.dumps({"root_pid": 222, "unexpected": True}))
    (servers / "333.json").write_bytes(b"\xff\xfe\x00")
    assert [r.root_pid for r in registry.live()] == [proc.pid]
    assert sorted(p.name for p in servers.iterdir()) == [f"{proc.pid}.json"]


def test_record_of_missing_process(run_dir):
    gone = 999_999_999
    registry.add(_record(gone))
    assert (run_dir / "servers" / f"{gone}.json").exists()
    assert registry.live() == []
    assert not (run_dir / "servers" / f"{gone}.json").exists()
