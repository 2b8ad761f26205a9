"""The container entrypoint's decisions, on real files and real processes (no Docker here:
tests/integration/test_docker.py runs it in containers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvllm import manifest
from fastvllm.container import logs, main, supervisor
from fastvllm.container.config import Config
from fastvllm.container.identity import check_matches, snapshot_path
from fastvllm.errors import FastvllmError, SnapshotInvalid


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "models" / "tiny model"
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\0" * 1024)
    return path


def test_config_from_env_and_arguments():
    env = {"FASTVLLM_MODEL": "/m", "FASTVLLM_VLLM_ARGS": "--enforce-eager --max-model-len 256",
           "FASTVLLM_PORT": "8123", "FASTVLLM_SNAPSHOT_ON_MISS": "1", "FASTVLLM_SNAPSHOT_DIR": "/snaps"}
    cfg = Config.from_env(env)
    assert (cfg.model, cfg.port, cfg.host, cfg.snapshot_on_miss) == ("/m", 8123, "0.0.0.0", True)
    assert cfg.vllm_args == ["--enforce-eager", "--max-model-len", "256"]
    assert cfg.snapshot_root == Path("/snaps")
    from fastvllm.defaults import snapshot_level

    # Arguments win over the environment; listening on 0.0.0.0 takes the CLI's default level.
    cfg = Config.from_env(env, model="/other", vllm_args=["--seed", "1"], port=9000, snapshot_on_miss=False)
    assert (cfg.model, cfg.vllm_args, cfg.port, cfg.snapshot_on_miss, cfg.snapshot_level) == \
        ("/other", ["--seed", "1"], 9000, False, snapshot_level())
    assert Config.from_env({"FASTVLLM_MODEL": "/m", "FASTVLLM_HOST": "127.0.0.1"}).snapshot_level == snapshot_level()
    assert Config.from_env({"FASTVLLM_MODEL": "/m", "FASTVLLM_LEVEL": "2"}).snapshot_level == 2


def test_api_key_from_env_or_vllm_args_is_kept_out_of_the_args():
    cfg = Config.from_env({"FASTVLLM_MODEL": "/m", "VLLM_API_KEY": "sk-env"})
    assert cfg.api_key == "sk-env" and "sk-env" not in repr(cfg)
    cfg = Config.from_env({"FASTVLLM_MODEL": "/m", "FASTVLLM_VLLM_ARGS": "--enforce-eager --api-key sk-arg"})
    assert cfg.api_key == "sk-arg" and cfg.vllm_args == ["--enforce-eager"]


@pytest.mark.parametrize("env, needle", [
    ({}, "no model given"),
    ({"FASTVLLM_MODEL": "/m", "FASTVLLM_PORT": "eighty"}, "must be integers"),
    ({"FASTVLLM_MODEL": "/m", "FASTVLLM_PORT": "70000"}, "out of range"),
    ({"FASTVLLM_MODEL": "/m", "FASTVLLM_LEVEL": "3"}, "not supported"),
    ({"FASTVLLM_MODEL": "/m", "FASTVLLM_VLLM_ARGS": "--host 0.0.0.0"}, "--host belongs to fastvllm"),
    ({"FASTVLLM_MODEL": "/m", "FASTVLLM_VLLM_ARGS": "--port=1"}, "--port belongs to fastvllm"),
])
def test_bad_config_is_one_line(env, needle):
    with pytest.raises(FastvllmError) as info:
        Config.from_env(env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_server_args_carry_no_address():
    """The address is given at bind time, so one snapshot serves any FASTVLLM_HOST/PORT."""
    assert Config(model="/m", vllm_args=["--enforce-eager"]).server_args() == ["--enforce-eager"]
    assert Config(model="/m", host="127.0.0.1").server_args() == []


def test_snapshot_path_depends_on_what_the_server_depends_on(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    base = Config(model=str(model_dir), vllm_args=["--enforce-eager"], snapshot_root=tmp_path / "snaps")
    path = snapshot_path(base, str(model_dir), "4.2.1")
    assert path.parent == (tmp_path / "snaps").absolute()
    assert path.name.startswith("tiny-model-")  # a safe directory name
    assert snapshot_path(base, str(model_dir), "4.2.1") == path  # stable
    changed = [
        snapshot_path(Config(model=str(model_dir), snapshot_root=tmp_path / "snaps"), str(model_dir), "4.2.1"),
        snapshot_path(Config(model=str(model_dir), vllm_args=["--enforce-eager"], level=2,
                             snapshot_root=tmp_path / "snaps"), str(model_dir), "4.2.1"),
        snapshot_path(base, str(model_dir), "4.3"),
    ]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    changed.append(snapshot_path(base, str(model_dir), "4.2.1"))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    (model_dir / "config.json").write_text('{"model_type": "llama", "changed": 1}')
    changed.append(snapshot_path(base, str(model_dir), "4.2.1"))
    assert path not in changed and len(set(changed)) == len(changed)
    # Where it listens and with which key is chosen at restore: the same snapshot serves all.
    monkeypatch.setenv("VLLM_API_KEY", "sk-rotated")
    same = Config(model=str(model_dir), vllm_args=["--enforce-eager"], port=9000, host="127.0.0.1",
                  snapshot_root=tmp_path / "snaps", api_key="sk-rotated")
    assert snapshot_path(same, str(model_dir), "4.2.1") == snapshot_path(base, str(model_dir), "4.2.1")


def _meta(model: str, **server) -> dict:
    return {"model": model, "level": 0,
            "server": {"port": 8000, "extra_args": ["--enforce-eager"], **server}}


def test_check_matches():
    cfg = Config(model="/m", vllm_args=["--enforce-eager"], level=0)
    check_matches(_meta("/m"), cfg, "/m")
    check_matches(_meta("/m", port=8001), cfg, "/m")  # any port: the restore binds FASTVLLM_PORT
    for meta, needle in [(_meta("/x"), "model '/x'"), (_meta("/m", extra_args=["--seed", "1"]), "vLLM args"),
                         (dict(_meta("/m"), level=2), "level 2")]:
        with pytest.raises(SnapshotInvalid, match=needle):
            check_matches(meta, cfg, "/m")


def test_a_corrupt_snapshot_is_reported_in_one_line_and_left_untouched(model_dir, tmp_path, capsys):
    """_try_restore on a damaged snapshot: one line, None (cold start follows), no change."""
    cfg = Config(model=str(model_dir), snapshot_root=tmp_path / "snaps")
    snap = tmp_path / "snaps" / "tiny-0"
    (snap / "criu").mkdir(parents=True, mode=0o700)
    (snap / "criu" / "pages-1.img").write_bytes(b"x" * 100)
    (snap / manifest.MANIFEST).write_text(json.dumps({
        "format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION, "model": str(model_dir),
        "server": {"port": 8000, "extra_args": ["--host", "0.0.0.0"]}, "canary": {}, "tree": {"pids": []},
        "files": {"criu/pages-1.img": 4096}, "external_files": []}))
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in snap.rglob("*") if p.is_file()}
    follower = logs.LogFollower()
    assert main._try_restore(snap, cfg, str(model_dir), main.Progress(quiet=True), follower) is None
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "not used: snapshot file criu/pages-1.img is 100 bytes, manifest says 4096" in lines[0]
    assert "cold-starting" in lines[0]
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in snap.rglob("*") if p.is_file()}
    assert after == before


def test_any_failure_of_a_restore_is_one_line_and_a_cold_start(model_dir, tmp_path, capsys):
    """Not only fastvllm's own refusals: a manifest field of the wrong type (an AttributeError
    deep in the restore) also gives one line and None, never a crash of PID 1."""
    cfg = Config(model=str(model_dir), snapshot_root=tmp_path / "snaps")
    snap = tmp_path / "snaps" / "tiny-0"
    snap.mkdir(parents=True, mode=0o700)
    (snap / manifest.MANIFEST).write_text(json.dumps({
        "format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION, "model": str(model_dir),
        "level": cfg.snapshot_level, "server": {"port": 8000, "extra_args": cfg.server_args()}, "canary": {},
        "tree": {"pids": []}, "files": {}, "external_files": [42]}))
    follower = logs.LogFollower()
    assert main._try_restore(snap, cfg, str(model_dir), main.Progress(quiet=True), follower) is None
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not used: AttributeError:" in lines[0] and "cold-starting" in lines[0], lines


def test_log_follower_continues_a_put_back_log(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "run"))
    follower = logs.LogFollower()
    log = follower.dir / "server-1.log"
    follower.skip_to(str(log), 6)  # restore: the first 6 bytes are the dump-time past
    log.write_bytes(b"old 1\n")
    follower.pump()
    log.unlink()  # put_back replaces the file (new inode), then the server appends
    log.write_bytes(b"old 1\nnew 2\n")
    follower.pump()
    log.write_bytes(b"old 1\nnew 2\nnew 3\n")
    follower.stop()
    assert capfd.readouterr().out == "new 2\nnew 3\n"


def test_foreground_forwards_signals_and_returns_the_status(tmp_path):
    """The real loop in a subprocess: SIGTERM to it reaches the child, whose status it returns."""
    code = (
        "import os, signal, subprocess, sys\n"
        "from fastvllm.container import logs, supervisor\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, sys, time\\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\\nprint(\"up\", flush=True)\\ntime.sleep(60)'],"
        " stdout=subprocess.PIPE)\n"
        "child.stdout.readline()\n"
        "print('ready', flush=True)\n"
        "sys.exit(supervisor.foreground(child.pid, logs.LogFollower(), 'test'))\n"
    )
    env = dict(os.environ, FASTVLLM_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 10
    while not (tmp_path / "run" / "serving").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "run" / "serving").exists()  # the startup-probe file
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 7
    assert not (tmp_path / "run" / "serving").exists()


def test_reserve_low_pids_moves_the_counter_in_a_fresh_namespace():
    """In a new PID namespace (unshare, as root) the server's PIDs start above the floor."""
    code = ("import os, sys; sys.path.insert(0, %r)\n"
            "from fastvllm.container import logs, supervisor\n"
            "assert os.getpid() == 1\n"
            "supervisor.reserve_low_pids(300)\n"
            "import subprocess; p = subprocess.Popen(['true']); p.wait(); print(p.pid)\n") % str(
                Path(supervisor.__file__).resolve().parents[2])
    try:
        out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("unshare not installed")
    if out.returncode != 0 and "Operation not permitted" in out.stderr:
        pytest.skip("no permission to make a PID namespace here")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) > 300


def test_snapshot_path_follows_big_weight_contents_not_only_sizes(model_dir, tmp_path, monkeypatch):
    """A retrained checkpoint of the same shapes (same size, other bytes) must get its own
    snapshot: weights above the whole-file hash size go by their content identity."""
    from fastvllm.container import identity

    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(identity, "_HASHED_FILE_MAX", 16)  # treat model.safetensors as big
    import numpy as np
    from safetensors.numpy import save_file

    weights = model_dir / "model.safetensors"
    save_file({"w": np.zeros(256, np.float32)}, str(weights))
    cfg = Config(model=str(model_dir), vllm_args=["--enforce-eager"], snapshot_root=tmp_path / "snaps")
    before = snapshot_path(cfg, str(model_dir), "4.2.1")
    size = weights.stat().st_size
    save_file({"w": np.ones(256, np.float32)}, str(weights))  # same shapes, other weights
    assert weights.stat().st_size == size
    assert snapshot_path(cfg, str(model_dir), "4.2.1") != before
