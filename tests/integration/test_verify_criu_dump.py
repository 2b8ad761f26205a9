"""``fastvllm verify`` on a real CRIU dump of a small process: sealed right after the dump,
intact it passes; one flipped byte in a pages image is named, and the exit status is 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvllm import criu_ops, integrity, manifest

pytestmark = pytest.mark.integration

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build tests/programs/memhog.c")
    criu = criu_ops.find_criu()
    work = tmp_path_factory.mktemp("verify")
    binary = work / "memhog"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(PROGRAMS / "memhog.c")], check=True)
    log = work / "stdout.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(binary), "16", str(work / "report.txt"), "fill"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not log.read_text().startswith("ready"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    snap = work / "snap"
    try:
        criu_ops.dump_tree(criu, proc.pid, snap / manifest.CRIU_DIR)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sealed = integrity.seal(snap / manifest.CRIU_DIR)
    (snap / manifest.MANIFEST).write_text(json.dumps({"format": manifest.FORMAT, "format_version": 1,
                                                      "images": sealed, "files": manifest.file_sizes(snap)}))
    return snap


def _verify(snap) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastvllm.cli", "verify", "--json", str(snap)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)


def test_real_dump_verifies_then_a_flipped_page_byte_is_named(dumped, tmp_path):
    proc = _verify(dumped)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    pages = [f["path"] for f in report["files"] if Path(f["path"]).name.startswith("pages-")]
    assert pages and all(f["verdict"] == "ok" for f in report["files"])
    assert report["bytes_read"] >= 16 << 20  # memhog's 16 MiB are in the images

    copy = tmp_path / "copy"
    shutil.copytree(dumped, copy)
    victim = max((copy / p for p in pages), key=lambda p: p.stat().st_size)
    victim.chmod(0o600)
    with open(victim, "r+b") as fh:
        fh.seek(victim.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    proc = _verify(copy)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvllm: error: ")
    assert f"criu/{victim.name} does not match its xxh3-128 digest" in lines[0]
    bad = [f for f in json.loads(proc.stdout)["files"] if f["verdict"] != "ok"]
    assert [f["path"] for f in bad] == [f"criu/{victim.name}"]
