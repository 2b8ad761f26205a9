"""Page-cache prefetch: vmtouch output parsing, restore file order, backend choice, no-raise."""

from __future__ import annotations

import os
import shutil

import pytest

from fastvllm import prefetch

# Captured from vmtouch 1.3.1 (Debian): `vmtouch -m 1048576G -v -- FILE`.
ONE_FILE = (
    "/tmp/vt1\n"
    "\r[OOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOO] 245/245"
    "\r[OOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOO] 245/245\n"
    "\n"
    "           Files: 1\n"
    "     Directories: 0\n"
    "  Resident Pages: 245/245  980K/980K  100%\n"
    "         Elapsed: 7.6e-05 seconds\n"
)

# Captured: three files, the middle one empty (vmtouch prints nothing for it), the first
# partially resident ("o" marks partly resident bar cells).
MULTI_FILE = (
    "/tmp/vt1\n"
    "\r[oOOOoo ooOOo oooOOoOooooooOoOOOoOoooOOOOOoooOOoOo] 181/245"
    "\r[oOOOoo ooOOo oooOOoOooooooOoOOOoOoooOOOOOoooOOoOo] 181/245\n"
    "/tmp/e1\n"
    "\r[OOO] 3/3\r[OOO] 3/3\n"
    "\n"
    "           Files: 3\n"
    "     Directories: 0\n"
    "  Resident Pages: 184/248  736K/992K  74.2%\n"
    "         Elapsed: 0.00012 seconds\n"
)

# Captured: only an empty file.
EMPTY_ONLY = "\n           Files: 1\n     Directories: 0\n  Resident Pages: 0/0  0/0  \n         Elapsed: 9e-06 seconds\n"

# Captured: a cold 200 MB file (wide bar, nothing resident).
COLD = (
    "/tmp/vt3\n"
    "\r[                                                            ] 0/48829"
    "\r[                                                            ] 0/48829\n"
    "\n"
    "           Files: 1\n"
    "     Directories: 0\n"
    "  Resident Pages: 0/48829  0/190M  0%\n"
    "         Elapsed: 0.002851 seconds\n"
)


def test_parse_vmtouch_one_file():
    assert prefetch.parse_vmtouch(ONE_FILE) == {"/tmp/vt1": (245, 245)}


def test_parse_vmtouch_multi_file_skips_empty():
    assert prefetch.parse_vmtouch(MULTI_FILE) == {"/tmp/vt1": (181, 245), "/tmp/e1": (3, 3)}


def test_parse_vmtouch_no_files_and_cold():
    assert prefetch.parse_vmtouch(EMPTY_ONLY) == {}
    assert prefetch.parse_vmtouch(COLD) == {"/tmp/vt3": (0, 48829)}
    assert prefetch.parse_vmtouch("") == {}


def test_residency_fraction():
    assert prefetch.Residency("a", 0, 0).fraction == 1.0
    assert prefetch.Residency("a", 100, 25).fraction == 0.25
    assert prefetch.Residency("a", 100, 4096).fraction == 1.0


def _write(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_ordered_files(tmp_path):
    snap = tmp_path / "snap"
    criu = snap / "criu"
    _write(criu / "pages-1.img", 300)
    _write(criu / "pages-2.img", 5000)
    _write(criu / "pages-3.img", 1200)
    _write(criu / "core-1.img", 10)
    _write(criu / "inventory.img", 10)
    (criu / "pages-9.img").mkdir()  # not a regular file
    _write(snap / "external" / "0001-log", 50)
    _write(snap / "external" / "0000-shm", 50)
    w1 = _write(tmp_path / "w" / "b.safetensors", 10)
    w2 = _write(tmp_path / "w" / "a.safetensors", 10)
    missing = tmp_path / "w" / "gone.safetensors"

    got = prefetch.ordered_files(snap, [str(w1), str(missing), str(w2)])

    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "snap/criu/core-1.img", "snap/criu/inventory.img",
        "snap/criu/pages-2.img", "snap/criu/pages-3.img", "snap/criu/pages-1.img",
        "snap/external/0000-shm", "snap/external/0001-log",
        "w/b.safetensors", "w/a.safetensors",
    ]


def test_ordered_files_without_dirs(tmp_path):
    assert prefetch.ordered_files(tmp_path / "nothing", []) == []


def test_backend_selection(monkeypatch, tmp_path):
    monkeypatch.delenv(prefetch.ENV_BACKEND, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no vmtouch here
    assert prefetch.backend() == "fallback"
    fake = tmp_path / "vmtouch"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert prefetch.backend() == "vmtouch"
    monkeypatch.setenv(prefetch.ENV_BACKEND, "fallback")
    assert prefetch.backend() == "fallback"
    monkeypatch.setenv(prefetch.ENV_BACKEND, "vmtouch")
    monkeypatch.setenv("PATH", "")
    assert prefetch.backend() == "vmtouch"  # forced, even if it will then fail


BACKENDS = ["fallback"] + (["vmtouch"] if shutil.which("vmtouch") else [])


@pytest.mark.parametrize("kind", BACKENDS)
def test_prefetcher_skips_missing_and_warms_rest(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(prefetch.ENV_BACKEND, kind)
    a = _write(tmp_path / "a", 10000)
    b = _write(tmp_path / "b", 20000)
    paths = [a, tmp_path / "missing", b, tmp_path / "no-such-dir" / "f", tmp_path]
    pf = prefetch.Prefetcher(paths, workers=2).start()
    assert pf.wait(30)
    st = pf.stats
    assert st["backend"] == kind
    assert st["bytes"] == 30000
    assert [f[0] for f in st["files"]] == [str(a), str(b)]
    assert {p for p, _ in st["skipped"]} == {str(tmp_path / "missing"), str(tmp_path / "no-such-dir" / "f"),
                                            str(tmp_path)}
    assert "missing" in st["error"] and "2 more" in st["error"]
    assert 0 <= st["start_s"] <= st["end_s"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("fastvllm: prefetch: ") and err[0].endswith("; restore continues without it")


def test_prefetcher_uses_fallback_without_vmtouch(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(prefetch.ENV_BACKEND, raising=False)
    monkeypatch.setenv("PATH", "")
    a = _write(tmp_path / "a", 5000)
    pf = prefetch.Prefetcher([a]).start()
    assert pf.wait(30)
    assert pf.stats["backend"] == "fallback"
    assert pf.stats["error"] is None
    assert pf.stats["bytes"] == 5000
    assert capsys.readouterr().err == ""


def test_prefetcher_forced_vmtouch_missing_records_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(prefetch.ENV_BACKEND, "vmtouch")
    monkeypatch.setenv("PATH", "")
    pf = prefetch.Prefetcher([_write(tmp_path / "a", 10)]).start()
    assert pf.wait(30)
    assert "vmtouch not found" in pf.stats["error"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_prefetcher_never_raises(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise PermissionError("denied")

    monkeypatch.setattr(prefetch, "warm", boom)
    t0 = __import__("time").monotonic() - 5.0
    pf = prefetch.Prefetcher([tmp_path / "a"], t0=t0).start()
    assert pf.wait(30)
    assert pf.stats["error"] == "PermissionError: denied"
    assert pf.stats["start_s"] >= 5.0
    assert capsys.readouterr().err.count("\n") == 1


def test_wait_before_start_is_false():
    assert prefetch.Prefetcher([]).wait(0) is False


def test_warm_keeps_list_order(tmp_path, monkeypatch):
    monkeypatch.setenv(prefetch.ENV_BACKEND, "fallback")
    files = [_write(tmp_path / f"f{i}", 1000 * (i + 1)) for i in range(8)]
    st = prefetch.warm(files, workers=3)
    assert [f[0] for f in st["files"]] == [str(f) for f in files]
    starts = [f[1] for f in st["files"]]
    assert starts == sorted(starts)
    assert st["bytes"] == sum(os.path.getsize(f) for f in files)
