"""Decode speed after a restore: copy vs mmap, and mmap after the workers privatized
their mapped pages (``fastvllm_privatize``).

    .venv/bin/python experiments/privatize_decode.py SNAPSHOT [--repeats 3] [--tokens 32]

SNAPSHOT is a level-1 (or 2) snapshot. For each repeat: restore with ``--memory copy`` and
time greedy decodes; restore with ``--memory mmap --no-privatize``, time decodes, then
privatize and wait, and time decodes again. Decode is timed by vLLM's own
``vllm:request_decode_time_seconds`` counter (the client's clock is unreliable on 2 busy
cores); worker page faults during decode are counted too. Prints one JSON object and writes
it to experiments/results/privatize_decode-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastvllm import engine, server  # noqa: E402
from fastvllm.bench.runner import measure_decode  # noqa: E402

PROMPT = "Every old teacher watched the ship"


def _fastvllm(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fastvllm.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"fastvllm {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]) + int(fields[9])  # minor + major


def _decodes(endpoint: str, worker: int, n: int, tokens: int) -> dict:
    speeds, faults = [], []
    for _ in range(n):
        before = _faults(worker)
        speeds.append(measure_decode(endpoint, PROMPT, tokens=tokens, timeout=900)["tok_s"])
        faults.append(_faults(worker) - before)
    return {"tok_s": speeds, "median_tok_s": statistics.median(speeds), "faults": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    snap = args.snapshot.absolute()
    runs = []
    for r in range(args.repeats):
        for memory in ("copy", "mmap"):
            extra = ["--no-privatize"] if memory == "mmap" else []
            res = _fastvllm("restore", "--json", str(snap), "--memory", memory, *extra)
            worker = max((psutil.Process(p) for p in res["pids"]), key=lambda p: p.memory_info().rss).pid
            row = {"repeat": r + 1, "memory": memory, "first_token_s": res["timings"]["first_token_s"],
                   "decode": _decodes(res["endpoint"], worker, 2, args.tokens)}
            if memory == "mmap":
                t0 = time.monotonic()
                control = json.loads((snap / "manifest.json").read_text())["server"]["control_dir"]
                done = engine.worker_rpc(server.channel(control, res["pids"][0]), "fastvllm_privatize", {"wait": True})
                row["privatize"] = {"wall_s": round(time.monotonic() - t0, 2), "workers": done}
                row["decode_after_privatize"] = _decodes(res["endpoint"], worker, 2, args.tokens)
            runs.append(row)
            _fastvllm("stop", "--json", "--all")
            print(json.dumps(row), file=sys.stderr, flush=True)

    def med(memory: str, key: str) -> float:
        return round(statistics.median(x[key]["median_tok_s"] for x in runs if x["memory"] == memory), 3)

    summary = {"copy_tok_s": med("copy", "decode"), "mmap_tok_s": med("mmap", "decode"),
               "mmap_privatized_tok_s": med("mmap", "decode_after_privatize"),
               "privatize_s": statistics.median(x["privatize"]["wall_s"] for x in runs if x["memory"] == "mmap")}
    out = {"snapshot": str(snap), "tokens": args.tokens, "repeats": args.repeats, "summary": summary, "runs": runs,
           "command": " ".join(["experiments/privatize_decode.py", *sys.argv[1:]])}
    path = ROOT / "experiments" / "results" / f"privatize_decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({"summary": summary, "results": str(path)}))


if __name__ == "__main__":
    main()
