"""The real ``fastvllm`` command fails with one line a user can act on, and its --json
output is a single parseable object. No server is started by any of these."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastvllm import registry


@pytest.fixture
def run(tmp_path):
    """``fastvllm ARGS`` as a subprocess with a private, empty run dir."""
    run_dir = tmp_path / "run"

    def call(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        full = {k: v for k, v in os.environ.items() if k != "FASTVLLM_CRIU"}
        full.update(FASTVLLM_RUN_DIR=str(run_dir), **(env or {}))
        return subprocess.run([sys.executable, "-m", "fastvllm.cli", *args], capture_output=True, text=True,
                              env=full, timeout=120, cwd=tmp_path)

    call.run_dir = run_dir
    return call


def _error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exactly one stderr line, 'fastvllm: error: ...'."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("fastvllm: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert proc.stdout == ""
    return line


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_restore_dir_without_manifest(run, tmp_path):
    snap = tmp_path / "not-a-snapshot"
    snap.mkdir()
    (snap / "criu").mkdir()
    (snap / "criu" / "pages-1.img").write_bytes(b"x" * 10)
    before = _tree(snap)

    proc = run("restore", "--json", str(snap))
    _error_line(proc, "manifest", str(snap), "not a fastvllm snapshot")
    assert _tree(snap) == before

    # Without --json the progress line for the step comes first; still one error line, last.
    proc = run("restore", str(snap))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("fastvllm: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "manifest" in errors[0]
    assert all(ln.startswith("[fastvllm ") for ln in lines[:-1]), lines


def test_restore_missing_dir(run, tmp_path):
    _error_line(run("restore", "--json", str(tmp_path / "nope")), "is not a directory")


@pytest.fixture
def fake_model(tmp_path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return model


@pytest.fixture
def fake_criu(tmp_path) -> Path:
    """Only answers --version: the out-dir check fails before CRIU is ever used."""
    path = tmp_path / "criu"
    path.write_text('#!/bin/sh\necho "Version: 4.2.1"\n')
    path.chmod(0o755)
    return path


def test_snapshot_into_non_empty_dir(run, tmp_path, fake_model, fake_criu):
    from fastvllm.server import free_port

    out = tmp_path / "snaps" / "full"
    out.mkdir(parents=True)
    (out / "important.txt").write_text("do not lose me")
    (out / "nested").mkdir()
    (out / "nested" / "data.bin").write_bytes(os.urandom(100))
    before = _tree(out)

    proc = run("snapshot", str(fake_model), "--out", str(out), "--port", str(free_port()),
               env={"FASTVLLM_CRIU": str(fake_criu)})
    _error_line(proc, "not empty", str(out))
    assert _tree(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["full"]  # no .partial dir left
    # No server was started, so none was registered and no log was written.
    servers = run.run_dir / "servers"
    assert not servers.exists() or not list(servers.iterdir())
    logs = run.run_dir / "logs"
    assert not logs.exists() or not list(logs.iterdir())


def test_snapshot_missing_model(run):
    _error_line(run("snapshot", "/nonexistent/model"), "/nonexistent/model", "does not exist")


def test_snapshot_dir_without_config(run, tmp_path):
    model = tmp_path / "not-a-model"
    model.mkdir()
    _error_line(run("snapshot", str(model)), "has no config.json")


def test_inspect_of_a_non_snapshot_is_one_line(run, tmp_path):
    _error_line(run("inspect", "--json", str(tmp_path)), "not a fastvllm snapshot")
    _error_line(run("inspect", str(tmp_path / "nope")), "is not a directory")


@pytest.mark.parametrize("args, needle", [
    (["--", "--port", "9"], "--port among the vLLM args"),
    (["--", "--host=0.0.0.0"], "--host among the vLLM args"),
    (["--port", "70000"], "out of range"),
])
def test_snapshot_refuses_an_address_it_cannot_honour(run, fake_model, fake_criu, args, needle):
    proc = run("snapshot", str(fake_model), "--out", str(fake_model.parent / "s"), *args,
               env={"FASTVLLM_CRIU": str(fake_criu)})
    _error_line(proc, needle)
    servers = run.run_dir / "servers"
    assert not servers.exists() or not list(servers.iterdir())


def test_stop_without_target(run):
    _error_line(run("stop"), "say which server to stop", "--all")


def test_stop_unknown_pid(run):
    _error_line(run("stop", "999999"), "no running fastvllm server matches 999999")


def test_stop_all_with_nothing_running(run):
    proc = run("stop", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"stopped": []}


def test_ps_json_empty(run):
    proc = run("ps", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"servers": []}
    assert len(proc.stdout.strip().splitlines()) == 1


def test_ps_json_lists_a_registered_live_process(run, monkeypatch):
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(run.run_dir))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        registry.add(registry.ServerRecord(root_pid=sleeper.pid, pids=[sleeper.pid],
                                           endpoint="http://127.0.0.1:8765", model="/m/tiny", how="restore",
                                           log="/tmp/x.log", snapshot="/snaps/s1"))
        proc = run("ps", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"servers": [{
            "pid": sleeper.pid, "endpoint": "http://127.0.0.1:8765", "how": "restore", "model": "/m/tiny",
            "snapshot": "/snaps/s1", "log": "/tmp/x.log"}]}
        text = run("ps")
        assert str(sleeper.pid) in text.stdout and "http://127.0.0.1:8765" in text.stdout
    finally:
        sleeper.kill()
        sleeper.wait()
    assert json.loads(run("ps", "--json").stdout) == {"servers": []}


def test_doctor_json(run):
    proc = run("doctor", "--json")
    data = json.loads(proc.stdout)
    assert set(data) == {"ok", "checks"}
    assert isinstance(data["ok"], bool) and isinstance(data["checks"], list) and data["checks"]
    for check in data["checks"]:
        assert set(check) == {"name", "ok", "detail", "fix", "fatal"}, check
    names = [c["name"] for c in data["checks"]]
    for expected in ("privileges", "criu", "io_uring", "/dev/shm", "run dir"):
        assert expected in names, names
    fatal_failures = [c for c in data["checks"] if c["fatal"] and not c["ok"]]
    assert data["ok"] == (not fatal_failures)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr
    run_dir_check = next(c for c in data["checks"] if c["name"] == "run dir")
    assert run_dir_check == {"name": "run dir", "ok": True, "detail": str(run.run_dir), "fix": "", "fatal": True}


def test_doctor_json_reports_bad_forced_criu(run, tmp_path):
    proc = run("doctor", "--json", env={"FASTVLLM_CRIU": str(tmp_path / "no-criu")})
    data = json.loads(proc.stdout)
    criu = next(c for c in data["checks"] if c["name"] == "criu")
    assert criu["ok"] is False and criu["fatal"] is True and "is not an executable file" in criu["detail"]
    assert data["ok"] is False


def test_doctor_exits_non_zero_on_fatal_failure(run, tmp_path):
    env = {"FASTVLLM_CRIU": str(tmp_path / "no-criu")}
    proc = run("doctor", "--json", env=env)
    assert json.loads(proc.stdout)["ok"] is False
    assert proc.returncode == 1


def test_usage_errors_are_usage_messages_not_tracebacks(run):
    missing_arg = run("restore")
    assert "Traceback" not in missing_arg.stderr
    assert missing_arg.returncode == 2 and "Missing argument" in missing_arg.stderr
    bad_option = run("stop", "--bogus")
    assert "Traceback" not in bad_option.stderr
    assert bad_option.returncode == 2 and "No such option" in bad_option.stderr
    no_args = run()
    assert "Traceback" not in no_args.stderr
    assert "Usage:" in no_args.stdout + no_args.stderr


@pytest.mark.parametrize("args,needle", [(["--methods", "0-9"], "unknown method"),
                                         (["--modes", "fast"], "unknown mode"),
                                         (["--repeats", "0"], "--repeats")])
def test_bench_rejects_bad_options_before_starting_anything(run, tmp_path, args, needle):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    proc = run("bench", str(model), "--results-dir", str(tmp_path / "res"), *args)
    _error_line(proc, needle)
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())


def test_bench_port_in_use_is_one_line_and_writes_no_results(run, tmp_path):
    import socket

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = run("bench", str(model), "--port", str(port), "--results-dir", str(tmp_path / "res"))
    _error_line(proc, str(port))
    assert not (tmp_path / "res").exists()
