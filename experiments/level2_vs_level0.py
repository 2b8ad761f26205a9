"""Level 0 (whole process) vs level 2 (weights and KV cache released, weights reloaded)
snapshots of one model: image sizes, and restore -> first token, medians of N in one run.

    .venv/bin/python experiments/level2_vs_level0.py [--size small] [--repeats 3] [--drop-caches]

Restores alternate L0 / L2-fast / L2-vllm (A B C A B C ...) with the same server flags.
Figures are seconds from spawning `fastvllm restore` to the canary's first streamed token
(process start-up included). Results: experiments/results/level2_vs_level0-*.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time

from harness import run, first_token_from_spawn, parser, RESULTS, SNAPSHOTS, bundled_model, drop_caches, fastvllm, machine, stop_all, summary

METHODS = {"level0": ("l0", []), "level2-fast": ("l2", ["--loader", "fast"]), "level2-vllm": ("l2", ["--loader", "vllm"])}


def main() -> None:
    args = parser(__doc__, "small").parse_args()
    server_args = ["--enforce-eager"]
    model = bundled_model(args.size)
    stop_all()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dirs = {"l0": SNAPSHOTS / f"bench-l0-{args.size}-{stamp}", "l2": SNAPSHOTS / f"bench-l2-{args.size}-{stamp}"}
    snaps = {}
    try:
        for key, level in (("l0", "0"), ("l2", "2")):
            print(f"snapshot level {level} of {model.name} ...", file=sys.stderr, flush=True)
            snaps[key], _ = fastvllm("snapshot", str(model), "--out", str(dirs[key]), "--port", str(args.port),
                                     "--level", level, "--", *server_args)
        meta2 = json.loads((dirs["l2"] / "manifest.json").read_text())
        runs = []
        for i in range(args.repeats):
            for method, (key, extra) in METHODS.items():
                dropped = drop_caches() if args.drop_caches else False
                out, wall = fastvllm("restore", str(dirs[key]), *extra)
                stop_all()
                runs.append({"method": method, "repeat": i, "first_token_s": first_token_from_spawn(out, wall), "wall_s": round(wall, 3),
                             "cache_dropped": dropped, "timings": out["timings"], "reload": out.get("reload")})
                print(f"  {method:<12} run {i + 1}/{args.repeats}: first token after {runs[-1]['first_token_s']:6.2f} s",
                      file=sys.stderr, flush=True)
    finally:
        stop_all()
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)

    released = meta2["released"]["workers"]
    weight_bytes = meta2["weights"]["weight_bytes"]
    kv_bytes = sum(w.get("kv_cache_bytes", 0) for w in released)
    saved = snaps["l0"]["image_bytes"] - snaps["l2"]["image_bytes"]
    per = {m: [r["first_token_s"] for r in runs if r["method"] == m] for m in METHODS}
    result = {
        "experiment": "level2_vs_level0", "model": args.size, "server_args": server_args,
        "cache": "dropped before each run" if args.drop_caches else "warm", "machine": machine(),
        "image_bytes": {"level0": snaps["l0"]["image_bytes"], "level2": snaps["l2"]["image_bytes"]},
        "weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "image_bytes_saved": saved,
        "saved_fraction_of_weights_plus_kv": round(saved / (weight_bytes + kv_bytes), 3),
        "released": released, "first_token_s": {m: summary(v) for m, v in per.items()},
        "ratio_level0_over_level2_fast": round(statistics.median(per["level0"]) / statistics.median(per["level2-fast"]), 2),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"level2_vs_level0-{args.size}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    gib = 2**30
    print(f"\nimage: level 0 {snaps['l0']['image_bytes'] / gib:.2f} GiB, level 2 {snaps['l2']['image_bytes'] / gib:.2f} GiB;"
          f" saved {saved / gib:.2f} GiB = {result['saved_fraction_of_weights_plus_kv']:.0%} of weights "
          f"({weight_bytes / gib:.2f} GiB) + KV cache ({kv_bytes / gib:.2f} GiB)")
    print(f"\n| restore method | first token, median (min-max) of {args.repeats} |\n|---|---|")
    for m, s in result["first_token_s"].items():
        print(f"| {m} | {s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f}) |")
    print(f"\nlevel 0 / level 2 (fast): {result['ratio_level0_over_level2_fast']:.2f}x; results in {path}")


if __name__ == "__main__":
    run(main)
