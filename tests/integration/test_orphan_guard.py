"""The orphan guard with real processes: an owner that starts a session-leading tree (as
``snapshot`` starts a server) and is SIGKILLed has its tree killed and its paths removed;
a released guard touches nothing; a watched PID that existed before the guard is spared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

OWNER = textwrap.dedent("""
    import json, subprocess, sys, time
    from fastvllm.orphan_guard import OrphanGuard
    guard = OrphanGuard().start()
    spec = json.loads(sys.argv[1])
    # a server-like tree: its own session, a root with two children
    tree = subprocess.Popen(["bash", "-c", "sleep 1000 & sleep 1000 & wait"], start_new_session=True)
    guard.watch_pids(spec["watch"])
    guard.remove_paths(spec["paths"])
    time.sleep(0.5)  # the guard notes children every 100 ms
    if spec["release"]:
        guard.release()
    print(json.dumps({"tree": tree.pid}), flush=True)
    time.sleep(1000)
""")


def _session(sid: int) -> list[int]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                out.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return out


def _start_owner(tmp_path: Path, release: bool, watch: list[int]) -> tuple[subprocess.Popen, int, list[Path]]:
    partial = tmp_path / ".snap.partial-x"
    partial.mkdir()
    (partial / "pages-1.img").write_bytes(b"x" * 4096)
    loose = tmp_path / "loose-file"
    loose.write_text("put back")
    spec = {"release": release, "watch": watch, "paths": [str(partial), str(loose)]}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    tree = json.loads(owner.stdout.readline())["tree"]
    deadline = time.monotonic() + 10
    while len(_session(tree)) < 3:  # bash and its two sleeps
        assert time.monotonic() < deadline, _session(tree)
        time.sleep(0.05)
    return owner, tree, [partial, loose]


def _wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def test_a_sigkilled_owner_has_its_tree_killed_and_its_paths_removed(tmp_path):
    owner, tree, paths = _start_owner(tmp_path, release=False, watch=[])
    members = _session(tree)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    assert _wait_gone(members) == [], "the tree outlived its SIGKILLed owner"
    deadline = time.monotonic() + 10
    while any(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.exists() for p in paths)


def test_a_released_guard_leaves_the_tree_alone(tmp_path):
    owner, tree, paths = _start_owner(tmp_path, release=True, watch=[])
    members = _session(tree)
    try:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        time.sleep(1.5)
        assert sorted(_session(tree)) == sorted(members), "a released guard killed the tree"
        assert all(p.exists() for p in paths)
    finally:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_watched_pid_that_existed_before_the_guard_is_spared(tmp_path):
    bystander = subprocess.Popen(["sleep", "1000"])
    time.sleep(1.2)  # older than the guard's one second of slack
    try:
        owner, tree, _ = _start_owner(tmp_path, release=False, watch=[bystander.pid])
        members = _session(tree)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        assert _wait_gone(members) == []
        assert bystander.poll() is None, "the guard killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
