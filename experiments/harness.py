"""What the demo and the benchmarks share: the bundled model, the CLI as a user runs it,
and a description of the machine the numbers come from."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastvllm.bench.phases import first_token_from_spawn  # noqa: F401  (re-exported for the experiments)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SNAPSHOTS = ROOT / "snapshots"
RESULTS = ROOT / "experiments" / "results"


def bundled_model(size: str = "tiny") -> Path:
    """The project's own model, built once (deterministic: seed 0) and reused."""
    path = MODELS / size
    if not (path / "config.json").is_file():
        from fastvllm.model_maker import make_model

        print(f"building the {size} model in {path} (once)", file=sys.stderr)
        make_model(path, size=size)
    return path


def fastvllm(*args: str, timeout: float = 1200) -> tuple[dict, float]:
    """Run ``fastvllm CMD --json ARGS``; returns (its JSON, wall seconds of the whole process)."""
    cmd = [sys.executable, "-m", "fastvllm.cli", args[0], "--json", *args[1:]]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout), wall


def parser(doc: str, default_size: str) -> argparse.ArgumentParser:
    """The options every restore experiment takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=default_size, choices=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--drop-caches", action="store_true", help="echo 3 > drop_caches before every run")
    return p


def stop_all() -> None:
    subprocess.run([sys.executable, "-m", "fastvllm.cli", "stop", "--all"], capture_output=True)


def drop_caches() -> bool:
    """Drop the whole page cache if permitted; False when not (the run stays warm)."""
    from fastvllm.prefetch import drop_page_cache

    try:
        drop_page_cache()
        return True
    except OSError:
        return False


def machine() -> dict:
    from fastvllm.bench.machine import describe

    return describe(ROOT)


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def run(main) -> None:
    """Run an experiment's main(); a failed fastvllm command ends it with one line, exit 1."""
    try:
        main()
    except RuntimeError as exc:
        print(f"{Path(sys.argv[0]).stem} failed: {exc}", file=sys.stderr)
        sys.exit(1)
