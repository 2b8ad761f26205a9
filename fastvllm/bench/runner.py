"""Run the ladder: every selected method, in every server mode and page-cache state, N times.

Each run is one ``fastvllm serve|restore --json`` process spawned as a user would spawn it,
timed from outside. Runs are interleaved (repeat, mode, cache, method), so drift in machine
speed hits every method alike, and each raw result is written the moment it exists. The
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import manifest, server
from ..restore import snapshot_files
from ..errors import FastvllmError
from . import machine, phases
from .methods import BY_ID, Method, unavailable_methods

MODES = {"eager": ["--enforce-eager"], "compiled": []}
CACHES = ("warm", "evicted")
COMPILE_CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


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

    def check(self) -> None:
        if self.repeats < 1:
            raise FastvllmError("--repeats must be at least 1", fix="e.g. --repeats 3")
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
            "unavailable": [asdict(u) for u in unavailable_methods()], "status": "running"}
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
        if any(m.id == 2 for m in methods) and not any(isinstance(self.snapshots.get((mode, lv)), Path) for lv in (0, 2)):
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
                env = self._env(self.kept_cache)
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
                else:
                    rec["log"] = out.get("log")
                    rec["phases"] = phases.cold_phases(out, wall, phases.read_log(out.get("log")), self.spawn_epoch)
                rec.update(ok=True, ready_s=phases.ready_from_spawn(out, wall),
                           first_token_s=phases.first_token_from_spawn(out, wall), output=out)
            else:
                rec["error"] = error
        except _Skip as why:
            rec["error"] = str(why)
        finally:
            self.stop_server()
            if fresh is not None:
                shutil.rmtree(fresh, ignore_errors=True)
        _write(self.run_dir / "runs" / f"{self.index:03d}-{mode}-{cache}-{method.id}-{method.key}-r{repeat}.json", rec)
        result = (f"first token {rec['first_token_s']:7.2f} s (ready {rec['ready_s']:.2f} s)" if rec["ok"]
                  else f"FAILED: {rec['error']}")
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
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            return False, {}, wall, (lines[-1] if lines else f"exit status {proc.returncode}")
        try:
            return True, json.loads(proc.stdout), wall, None
        except json.JSONDecodeError:
            return False, {}, wall, "the command printed no JSON result"

    def stop_server(self) -> None:
        subprocess.run([sys.executable, "-m", "fastvllm.cli", "stop", f":{self.cfg.port}"],
                       capture_output=True, timeout=120)


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
