"""The run directory is trusted only when it is ours, private and not a symlink (real dirs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastvllm import paths, run_dir_check
from fastvllm.run_dir_check import RunDirUnsafe


def test_a_fresh_private_dir_passes(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    assert run_dir_check.check(d) == d


def test_a_readable_dir_of_ours_is_tightened(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(0o755)
    run_dir_check.check(d)
    assert d.stat().st_mode & 0o777 == 0o700


def test_a_dir_writable_by_others_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(RunDirUnsafe, match="writable by others.*0777.*chmod 700"):
        run_dir_check.check(d)
    assert d.stat().st_mode & 0o777 == 0o777  # left for the user to inspect


def test_a_symlink_is_refused_even_to_a_good_dir(tmp_path):
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(target)
    with pytest.raises(RunDirUnsafe, match="is a symlink"):
        run_dir_check.check(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by another user")
def test_a_dir_owned_by_someone_else_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(RunDirUnsafe, match="owned by uid 12345"):
        run_dir_check.check(d)


def test_paths_run_dir_applies_the_check(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(d))
    with pytest.raises(RunDirUnsafe):
        paths.run_dir()


def test_cli_says_one_line_for_a_planted_run_dir(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(target)
    env = dict(os.environ, FASTVLLM_RUN_DIR=str(link))
    proc = subprocess.run([sys.executable, "-m", "fastvllm.cli", "ps"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("fastvllm: error: ")
    assert "symlink" in proc.stderr and "FASTVLLM_RUN_DIR" in proc.stderr
