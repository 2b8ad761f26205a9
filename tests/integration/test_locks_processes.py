"""Locks between real processes: a second process is refused with the holder's PID and
command; a holder killed with SIGKILL releases its lock (flock dies with the process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fastvllm import locks
from fastvllm.locks import LockBusy

pytestmark = pytest.mark.integration

HOLDER = """
import sys, time
from pathlib import Path
from fastvllm import locks
with locks.restore_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = tmp_path / "run"
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(path))
    return path


def _start_holder(snap, tag: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(snap), tag], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_processes_one_restore_lock_and_sigkill_releases_it(run_dir, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    first = _start_holder(snap, "first-holder")
    try:
        with pytest.raises(LockBusy) as info:
            with locks.restore_lock(snap):
                pass
        line = str(info.value)
        assert f"pid {first.pid}" in line and "first-holder" in line and "\n" not in line

        # A third process, too, is told who holds it.
        probe = subprocess.run([sys.executable, "-c", HOLDER, str(snap), "second"], capture_output=True,
                               text=True, env=dict(os.environ), timeout=60)
        assert probe.returncode != 0 and f"pid {first.pid}" in probe.stderr

        os.kill(first.pid, signal.SIGKILL)  # no cleanup code runs
        first.wait(timeout=30)
        deadline = time.monotonic() + 10
        while locks.holder(locks.restore_lock_path(snap)) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with locks.restore_lock(snap) as me:
            assert me["pid"] == os.getpid()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_child_started_under_the_lock_does_not_keep_it(run_dir, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    with locks.restore_lock(snap):
        child = subprocess.Popen(["sleep", "60"], close_fds=False)  # even without close_fds
    try:
        with locks.restore_lock(snap):
            pass
    finally:
        child.kill()
        child.wait()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie no longer holds anything
    except FileNotFoundError:
        return False


HANDS_OVER = """
import subprocess, sys, time
from pathlib import Path
from fastvllm import locks
with locks.restore_lock(Path(sys.argv[1])) as lock:
    heir = subprocess.Popen(["sleep", "2"], pass_fds=(lock["fd"],), start_new_session=True)
    print(heir.pid, flush=True)
    time.sleep(120)
"""


def test_a_lock_inherited_by_a_cleaner_is_waited_for_after_its_holder_is_killed(run_dir, tmp_path):
    """As the orphan guard inherits a restore's lock: the holder SIGKILLed, the heir keeps the
    lock until it is done; the next restore waits for it (its record names a dead PID)
    instead of failing or starting in the middle of the clean-up."""
    snap = tmp_path / "snap"
    snap.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HANDS_OVER, str(snap)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    heir = int(holder.stdout.readline())
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert locks.holder(locks.restore_lock_path(snap)) is not None, "the heir holds it"
    start = time.monotonic()
    with locks.restore_lock(snap) as me:
        waited = time.monotonic() - start
        assert me["pid"] == os.getpid()
        assert not _running(heir), "taken while the heir still held it"
    assert 0.5 < waited < 10, waited
