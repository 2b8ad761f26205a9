"""Prefetch against the real page cache: evict / warm / evict, vanished files, vmtouch crashing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from fastvllm import prefetch

pytestmark = pytest.mark.integration

BACKENDS = ["fallback", pytest.param("vmtouch", marks=pytest.mark.skipif(
    not shutil.which("vmtouch"), reason="vmtouch not installed"))]
SIZE = 64 << 20


def _fstype(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (longest matching mount point)."""
    path = path.resolve()
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, fs, *_ = line.split()
        mnt = mnt.replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, fs
    return kind


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on a real disk: on tmpfs, pages cannot be evicted (they *are* the file)."""
    if _fstype(tmp_path) not in ("tmpfs", "ramfs"):
        yield tmp_path
        return
    for base in (Path("/var/tmp"), Path(__file__).resolve().parents[2] / ".pytest-prefetch-tmp"):
        base.mkdir(exist_ok=True)
        if _fstype(base) not in ("tmpfs", "ramfs"):
            d = Path(tempfile.mkdtemp(prefix="prefetch-", dir=base))
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
    pytest.skip("no disk-backed directory available")


def _random_file(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // (8 << 20)):
            f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted
    os.sync()
    return path


def _fraction(path: Path) -> float:
    (r,) = prefetch.residency([path])
    assert r.size == path.stat().st_size
    return r.fraction


@pytest.mark.parametrize("kind", BACKENDS)
def test_evict_warm_evict(kind, disk_dir, monkeypatch):
    monkeypatch.setenv(prefetch.ENV_BACKEND, kind)
    f = _random_file(disk_dir / "big.bin")

    prefetch.evict([f])
    assert _fraction(f) < 0.10

    st = prefetch.warm([f], workers=2)
    assert _fraction(f) > 0.90  # measured at once: this VM's host trims the cache over seconds
    assert st["backend"] == kind and st["bytes"] == SIZE and st["skipped"] == []
    ((path, start, end),) = st["files"]
    assert path == str(f) and 0 <= start <= end <= st["seconds"]

    prefetch.evict([f])
    assert _fraction(f) < 0.10


@pytest.mark.parametrize("kind", BACKENDS)
def test_residency_backends_agree(kind, disk_dir, monkeypatch):
    monkeypatch.setenv(prefetch.ENV_BACKEND, kind)
    f = _random_file(disk_dir / "half.bin", 16 << 20)
    empty = disk_dir / "empty"
    empty.touch()
    prefetch.evict([f])
    with open(f, "rb") as fh:
        fh.read(8 << 20)  # the first half (plus readahead)
    r, e = prefetch.residency([f, empty])
    assert 0.4 < r.fraction <= 1.0
    assert (e.size, e.resident_bytes, e.fraction) == (0, 0, 1.0)


@pytest.mark.parametrize("kind", BACKENDS)
def test_vanished_file_in_the_middle(kind, disk_dir, monkeypatch, capsys):
    monkeypatch.setenv(prefetch.ENV_BACKEND, kind)
    a = _random_file(disk_dir / "a.bin", 16 << 20)
    gone = _random_file(disk_dir / "gone.bin", 8 << 20)
    b = _random_file(disk_dir / "b.bin", 16 << 20)
    prefetch.evict([a, gone, b])
    gone.unlink()

    pf = prefetch.Prefetcher([a, gone, b], workers=2).start()
    assert pf.wait(60)
    assert _fraction(a) > 0.90 and _fraction(b) > 0.90
    assert pf.stats["bytes"] == 32 << 20
    assert [p for p, _ in pf.stats["skipped"]] == [str(gone)]
    assert "gone.bin" in pf.stats["error"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "restore continues without it" in err[0]


@pytest.mark.parametrize("script, expect", [
    ("#!/bin/sh\necho 'vmtouch: FATAL: boom' >&2\nexit 1\n", "vmtouch exit 1: vmtouch: FATAL: boom"),
    ("#!/bin/sh\nkill -9 $$\n", "vmtouch killed by signal 9"),
])
def test_vmtouch_crashes(script, expect, disk_dir, monkeypatch, capsys):
    bindir = disk_dir / "bin"
    bindir.mkdir()
    fake = bindir / "vmtouch"
    fake.write_text(script)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv(prefetch.ENV_BACKEND, "vmtouch")
    files = [_random_file(disk_dir / f"f{i}.bin", 8 << 20) for i in range(3)]

    pf = prefetch.Prefetcher(files, workers=2).start()
    assert pf.wait(60)
    assert expect in pf.stats["error"]
    assert "end_s" in pf.stats
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("fastvllm: prefetch: failed (PrefetchError: vmtouch")


def test_vmtouch_removed_mid_run(disk_dir, monkeypatch, capsys):
    """The first file warms with a working vmtouch, which then disappears from PATH."""
    if not shutil.which("vmtouch"):
        pytest.skip("vmtouch not installed")
    bindir = disk_dir / "bin"
    bindir.mkdir()
    fake = bindir / "vmtouch"
    fake.write_text(f"#!/bin/sh\n/bin/rm -f \"$0\"\nexec {shutil.which('vmtouch')} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv(prefetch.ENV_BACKEND, "vmtouch")
    a = _random_file(disk_dir / "a.bin", 8 << 20)
    b = _random_file(disk_dir / "b.bin", 8 << 20)

    pf = prefetch.Prefetcher([a, b], workers=1).start()
    assert pf.wait(60)
    assert "vmtouch" in pf.stats["error"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
