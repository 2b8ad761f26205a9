"""The HTTP sequences of level-2 sleep and wake, against a real local HTTP server that
records what it is asked (vLLM itself is exercised in tests/integration).

The CUDA sequence cannot run against vLLM here (no GPU); this pins down its order."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastvllm import engine
from fastvllm.errors import ServerFailed


class Recorder(BaseHTTPRequestHandler):
    calls: list = []
    reset_ok = True

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length)) if length else None
        Recorder.calls.append((self.path, body))
        if self.path.startswith("/reset_prefix_cache"):
            payload = {"success": Recorder.reset_ok}
        elif self.path.startswith("/collective_rpc"):
            payload = {"results": [{"method": body["method"], "kwargs": body.get("kwargs", {})}]}
        elif self.path.startswith("/fail"):
            self.send_response(500)
            self.end_headers()
            return
        else:
            payload = {}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    Recorder.calls = []
    Recorder.reset_ok = True
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_cpu_release_resets_prefix_cache_then_releases(endpoint):
    out = engine.release(endpoint, plat="cpu")
    assert [c[0] for c in Recorder.calls] == ["/reset_prefix_cache", "/collective_rpc"]
    assert Recorder.calls[1][1]["method"] == "fastvllm_release"
    assert out["workers"][0]["method"] == "fastvllm_release"


def test_cpu_release_refuses_when_prefix_cache_cannot_be_reset(endpoint):
    Recorder.reset_ok = False
    with pytest.raises(ServerFailed, match="prefix cache"):
        engine.release(endpoint, plat="cpu")
    assert [c[0] for c in Recorder.calls] == ["/reset_prefix_cache"]


def test_cuda_release_is_native_sleep_level_2(endpoint):
    engine.release(endpoint, plat="cuda")
    assert [c[0] for c in Recorder.calls] == ["/sleep?level=2"]


def test_cuda_reload_wakes_weights_then_reloads_then_kv_cache(endpoint):
    engine.reload(endpoint, ["/w/model.safetensors"], plat="cuda", threads=4)
    paths = [c[0] for c in Recorder.calls]
    assert paths == ["/wake_up?tags=weights", "/collective_rpc", "/wake_up?tags=kv_cache"]
    request = json.loads(Recorder.calls[1][1]["kwargs"]["request"])
    assert request["files"] == ["/w/model.safetensors"] and request["threads"] == 4
    assert request["loader"] == "fast"


def test_cpu_reload_is_one_rpc_with_string_kwargs(endpoint):
    engine.reload(endpoint, ["/w/a.safetensors"], plat="cpu", loader="vllm", model_dir="/m")
    assert [c[0] for c in Recorder.calls] == ["/collective_rpc"]
    kwargs = Recorder.calls[0][1]["kwargs"]
    assert all(isinstance(v, str) for v in kwargs.values()), "collective_rpc passes strings only"
    assert json.loads(kwargs["request"])["model_dir"] == "/m"


def test_sleep_server_options_per_platform():
    cpu_args, cpu_env = engine.sleep_server_options("cpu")
    gpu_args, gpu_env = engine.sleep_server_options("cuda")
    assert engine.EXTENSION in cpu_args and "--enable-sleep-mode" not in cpu_args
    assert "--enable-sleep-mode" in gpu_args
    assert cpu_env == gpu_env == {"VLLM_SERVER_DEV_MODE": "1"}


def test_http_errors_are_one_line(endpoint):
    with pytest.raises(ServerFailed) as err:
        engine._post(endpoint, "/fail")
    assert "HTTP 500" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ServerFailed, match="failed"):
        engine._post("http://127.0.0.1:1", "/sleep")


def test_cpu_release_level_1_frees_only_the_kv_cache(endpoint):
    out = engine.release(endpoint, plat="cpu", level=1)
    assert [c[0] for c in Recorder.calls] == ["/reset_prefix_cache", "/collective_rpc"]
    assert json.loads(Recorder.calls[1][1]["kwargs"]["request"]) == {"kv_only": True}
    assert out["level"] == 1


def test_cpu_release_level_2_frees_weights_too(endpoint):
    engine.release(endpoint, plat="cpu", level=2)
    assert json.loads(Recorder.calls[1][1]["kwargs"]["request"]) == {"kv_only": False}


def test_cuda_level_1_is_native_sleep_and_plain_wake_up(endpoint):
    engine.release(endpoint, plat="cuda", level=1)
    engine.wake_kv_cache(endpoint, plat="cuda")
    assert [c[0] for c in Recorder.calls] == ["/sleep?level=1", "/wake_up"]


def test_cpu_wake_from_level_1_reallocates_the_kv_cache_only(endpoint):
    engine.wake_kv_cache(endpoint, plat="cpu")
    assert [c[0] for c in Recorder.calls] == ["/collective_rpc"]
    assert Recorder.calls[0][1]["method"] == "fastvllm_reload"
    assert json.loads(Recorder.calls[0][1]["kwargs"]["request"]) == {"kv_only": True}


def test_release_rejects_level_0(endpoint):
    with pytest.raises(ValueError):
        engine.release(endpoint, plat="cpu", level=0)
    assert Recorder.calls == []
