"""One ladder run on the tiny model, --repeats 1, as a user runs it, through
experiments/ladder.py (what ./run.sh bench runs): both server modes, warm and evicted page
cache, and a cross-section of the methods, one of each kind (both cold starts; levels 0, 1
and 2 with the copy engine; level 1 mapped), rather than all 13: every method adds four
runs and every level two snapshots. Slow (~15 min on 2 cores): each cold start is 25-80 s.

Set FASTVLLM_TEST_PORT to pin the port its servers use (default: any free one)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastvllm import server
from fastvllm.bench.methods import BY_ID

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[2]
METHODS = [1, 2, 3, 5, 8, 9]


def test_ladder_smoke_run(tiny_model, tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    port = int(os.environ.get("FASTVLLM_TEST_PORT") or server.free_port())
    cmd = [sys.executable, str(ROOT / "experiments" / "ladder.py"), "--model", str(tiny_model), "--repeats", "1",
           "--methods", ",".join(map(str, METHODS)), "--results-dir", str(results), "--work-dir", str(work),
           "--port", str(port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert results.is_dir() and len(list(results.iterdir())) == 1, proc.stderr[-4000:]
    (run_dir,) = results.iterdir()
    table = (run_dir / "table.md").read_text()
    print(f"\n{table}")

    runs = [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))]
    assert len(runs) == len(METHODS) * 2 * 2  # methods x (eager, compiled) x (warm, evicted)
    # An engine other than copy may be missing here (mmap needs the project's patched CRIU):
    # then its runs fail with the reason, and nothing else may fail.
    optional = [r for r in runs if BY_ID[r["method_id"]].memory not in (None, "copy")]
    assert all(r["ok"] or "not available" in (r["error"] or "") for r in optional), [r["error"] for r in optional]
    required = [r for r in runs if r not in optional]
    assert all(r["ok"] for r in required), [r["error"] for r in required if not r["ok"]]
    assert proc.returncode == (0 if all(r["ok"] for r in runs) else 1), proc.stderr[-4000:]

    ok = [r for r in runs if r["ok"]]
    for r in ok:
        assert sum(r["phases"].values()) == pytest.approx(r["first_token_s"], abs=0.05)
        assert ("weights_reload" in r["phases"]) == (BY_ID[r["method_id"]].level == 2)
        assert ("kv_cache_realloc" in r["phases"]) == (BY_ID[r["method_id"]].level == 1)
        assert r["ready_s"] <= r["first_token_s"]
        # every server, cold or restored, decoded the probe's 64 tokens at a real speed
        # (the first streamed chunk may carry more than one token on a loaded machine)
        assert r["decode_tok_s"] > 0 and r["decode"]["tokens"] == 64 and 32 <= r["decode"]["tokens_timed"] <= 63
        assert r["decode"]["source"] == "engine" and r["decode"]["stream_tok_s"] > 0  # vLLM's clock, see runner
        if BY_ID[r["method_id"]].is_restore:
            assert r["memory"]["requested"] == BY_ID[r["method_id"]].memory
            assert r["memory"]["engine"] == r["memory"]["requested"] or r["memory"]["fallback"]

    # Method 1 compiled in a cache of its own; method 2 reused the run's kept cache.
    compiled_logs = {r["method_id"]: Path(r["log"]).read_text() for r in runs
                     if r["mode"] == "compiled" and r["method_id"] in (1, 2) and r["cache"] == "warm"}
    assert "fresh-cache-" in compiled_logs[1] and "fresh-cache-" not in compiled_logs[2]
    assert "compile-cache" in compiled_logs[2]

    with (run_dir / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(runs)
    for row in rows:
        if row["failures"] == "0":
            assert float(row["decode_tok_s_median"]) > 0 and float(row["decode_vs_cold"]) > 0
            # greedy decoding of a restored server is the cold server's, token for token
            assert row["same_output_as_cold"] == "True", row
    assert sum(ln.startswith(("| eager", "| compiled")) for ln in table.splitlines()) == len(rows)
    assert "not available" in table and "CPU only" in table and "decode vs cold" in table
    assert (run_dir / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert list(work.iterdir()) == []  # snapshots and compile caches of the run are gone
