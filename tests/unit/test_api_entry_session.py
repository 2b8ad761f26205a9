"""The order in which fastvllm's API-server entry drives vLLM's engine client for each
control request. vLLM itself is exercised in tests/integration; the CUDA sequence cannot
run here (no GPU), this pins it down against a recording engine client."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastvllm.inside_vllm.api_entry import Session


class RecordingEngine:
    def __init__(self, reset_ok=True):
        self.calls = []
        self.reset_ok = reset_ok

    async def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return self.reset_ok

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, json.loads(kwargs["request"])))
        return [{"method": method}]

    async def sleep(self, level=1):
        self.calls.append(("sleep", level))

    async def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


def _run(session, op, **args):
    return asyncio.run(session.handle(op, args))


def test_cpu_level2_release_resets_prefix_cache_then_frees_in_the_workers():
    eng = RecordingEngine()
    s = Session(eng, None, None, cpu=True)
    out = _run(s, "release", level=2)
    assert eng.calls == [("reset_prefix_cache",), ("collective_rpc", "fastvllm_release", {"kv_only": False})]
    assert out["level"] == 2 and out["workers"] == [{"method": "fastvllm_release"}]


def test_cpu_level1_release_and_wake_touch_the_kv_cache_only():
    eng = RecordingEngine()
    s = Session(eng, None, None, cpu=True)
    _run(s, "release", level=1)
    _run(s, "wake")
    assert eng.calls[1] == ("collective_rpc", "fastvllm_release", {"kv_only": True})
    assert eng.calls[2] == ("collective_rpc", "fastvllm_reload", {"kv_only": True})


def test_cpu_release_refused_when_prefix_cache_cannot_be_reset():
    s = Session(RecordingEngine(reset_ok=False), None, None, cpu=True)
    with pytest.raises(RuntimeError, match="prefix cache"):
        _run(s, "release", level=2)
    assert s.released is None


def test_cuda_level2_is_native_sleep_then_weights_reload_kv_cache():
    eng = RecordingEngine()
    s = Session(eng, None, None, cpu=False)
    _run(s, "release", level=2)
    _run(s, "wake", files=["/w/a.safetensors"], loader="fast", threads=4)
    assert eng.calls[0] == ("sleep", 2)
    assert eng.calls[1] == ("wake_up", ["weights"])
    assert eng.calls[2][:2] == ("collective_rpc", "fastvllm_reload") and eng.calls[2][2]["files"] == ["/w/a.safetensors"]
    assert eng.calls[3] == ("wake_up", ["kv_cache"])


def test_cuda_level1_is_native_sleep_and_plain_wake_up():
    eng = RecordingEngine()
    s = Session(eng, None, None, cpu=False)
    _run(s, "release", level=1)
    _run(s, "wake")
    assert eng.calls == [("sleep", 1), ("wake_up", None)]


def test_released_engine_neither_answers_the_canary_nor_binds():
    s = Session(RecordingEngine(), None, None, cpu=True)
    _run(s, "release", level=2)
    for op in ("canary", "bind"):
        with pytest.raises(RuntimeError, match="released"):
            _run(s, op, host="127.0.0.1", port=1)


def test_only_the_extensions_methods_are_callable():
    eng = RecordingEngine()
    s = Session(eng, None, None, cpu=True)
    with pytest.raises(PermissionError):
        _run(s, "rpc", method="reload_weights")
    assert _run(s, "rpc", method="fastvllm_privatize", request={"wait": True})["workers"]
    assert eng.calls == [("collective_rpc", "fastvllm_privatize", {"wait": True})]


def test_release_level_0_and_unknown_requests_are_refused():
    s = Session(RecordingEngine(), None, None, cpu=True)
    with pytest.raises(ValueError):
        _run(s, "release", level=0)
    with pytest.raises(ValueError, match="unknown control request"):
        _run(s, "sleep")
