"""How the server is started (guarded, loopback, offline) and the port checks made before it."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from fastvllm import server
from fastvllm.errors import FastvllmError
from fastvllm.server import ServerSpec, ensure_port_free, free_port


def test_command_runs_fastvllms_entry_under_the_launcher_without_an_address():
    spec = ServerSpec(model="/models/tiny", port=8123, extra_args=["--max-model-len", "512"], control_dir="/run/c1")
    cmd = spec.command()
    assert cmd[:3] == [sys.executable, "-m", "fastvllm.launcher"]
    assert cmd[3:6] == [sys.executable, "-m", server.ENTRY]
    assert cmd[cmd.index("--fastvllm-control") + 1] == "/run/c1"
    assert "--host" not in cmd and "--port" not in cmd, "the address comes with bind, after the canary"
    assert cmd[cmd.index("--model") + 1] == "/models/tiny"
    assert cmd[-2:] == ["--max-model-len", "512"]
    assert spec.endpoint == "http://127.0.0.1:8123"


def test_wildcard_host_endpoint_is_loopback():
    assert ServerSpec(model="m", port=9000, host="0.0.0.0").endpoint == "http://127.0.0.1:9000"


def test_environment_defaults(monkeypatch):
    for key in ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FASTVLLM_UNIT_MARKER", "kept")
    env = ServerSpec(model="m").environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["FASTVLLM_UNIT_MARKER"] == "kept"  # the caller's environment is passed on
    assert "FASTVLLM_UNIT_MARKER" in os.environ  # ...without modifying ours
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_environment_user_values_win(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = ServerSpec(model="m").environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["HF_HUB_OFFLINE"] == "0"
    env = ServerSpec(model="m", env={"VLLM_CPU_KVCACHE_SPACE": "2"}).environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_api_key_never_reaches_the_server_environment(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "sk-secret")
    spec = ServerSpec(model="m", api_key="sk-secret")
    assert "VLLM_API_KEY" not in spec.environment()
    assert "sk-secret" not in " ".join(spec.command()) and "sk-secret" not in repr(spec)


@pytest.mark.parametrize("host", ["::1", "fe80::1"])
def test_ipv6_endpoint_is_bracketed(host):
    assert ServerSpec(model="m", port=9000, host=host).endpoint == f"http://[{host}]:9000"


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def test_ensure_port_free_names_the_listener(listener):
    with pytest.raises(FastvllmError) as info:
        ensure_port_free("127.0.0.1", listener)
    msg = str(info.value)
    assert f"port {listener} is in use by pid {os.getpid()} (" in msg
    assert "pick another --port" in msg and "\n" not in msg


def test_ensure_port_free_localhost_and_wildcard(listener):
    with pytest.raises(FastvllmError, match=f"port {listener} is in use"):
        ensure_port_free("localhost", listener)
    with pytest.raises(FastvllmError, match=f"port {listener} is in use"):
        ensure_port_free("0.0.0.0", listener)


def test_ensure_port_free_passes_for_free_port():
    port = free_port()
    ensure_port_free("127.0.0.1", port)
    ensure_port_free("127.0.0.1", port)  # it leaves nothing bound behind


def test_ensure_port_free_other_bind_error():
    # 192.0.2.1 (TEST-NET-1) is not an address of this host: EADDRNOTAVAIL, not "in use".
    with pytest.raises(FastvllmError, match="cannot bind 192.0.2.1") as info:
        ensure_port_free("192.0.2.1", free_port())
    assert "in use" not in str(info.value)


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        assert sock.getsockname()[1] == port


@pytest.mark.parametrize("extra", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "9"], ["--uds", "/x"]])
def test_address_among_the_vllm_args_is_refused(extra):
    """The server binds only after its canary passed, at the address fastvllm gives it:
    an address among the vLLM args would be ignored, so it is refused in one line."""
    with pytest.raises(FastvllmError, match="among the vLLM args") as info:
        ServerSpec(model="m", extra_args=["--enforce-eager", *extra])
    assert "\n" not in str(info.value)


def test_no_fastvllm_source_turns_on_vllms_dev_mode():
    """Engine control goes over the private control channel only (issue 11)."""
    from pathlib import Path

    name = "VLLM_SERVER_" + "DEV_MODE"
    pkg = Path(server.__file__).parent
    assert not [p for p in pkg.rglob("*.py") if name in p.read_text()]
