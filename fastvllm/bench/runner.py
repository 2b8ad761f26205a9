"""Run the ladder: every selected method, in every server mode and page-cache state, N times.

Each run is one ``fastvllm serve|restore --json`` process spawned as a user would spawn it,
timed from outside; once it is up, the same streamed greedy completion measures the server's
decode speed (:func:`measure_decode`), so a restore that starts fast but decodes slowly (say,
memory mapped from a cold file, or split into small pages) shows up beside its start time.
Runs are interleaved (repeat, mode, cache, method), so drift in machine speed hits every
method alike, and each raw result is written the moment it exists. The
run directory is new every time: nothing from an earlier run is ever read back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from .. import manifest, server
from ..restore import snapshot_files
from ..errors import FastvllmError
from . import machine, phases
from .methods import BY_ID, Method, unavailable_methods

MODES = {"eager": ["--enforce-eager"], "compiled": []}
CACHES = ("warm", "evicted")
COMPILE_CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}

# The decode probe: one fixed prompt, greedy, a fixed number of tokens (ignore_eos), the same
# for every run of every method, so tokens/s compare across methods. It differs from the
# canary prompt so the canary's cached prefix does not make the first method's probe cheaper.
DECODE_PROMPT = "In a small village at the edge of the forest there lived an old clockmaker who"
DECODE_TOKENS = 64
DECODE_TIMEOUT_S = 300.0


@dataclass
class LadderConfig:
    model: str
    repeats: int = 3
    methods: list[int] = field(default_factory=lambda: sorted(BY_ID))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    caches: list[str] = field(default_factory=lambda: list(CACHES))
    port: int = server.DEFAULT_PORT
    results_dir: Path = Path("experiments/results")
    work_dir: Path = Path("/var/tmp")
    keep_work: bool = False
    server_args: list[str] = field(default_factory=list)
    timeout_s: float = 1500.0
    command: str = ""
    # fewer on big models on CPU: 64 tokens of a 3B model at ~1.7 tok/s is 37 s a run
    decode_tokens: int = DECODE_TOKENS

    def check(self) -> None:
        if self.repeats < 1:
            raise FastvllmError("--repeats must be at least 1", fix="e.g. --repeats 3")
        if self.decode_tokens < 2:
            raise FastvllmError("--decode-tokens must be at least 2 (decode speed is timed after the first)",
                                fix="e.g. --decode-tokens 16")
        bad = [m for m in self.modes if m not in MODES] + [c for c in self.caches if c not in CACHES]
        if bad or not self.modes or not self.caches:
            raise FastvllmError(f"unknown mode or cache state {bad}",
                                fix=f"modes: {', '.join(MODES)}; caches: {', '.join(CACHES)}")


def run_ladder(cfg: LadderConfig, say: Callable[[str], None] = print) -> Path:
    """Run the matrix, write raw runs, then the summary; returns the new results directory."""
    from ..snapshot import resolve_model
    from . import report

    cfg.check()
    model = resolve_model(cfg.model)
    server.ensure_port_free(server.LOOPBACK, cfg.port)
    run_dir = _new_run_dir(cfg.results_dir, Path(model).name or "model")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"fastvllm-bench-{run_dir.name}-", dir=cfg.work_dir))
    os.chmod(work, 0o700)  # snapshots hold process memory
    methods = [BY_ID[i] for i in cfg.methods]
    meta = {"model": model, "config": {**asdict(cfg), "results_dir": str(cfg.results_dir), "work_dir": str(work)},
            "machine": machine.describe(work), "versions": _versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "snapshots": {},
            "unavailable": [asdict(u) for u in unavailable_methods()],
            "decode_probe": {"prompt": DECODE_PROMPT, "tokens": cfg.decode_tokens, "greedy": True, "ignore_eos": True},
            "status": "running"}
    _write(run_dir / "run.json", meta)
    bench = _Bench(cfg, model, work, run_dir, say)
    try:
        for mode in cfg.modes:
            bench.prepare_mode(mode, methods, meta["snapshots"])
            _write(run_dir / "run.json", meta)
        total = cfg.repeats * len(cfg.modes) * len(cfg.caches) * len(methods)
        for repeat in range(1, cfg.repeats + 1):
            for mode in cfg.modes:
                for cache in cfg.caches:
                    for method in methods:
                        bench.run(method, mode, cache, repeat, total)
        meta["status"] = "done"
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
        raise
    finally:
        bench.stop_server()
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write(run_dir / "run.json", meta)
        if cfg.keep_work:
            say(f"kept snapshots and caches in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        if bench.index:
            report.write_all(run_dir)
    return run_dir


class _Bench:
    def __init__(self, cfg: LadderConfig, model: str, work: Path, run_dir: Path, say: Callable[[str], None]):
        self.cfg, self.model, self.work, self.run_dir, self.say = cfg, model, work, run_dir, say
        self.kept_cache = work / "compile-cache"
        self.snapshots: dict[tuple[str, int], Path | str] = {}  # a path, or why it failed
        self.index = 0
        self.spawn_epoch = 0.0

    # -- set-up, untimed ------------------------------------------------------------------

    def prepare_mode(self, mode: str, methods: list[Method], record: dict) -> None:
        """Take the snapshots this mode's methods restore. Their servers also fill the kept
        compile cache, as any earlier start on a node with a cache volume would have."""
        for level in sorted({m.level for m in methods if m.is_restore}):
            path = self.work / f"snapshot-{mode}-l{level}"
            self.say(f"taking the level-{level} snapshot for {mode} mode (untimed set-up) ...")
            ok, out, wall, error = self._fastvllm(
                ["snapshot", self.model, "--out", str(path), "--port", str(self.cfg.port), "--level", str(level),
                 "--", *self._server_args(mode)], self._env(self.kept_cache))
            self.stop_server()
            key = f"{mode}-l{level}"
            if ok:
                self.snapshots[(mode, level)] = path
                record[key] = {"image_bytes": out.get("image_bytes"), "timings": out.get("timings"),
                               "wall_s": round(wall, 3)}
            else:
                self.snapshots[(mode, level)] = f"snapshot failed: {error}"
                record[key] = {"error": error}
                self.say(f"  level-{level} snapshot for {mode} mode FAILED: {error}")
        if any(m.id == 2 for m in methods) and not any(isinstance(snap, Path) for (m, _), snap in self.snapshots.items()
                                                       if m == mode):
            self.say(f"filling the kept compile cache for {mode} mode (untimed set-up) ...")
            self._fastvllm(["serve", self.model, "--port", str(self.cfg.port), "--", *self._server_args(mode)],
                           self._env(self.kept_cache))
            self.stop_server()

    # -- one timed run --------------------------------------------------------------------

    def run(self, method: Method, mode: str, cache: str, repeat: int, total: int) -> dict:
        self.index += 1
        rec = {"method_id": method.id, "method": method.key, "label": method.label, "mode": mode, "cache": cache,
               "repeat": repeat, "ok": False, "error": None, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fresh = None
        try:
            if method.is_restore:
                snap = self.snapshots.get((mode, method.level))
                if not isinstance(snap, Path):
                    raise _Skip(snap or "no snapshot")
                files = snapshot_files(snap)
                argv = ["restore", str(snap), *method.restore_args]
                env = {**self._env(self.kept_cache), **dict(method.env)}
            else:
                if method.fresh_compile_cache:
                    fresh = self.work / f"fresh-cache-{self.index}"
                    env = self._env(fresh)
                    files = _files_under(Path(self.model))
                else:
                    env = self._env(self.kept_cache)
                    files = _files_under(Path(self.model)) + _files_under(self.kept_cache)
                argv = ["serve", self.model, "--port", str(self.cfg.port), "--", *self._server_args(mode)]
            rec["page_cache"] = _set_cache(cache, files)
            ok, out, wall, error = self._fastvllm(argv, env)
            rec.update(command=" ".join(["fastvllm", *argv]), wall_s=round(wall, 3), spawn_epoch=round(self.spawn_epoch, 3))
            if ok:
                if method.is_restore:
                    rec["phases"] = phases.restore_phases(out, wall)
                    rec["memory"] = _memory_record(method, out)
                else:
                    rec["log"] = out.get("log")
                    rec["phases"] = phases.cold_phases(out, wall, phases.read_log(out.get("log")), self.spawn_epoch)
                rec.update(ready_s=phases.ready_from_spawn(out, wall),
                           first_token_s=phases.first_token_from_spawn(out, wall), output=out)
                # A server that came up but cannot decode did not start: the run fails, its
                # start-up times stay in the record.
                endpoint = out.get("endpoint") or f"http://{server.LOOPBACK}:{self.cfg.port}"
                try:
                    rec["decode"] = measure_decode(endpoint, tokens=self.cfg.decode_tokens)
                    rec.update(ok=True, decode_tok_s=rec["decode"]["tok_s"])
                except (httpx.HTTPError, FastvllmError, ValueError, KeyError) as exc:
                    rec["error"] = f"decode probe failed: {exc.__class__.__name__}: {exc}"
            else:
                rec["error"] = error
        except _Skip as why:
            rec["error"] = str(why)
        finally:
            self.stop_server()
            if fresh is not None:
                shutil.rmtree(fresh, ignore_errors=True)
        _write(self.run_dir / "runs" / f"{self.index:03d}-{mode}-{cache}-{method.id}-{method.key}-r{repeat}.json", rec)
        result = (f"first token {rec['first_token_s']:7.2f} s (ready {rec['ready_s']:.2f} s), "
                  f"decode {rec['decode_tok_s']:.1f} tok/s" if rec["ok"] else f"FAILED: {rec['error']}")
        self.say(f"[{self.index:3d}/{total}] {mode:<8} {cache:<7} {method.id} {method.key:<22} r{repeat}: {result}")
        return rec

    # -- helpers --------------------------------------------------------------------------

    def _server_args(self, mode: str) -> list[str]:
        return [*MODES[mode], *self.cfg.server_args]

    def _env(self, compile_cache: Path) -> dict[str, str]:
        env = dict(os.environ)
        for var, sub in COMPILE_CACHE_VARS.items():
            (compile_cache / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(compile_cache / sub)
        return env

    def _fastvllm(self, argv: list[str], env: dict[str, str]) -> tuple[bool, dict, float, str | None]:
        """Run one CLI command as a user would; (ok, its JSON, wall seconds, error line)."""
        cmd = [sys.executable, "-m", "fastvllm.cli", argv[0], "--json", *argv[1:]]
        self.spawn_epoch = time.time()
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=self.cfg.timeout_s)
        except subprocess.TimeoutExpired:
            return False, {}, time.monotonic() - start, f"timed out after {self.cfg.timeout_s:.0f} s"
        wall = time.monotonic() - start
        if proc.returncode != 0:
            return False, {}, wall, error_line(proc.stderr) or f"exit status {proc.returncode}"
        try:
            return True, json.loads(proc.stdout), wall, None
        except json.JSONDecodeError:
            return False, {}, wall, "the command printed no JSON result"

    def stop_server(self) -> None:
        subprocess.run([sys.executable, "-m", "fastvllm.cli", "stop", f":{self.cfg.port}"],
                       capture_output=True, timeout=120)


def measure_decode(endpoint: str, prompt: str = DECODE_PROMPT, tokens: int = DECODE_TOKENS,
                   timeout: float = DECODE_TIMEOUT_S) -> dict:
    """Decode speed of the server at ``endpoint``: one streamed greedy completion of
    ``tokens`` tokens (``ignore_eos``), tokens/s over the tokens after the first, so time to
    first token (prefill, queueing) is not in it.

    Two clocks time it. The engine's: vLLM's ``vllm:request_decode_time_seconds`` (its engine
    core's stamps of the first and last token) read off ``/metrics`` before and after. The
    client's: arrival of the first and last streamed chunk, counted exactly with vLLM's
    per-chunk usage (``continuous_usage_stats``). ``tok_s`` is the engine's whenever the
    server reports it, because on a 2-core machine the worker's spinning OpenMP threads can
    starve the API server process until generation ends, and then all chunks arrive in one
    burst (measured: 0.6 ms for 63 tokens, i.e. 100k tok/s, right after 296 tok/s from the
    same server): the client's clock then measures the starvation, not decoding."""
    model = server.served_model(endpoint)
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    before = engine_decode_totals(endpoint)
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    # A fresh connection, closed afterwards, as for the canary.
    with httpx.Client(timeout=timeout) as client:
        with client.stream("POST", f"{endpoint}/v1/completions", json=body, headers={"Connection": "close"}) as resp:
            if resp.status_code != 200:
                resp.read()
                raise FastvllmError(f"decode request failed: HTTP {resp.status_code}: {resp.text[:200]}")
            for line in resp.iter_lines():
                lines.append((time.monotonic() - start, line))
    events = stream_events(lines)
    streamed = events[-1][1] if events else 0
    if streamed != tokens:
        raise ValueError(f"asked for {tokens} tokens, the server streamed {streamed}")
    try:
        result = decode_rate(events)
        result["stream_tok_s"] = result.pop("tok_s")
    except ValueError as exc:  # e.g. the whole stream in one burst: the engine's clock still counts
        result = {"tokens": streamed, "chunks": len(events), "text": "".join(e[2] for e in events),
                  "stream_tok_s": None, "stream_error": str(exc)}
    result["engine_tok_s"] = None
    if before is not None:
        deadline = time.monotonic() + 5.0  # the server records a request's stats as it finishes it
        while True:
            after = engine_decode_totals(endpoint)
            if after is None or after[1] > before[1] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if after is not None and after[1] - before[1] == 1 and after[0] > before[0]:
            result["engine_decode_s"] = round(after[0] - before[0], 4)
            result["engine_tok_s"] = round((tokens - 1) / (after[0] - before[0]), 2)
    result["source"] = "engine" if result["engine_tok_s"] is not None else "stream"
    result["tok_s"] = result["engine_tok_s"] if result["engine_tok_s"] is not None else result["stream_tok_s"]
    if result["tok_s"] is None:
        raise ValueError(f"no decode speed: the server exports no {DECODE_METRIC} and {result['stream_error']}")
    return result


DECODE_METRIC = "vllm:request_decode_time_seconds"


def engine_decode_totals(endpoint: str) -> tuple[float, float] | None:
    """(sum, count) of vLLM's per-request decode-time histogram, or None when the server
    exports no metrics (``--disable-log-stats``, or another server)."""
    try:
        resp = httpx.get(f"{endpoint}/metrics", timeout=30)
    except httpx.HTTPError:
        return None
    return decode_totals(resp.text) if resp.status_code == 200 else None


def decode_totals(text: str) -> tuple[float, float] | None:
    """The ``_sum`` and ``_count`` of :data:`DECODE_METRIC` in a Prometheus text page,
    added over its label sets (one per engine)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        for part in ("_sum", "_count"):
            name = DECODE_METRIC + part
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                try:
                    found[part] = found.get(part, 0.0) + float(line.rsplit(None, 1)[-1])
                except ValueError:
                    pass
    return (found["_sum"], found["_count"]) if len(found) == 2 else None


def stream_events(lines: Iterable[tuple[float, str]]) -> list[tuple[float, int, str]]:
    """(arrival time, tokens so far, text) for every server-sent chunk that carries tokens.
    Tokens come from the chunk's cumulative usage where the server sends it, else one per
    chunk; usage-only chunks (no choices) just correct the count of the last one."""
    events: list[tuple[float, int, str]] = []
    for t, line in lines:
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = (chunk.get("usage") or {}).get("completion_tokens")
        choices = chunk.get("choices") or []
        if choices:
            count = usage if usage is not None else (events[-1][1] if events else 0) + 1
            events.append((t, count, choices[0].get("text", "")))
        elif usage is not None and events and usage > events[-1][1]:
            last_t, _, text = events[-1]
            events[-1] = (last_t, usage, text)
    return events


def decode_rate(events: list[tuple[float, int, str]]) -> dict:
    """Tokens/s after the first chunk: (tokens in all later chunks) / (last arrival - first
    arrival). Needs tokens in at least two chunks at two different times."""
    if len(events) < 2:
        raise ValueError(f"the stream carried tokens in {len(events)} chunk(s); need at least 2")
    (t0, n0, _), (t1, n1, _) = events[0], events[-1]
    if n1 <= n0 or t1 <= t0:
        raise ValueError(f"no decode after the first chunk ({n1 - n0} tokens in {t1 - t0:.4f} s)")
    return {"tok_s": round((n1 - n0) / (t1 - t0), 2), "tokens": n1, "tokens_timed": n1 - n0,
            "seconds": round(t1 - t0, 4), "first_chunk_s": round(t0, 4), "chunks": len(events),
            "text": "".join(text for _, _, text in events)}


def error_line(stderr: str) -> str | None:
    """The line of a failed command's stderr that says why: the last one with words in it.
    Typer/Rich usage errors come in a box whose last line is its border, and whose text
    line is wrapped in '│'; both are stripped, so e.g. "No such option: --memory" survives."""
    for line in reversed(stderr.strip().splitlines()):
        text = line.strip().strip("│╭╮╰╯─ ").strip()
        if any(ch.isalnum() for ch in text):
            return text
    return None


def _memory_record(method: Method, out: dict) -> dict:
    """The restore's own ``memory`` record (engine used, fallback and why, stats), with the
    engine the method asked for: the two differ exactly when ``fallback`` says so."""
    memory = dict(out.get("memory") or {})
    memory.setdefault("requested", method.memory)
    memory.setdefault("engine", None)
    memory.setdefault("fallback", None)
    return memory


class _Skip(Exception):
    """A run that cannot start (its snapshot failed): recorded as a failure with the reason."""


def _set_cache(state: str, files: list[Path]) -> str:
    """Put the run's files in the page cache ('warm'), or out of it ('evicted': the whole
    page cache when permitted, as on a fresh node; otherwise just these files)."""
    from .. import prefetch

    if state == "warm":
        prefetch.warm(files)
        return "warmed the run's files"
    try:
        prefetch.drop_page_cache()
        return "dropped the whole page cache"
    except OSError:
        prefetch.evict(files)
        return "evicted the run's files (cannot drop the whole page cache here)"


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def _new_run_dir(results: Path, model_name: str) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    base = results / f"ladder-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while True:
        try:
            (path / "runs").mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def _versions() -> dict[str, str]:
    from ..criu_ops import find_criu

    try:
        criu = find_criu().version_str
    except FastvllmError:
        criu = "not found"
    return manifest.host_versions(criu)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
