"""gc against real processes: /dev/shm objects (on the real tmpfs, in a private directory
so other programs' objects are never at risk) held open, mapped, or hard-linked by a live
process are kept; unused ones go. A partial whose creator runs is kept; its creator killed
with SIGKILL, the next gc removes it. A process whose cwd is inside a partial protects it.
The real CLI with --dry-run and --json."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fastvllm import gc

pytestmark = pytest.mark.integration

HOLD_OPEN = "import sys, time; f = open(sys.argv[1], 'rb'); print('ready', flush=True); time.sleep(300)"
HOLD_MAPPED = ("import mmap, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
               "m = mmap.mmap(fd, 4096); os.close(fd); print('ready', flush=True); time.sleep(300)")
REGISTER = ("import sys, time; from pathlib import Path; from fastvllm import gc; "
            "gc.register_partial(Path(sys.argv[1])); print('ready', flush=True); time.sleep(300)")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = tmp_path / "run"
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(path))
    return path


@pytest.fixture
def shm():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="fastvllm-gc-test-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def spawn():
    procs = []

    def start(code: str, *args: str, cwd=None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd=cwd,
                                env=dict(os.environ))
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _names(items):
    return sorted(Path(i.path).name for i in items)


def test_shm_objects_a_live_process_uses_are_kept(run_dir, shm, spawn):
    for name in ("psm_open", "psm_mapped", "psm_free", "sem.mp-free"):
        (shm / name).write_bytes(b"\1" * 8192)
    os.link(shm / "psm_open", shm / "link_remap.7")  # CRIU's hard link of a live object
    os.link(shm / "psm_free", shm / "link_remap.8")
    opener = spawn(HOLD_OPEN, str(shm / "psm_open"))
    mapper = spawn(HOLD_MAPPED, str(shm / "psm_mapped"))  # fd closed: only /proc/PID/maps shows it

    dry = gc.collect(dry_run=True, shm_dir=shm, min_age_s=0)
    assert _names(dry.removed) == ["link_remap.8", "psm_free", "sem.mp-free"]
    assert len(os.listdir(shm)) == 6
    report = gc.collect(shm_dir=shm, min_age_s=0)
    assert _names(report.removed) == ["link_remap.8", "psm_free", "sem.mp-free"]
    kept = {Path(i.path).name: i.why for i in report.kept}
    assert kept == {"psm_open": f"in use by pid {opener.pid}", "link_remap.7": f"in use by pid {opener.pid}",
                    "psm_mapped": f"in use by pid {mapper.pid}"}
    assert sorted(os.listdir(shm)) == ["link_remap.7", "psm_mapped", "psm_open"]

    opener.kill()
    opener.wait()
    assert _names(gc.collect(shm_dir=shm, min_age_s=0).removed) == ["link_remap.7", "psm_open"]
    assert os.listdir(shm) == ["psm_mapped"]


def test_partial_of_a_running_snapshot_is_kept_and_removed_after_sigkill(run_dir, tmp_path, shm, spawn):
    partial = tmp_path / ".snap.partial-0badf00d"
    (partial / "criu").mkdir(parents=True)
    (partial / "criu" / "pages-1.img").write_bytes(os.urandom(1 << 20))
    creator = spawn(REGISTER, str(partial))
    report = gc.collect(shm_dir=shm, min_age_s=0)
    assert report.removed == [] and partial.exists()
    assert report.kept[0].why == f"its snapshot (pid {creator.pid}) is still running"
    creator.send_signal(signal.SIGKILL)  # no cleanup runs
    creator.wait()
    report = gc.collect(shm_dir=shm, min_age_s=3600)  # recorded and dead: no age needed
    assert [i.path for i in report.removed] == [str(partial)] and not partial.exists()


def test_a_process_working_inside_an_old_partial_protects_it(run_dir, tmp_path, shm, spawn):
    partial = tmp_path / ".snap.partial-12345678"
    partial.mkdir()
    (partial / "f").write_bytes(b"x")
    user = spawn("import time; print('ready', flush=True); time.sleep(300)", cwd=partial)
    report = gc.collect([tmp_path], shm_dir=shm, min_age_s=0)
    assert report.removed == [] and report.kept[0].why == f"in use by pid {user.pid}"
    user.kill()
    user.wait()
    assert [i.path for i in gc.collect([tmp_path], shm_dir=shm, min_age_s=0).removed] == [str(partial)]


def test_cli_gc_dry_run_and_json(run_dir, tmp_path, shm, spawn):
    partial = tmp_path / "snaps" / ".a.partial-aaaa1111"
    partial.mkdir(parents=True)
    (shm / "psm_gone").write_bytes(b"x" * 100)
    (shm / "psm_held").write_bytes(b"x" * 100)
    spawn(HOLD_OPEN, str(shm / "psm_held"))
    env = dict(os.environ, FASTVLLM_RUN_DIR=str(run_dir), **{gc.SHM_DIR_ENV: str(shm)})

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fastvllm.cli", "gc", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    proc = cli("--dry-run", "--min-age", "0", str(tmp_path / "snaps"))
    assert proc.returncode == 0, proc.stderr
    assert f"would remove partial {partial}" in proc.stdout and "would remove shm" in proc.stdout
    assert partial.exists() and (shm / "psm_gone").exists()
    proc = cli("--json", "--min-age", "0", str(tmp_path / "snaps"))
    out = json.loads(proc.stdout)
    assert out["dry_run"] is False and _names_json(out["removed"]) == [partial.name, "psm_gone"]
    assert not partial.exists() and sorted(os.listdir(shm)) == ["psm_held"]
    proc = cli(str(tmp_path / "nope"))
    assert proc.returncode == 1 and proc.stderr.startswith("fastvllm: error: ") and len(proc.stderr.splitlines()) == 1


def _names_json(items):
    return sorted(Path(i["path"]).name for i in items)


def test_cli_dry_run_on_the_real_dev_shm_removes_nothing(run_dir):
    env = {k: v for k, v in os.environ.items() if k != gc.SHM_DIR_ENV}
    env["FASTVLLM_RUN_DIR"] = str(run_dir)
    proc = subprocess.run([sys.executable, "-m", "fastvllm.cli", "gc", "--dry-run", "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dry_run"] is True
    shm = [i["path"] for i in out["removed"] if i["kind"] == "shm"]
    assert all(os.path.exists(p) for p in shm)  # reported, not removed
    assert all(gc.SHM_NAME.match(Path(p).name) for p in shm)


def test_snapshot_sweeps_debris_by_itself(run_dir, tmp_path, shm, spawn, tiny_model):
    """`fastvllm snapshot` runs the same sweep in the background while its server starts:
    a partial left by a SIGKILLed snapshot is gone after the next snapshot, even one that
    fails (here on a bad vLLM argument), without anyone running `fastvllm gc`."""
    partial = tmp_path / ".old.partial-0badf00d"
    (partial / "criu").mkdir(parents=True)
    (partial / "criu" / "pages-1.img").write_bytes(os.urandom(1 << 20))
    creator = spawn(REGISTER, str(partial))
    creator.send_signal(signal.SIGKILL)
    creator.wait()
    env = dict(os.environ, FASTVLLM_RUN_DIR=str(run_dir), FASTVLLM_GC_SHM_DIR=str(shm))
    proc = subprocess.run([sys.executable, "-m", "fastvllm.cli", "snapshot", tiny_model, "--out",
                           str(tmp_path / "new"), "--", "--no-such-vllm-flag"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode != 0
    assert not partial.exists(), proc.stderr[-2000:]
    assert f"gc (snapshot): removed 1 leftovers of killed commands" in proc.stderr, proc.stderr[-2000:]
    off = tmp_path / ".off.partial-0badf00d"
    off.mkdir()
    creator = spawn(REGISTER, str(off))
    creator.send_signal(signal.SIGKILL)
    creator.wait()
    proc = subprocess.run([sys.executable, "-m", "fastvllm.cli", "snapshot", tiny_model, "--out",
                           str(tmp_path / "new"), "--", "--no-such-vllm-flag"], capture_output=True, text=True,
                          env=dict(env, FASTVLLM_AUTO_GC="0"), timeout=600)
    assert off.exists(), "FASTVLLM_AUTO_GC=0 still swept"
