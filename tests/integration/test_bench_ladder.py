"""One whole ladder run on the tiny model, --repeats 1, as a user runs it: every method, both
server modes, warm and evicted page cache, through experiments/ladder.py (what ./run.sh
bench runs). Slow (~15 min on 2 cores): each cold start is 25-80 s here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastvllm import server
from fastvllm.bench import LADDER

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[2]


def test_ladder_smoke_run(tiny_model, tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "experiments" / "ladder.py"), "--model", str(tiny_model), "--repeats", "1",
           "--results-dir", str(results), "--work-dir", str(work), "--port", str(server.free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = results.iterdir()
    print(f"\n{(run_dir / 'table.md').read_text()}")

    runs = [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))]
    assert len(runs) == len(LADDER) * 2 * 2  # methods x (eager, compiled) x (warm, evicted)
    assert all(r["ok"] for r in runs), [r["error"] for r in runs if not r["ok"]]
    for r in runs:
        assert sum(r["phases"].values()) == pytest.approx(r["first_token_s"], abs=0.05)
        assert ("weights_reload" in r["phases"]) == (r["method_id"] in (4, 5, 6))
        assert r["ready_s"] <= r["first_token_s"]

    # Method 1 compiled in a cache of its own; method 2 reused the run's kept cache.
    compiled_logs = {r["method_id"]: Path(r["log"]).read_text() for r in runs
                     if r["mode"] == "compiled" and r["method_id"] in (1, 2) and r["cache"] == "warm"}
    assert "fresh-cache-" in compiled_logs[1] and "fresh-cache-" not in compiled_logs[2]
    assert "compile-cache" in compiled_logs[2]

    with (run_dir / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(runs) and all(row["failures"] == "0" for row in rows)
    table = (run_dir / "table.md").read_text()
    assert sum(ln.startswith(("| eager", "| compiled")) for ln in table.splitlines()) == len(rows)
    assert "not available" in table and "CPU only" in table
    assert (run_dir / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert list(work.iterdir()) == []  # snapshots and compile caches of the run are gone
