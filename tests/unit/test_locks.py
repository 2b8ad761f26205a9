"""Locks on real files in a private run dir: a second holder is refused with one line."""

from __future__ import annotations

import os

import pytest

from fastvllm import locks
from fastvllm.locks import LockBusy


@pytest.fixture(autouse=True)
def own_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("FASTVLLM_CRIU_NAMES_LOCK", str(tmp_path / "criu-names.lock"))


def test_second_restore_of_one_snapshot_is_refused_naming_the_first(tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    with locks.restore_lock(snap) as me:
        assert me["pid"] == os.getpid()
        with pytest.raises(LockBusy) as info:
            with locks.restore_lock(snap):
                pass
        line = str(info.value)
        assert "\n" not in line and f"pid {os.getpid()}" in line and me["since"] in line
        assert str(snap.resolve()) in line and "wait for it" in line
        assert locks.holder(locks.restore_lock_path(snap))["pid"] == os.getpid()
    assert locks.holder(locks.restore_lock_path(snap)) is None
    with locks.restore_lock(snap):  # free again
        pass


def test_the_same_snapshot_by_another_path_is_the_same_lock(tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    (tmp_path / "alias").symlink_to(snap)
    with locks.restore_lock(snap):
        with pytest.raises(LockBusy):
            with locks.restore_lock(tmp_path / "alias"):
                pass


def test_different_snapshots_restore_side_by_side(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with locks.restore_lock(tmp_path / "a"), locks.restore_lock(tmp_path / "b"):
        pass


def test_one_dump_per_host(tmp_path):
    with locks.dump_lock():
        with pytest.raises(LockBusy, match="snapshot .CRIU dump. is running: pid .*link_remap"):
            with locks.dump_lock():
                pass
    with locks.dump_lock():
        pass


def test_lock_dir_is_private_and_fd_not_inherited(tmp_path):
    with locks.dump_lock():
        assert locks.locks_dir().stat().st_mode & 0o777 == 0o700
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
        lock_fds = [fd for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}") == str(locks.dump_lock_path())]
        assert lock_fds and all(not os.get_inheritable(fd) for fd in lock_fds)


def test_criu_names_lock_waits_for_a_short_holder_and_names_a_long_one():
    """Dumps and restores of different snapshots share CRIU's /dev/shm names: the second
    waits for the first (seconds), and only past its wait is refused, naming the holder."""
    import threading
    import time

    held, release = threading.Event(), threading.Event()

    def hold():
        with locks.criu_names_lock(what="restore of A (CRIU)"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    with pytest.raises(LockBusy) as info:
        with locks.criu_names_lock(wait_s=0.2, what="restore of B (CRIU)"):
            pass
    line = str(info.value)
    assert "another restore of A (CRIU) is running (waited 0.2 s)" in line and f"pid {os.getpid()}" in line
    threading.Timer(0.3, release.set).start()
    start = time.monotonic()
    with locks.criu_names_lock(wait_s=10):
        assert time.monotonic() - start >= 0.2  # it waited for the holder, then got it
    holder.join()
