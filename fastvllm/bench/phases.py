"""Where the seconds of one start-up went, from the command's ``--json`` and the vLLM log.

Every breakdown sums exactly to the time from spawning the command to the first streamed
token, so the stacked bars of a method add up to what a user waits.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

# Display order (bottom of the stack first) and labels; shared by the CSV, table and plot.
PHASES: dict[str, str] = {
    "cli_startup": "fastvllm CLI start-up",
    "api_startup": "vLLM API server start-up (imports, config)",
    "engine_startup": "engine + worker processes start-up",
    "weights_load": "weights load",
    "compile": "torch.compile",
    "engine_init": "engine init (profile, KV cache, warm-up)",
    "server_other": "rest of cold start (model init, API up, /health)",
    "preflight": "restore preflight checks",
    "criu_restore": "CRIU restore",
    "health": "until /health answers",
    "weights_reload": "weights reload",
    "kv_cache_realloc": "KV cache re-allocation",
    "canary_bind": "canary in the server, bind, /health",
    "first_token": "first token",
}

_WEIGHTS_RE = (re.compile(r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds"),
               re.compile(r"Loading weights took ([\d.]+) seconds"))
# vLLM's log stamps ("INFO 11-21 13:54:45 [file.py:12] ...") have one-second resolution.
_STAMP = r"(?:INFO|WARNING|DEBUG) (\d\d-\d\d \d\d:\d\d:\d\d) \[[^\]]*\] "
_ENGINE_START_RE = re.compile(_STAMP + r"Initializing a V1 LLM engine")
_LOAD_START_RE = re.compile(_STAMP + r"Starting to load model")
_ENGINE_RE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
                        r"(?: \(compilation: ([\d.]+) s)?")


def vllm_log_phases(text: str) -> dict[str, float]:
    """Seconds vLLM itself reports for loading weights, compiling and engine set-up; the keys
    it did not log are absent (GPU's 'Model loading took' wins over the loader's line)."""
    found: dict[str, float] = {}
    for pattern in _WEIGHTS_RE:
        values = [float(v) for v in pattern.findall(text)]
        if values:
            found["weights_load"] = max(values)  # one line per worker; they run in parallel
            break
    engine = _ENGINE_RE.findall(text)
    if engine:
        elapsed, compile_s = engine[-1]
        compile_v = float(compile_s) if compile_s else 0.0
        found["engine_init"] = float(elapsed) - compile_v
        if compile_v:
            found["compile"] = compile_v
    return found


def startup_marks(text: str, spawn_epoch: float) -> dict[str, float]:
    """Seconds after ``spawn_epoch`` at which vLLM's engine core began initialising and its
    worker began loading the model, from the log's one-second stamps (taken as mid-second)."""
    year = time.localtime(spawn_epoch).tm_year
    marks = {}
    for key, pattern in (("engine", _ENGINE_START_RE), ("load", _LOAD_START_RE)):
        found = pattern.search(text)
        if found:
            stamp = time.mktime(time.strptime(f"{year}-{found.group(1)}", "%Y-%m-%d %H:%M:%S"))
            marks[key] = stamp + 0.5 - spawn_epoch
    return marks


def cold_phases(out: dict, wall: float, log_text: str | None, spawn_epoch: float | None = None) -> dict[str, float]:
    """Phases of ``fastvllm serve --json``: CLI start-up; vLLM's API server and engine
    process start-up (log stamps, +-0.5 s); weights, compile and engine init as vLLM reports
    them; the rest of getting to /health; the first token."""
    t = out["timings"]
    cli = wall - t["total_s"]
    phases = {"cli_startup": cli}
    logged = vllm_log_phases(log_text or "")
    known = sum(logged.values())
    if known > t["healthy_s"]:  # a log from another clock or run: do not trust it
        logged, known = {}, 0.0
    marks = startup_marks(log_text, spawn_epoch) if log_text and spawn_epoch else {}
    engine, load = marks.get("engine"), marks.get("load")
    if engine is not None and load is not None and cli <= engine <= load and load - cli + known <= t["healthy_s"]:
        phases["api_startup"] = engine - cli
        phases["engine_startup"] = load - engine
        known += load - cli
    phases.update(logged)
    phases["server_other"] = t["healthy_s"] - known
    phases["first_token"] = t["first_token_s"] - t["healthy_s"]
    return _rounded(phases)


def restore_phases(out: dict, wall: float) -> dict[str, float]:
    """Phases of ``fastvllm restore --json``: preflight, CRIU, the step that makes the server
    whole again (level 2: weights reload; level 1: KV cache re-allocation; both report its
    end as ``weights_s``), the canary in the server and the bind (the server listens only
    after both: ``canary_s``, then ``healthy_s``), first token. Prefetch runs beside these, so
    it is not a phase of its own. Runs from before late binding (no ``canary_s``: /health
    answered before the weights were back) keep their old breakdown."""
    t = out["timings"]
    criu_start = out.get("timeline", {}).get("criu_restore", {}).get("start", 0.0)
    phases = {"cli_startup": wall - t["total_s"], "preflight": criu_start, "criu_restore": t["restore_s"] - criu_start}
    wake_key = "kv_cache_realloc" if out.get("level") == 1 else "weights_reload"
    if "canary_s" in t:
        whole = t["restore_s"]
        if "weights_s" in t:
            phases[wake_key] = t["weights_s"] - t["restore_s"]
            whole = t["weights_s"]
        phases["canary_bind"] = t["healthy_s"] - whole
        phases["first_token"] = t["first_token_s"] - t["healthy_s"]
        return _rounded(phases)
    phases["health"] = t["healthy_s"] - t["restore_s"]
    ready = t["healthy_s"]
    if "weights_s" in t:
        phases[wake_key] = t["weights_s"] - t["healthy_s"]
        ready = t["weights_s"]
    phases["first_token"] = t["first_token_s"] - ready
    return _rounded(phases)


def ready_from_spawn(out: dict, wall: float) -> float:
    """Spawn to able to serve: /health for cold starts and late-binding restores (which
    listen only once whole); for older level-1/2 restores the KV cache or weights had to be
    back too (they answered /health a moment before)."""
    t = out["timings"]
    return round(wall - t["total_s"] + max(t.get("weights_s", 0.0), t["healthy_s"]), 3)


def first_token_from_spawn(out: dict, wall: float) -> float:
    t = out["timings"]
    return round(wall - t["total_s"] + t["first_token_s"], 3)


def read_log(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _rounded(phases: dict[str, float]) -> dict[str, float]:
    return {k: round(max(v, 0.0), 3) for k, v in phases.items()}
