"""``fastvllm verify`` on real sealed files (integrity.seal) in a snapshot-shaped directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastvllm import integrity, manifest, verify
from fastvllm.errors import SnapshotInvalid


@pytest.fixture
def snap(tmp_path):
    root = tmp_path / "snap"
    (root / "criu").mkdir(parents=True)
    (root / "external").mkdir()
    (root / "criu" / "pages-1.img").write_bytes(os.urandom(64 * 1024))
    (root / "criu" / "pstree.img").write_bytes(b"tree")
    (root / "external" / "0000-psm_1").write_bytes(b"ring" * 100)
    sealed = integrity.seal(root / "criu")
    (root / "manifest.json").write_text(json.dumps({"format": manifest.FORMAT, "format_version": 1,
                                                    "images": sealed, "files": manifest.file_sizes(root)}))
    return root


def _flip(path, offset):
    path.chmod(0o600)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_intact_snapshot_every_file_has_a_verdict(snap):
    report = verify.verify_snapshot(snap)
    assert report.ok
    assert {f.path: f.verdict for f in report.files} == {
        "criu/pages-1.img": "ok", "criu/pstree.img": "ok", "external/0000-psm_1": "size-ok"}
    assert report.bytes_read == 64 * 1024 + 4


def test_a_flipped_byte_in_a_page_image_is_found(snap):
    _flip(snap / "criu" / "pages-1.img", 40000)
    report = verify.verify_snapshot(snap)
    assert not report.ok
    assert [(f.path, f.verdict) for f in report.bad] == [("criu/pages-1.img", "changed")]
    assert "criu/pages-1.img does not match its xxh3-128 digest" in report.problem()


def test_missing_extra_and_resized_files(snap):
    (snap / "criu" / "pstree.img").unlink()
    (snap / "criu" / "pages-9.img").write_bytes(b"planted")
    (snap / "external" / "0000-psm_1").write_bytes(b"short")
    verdicts = {f.path: f.verdict for f in verify.verify_snapshot(snap).files}
    assert verdicts == {"criu/pages-1.img": "ok", "criu/pstree.img": "missing", "criu/pages-9.img": "unsealed",
                        "external/0000-psm_1": "changed"}


def test_nothing_to_verify_against(tmp_path, snap):
    with pytest.raises(SnapshotInvalid, match="no manifest.json"):
        verify.verify_snapshot(tmp_path)
    record = json.loads((snap / "manifest.json").read_text())
    del record["images"]
    (snap / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(SnapshotInvalid, match="no image digests"):
        verify.verify_snapshot(snap)


def _cli(*args, run_dir):
    env = dict(os.environ, FASTVLLM_RUN_DIR=str(run_dir))
    return subprocess.run([sys.executable, "-m", "fastvllm.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_verify_ok_and_json(snap, tmp_path):
    proc = _cli("verify", str(snap), run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "ok        criu/pages-1.img" in proc.stdout and "3 files" in proc.stdout
    proc = _cli("verify", "--json", str(snap), run_dir=tmp_path / "run")
    out = json.loads(proc.stdout)
    assert out["ok"] and len(out["files"]) == 3


def test_cli_verify_exits_1_with_one_line_naming_the_file(snap, tmp_path):
    _flip(snap / "criu" / "pages-1.img", 7)
    proc = _cli("verify", "--json", str(snap), run_dir=tmp_path / "run")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ok"] is False
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvllm: error: ") and "criu/pages-1.img" in lines[0]
    proc = _cli("verify", str(tmp_path / "nope"), run_dir=tmp_path / "run")
    assert proc.returncode == 1 and proc.stderr.startswith("fastvllm: error: ") and "Traceback" not in proc.stderr
