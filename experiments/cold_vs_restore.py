"""Cold start vs CRIU restore, time to first token, medians of N runs in one session.

    ./run.sh bench [--size tiny|small] [--repeats 3] [--level 2|0] [--drop-caches] [-- EXTRA_VLLM_ARGS]

Takes one snapshot, then alternates cold start / restore N times (A B A B ..., so drift in
machine speed hits both alike), with the same server flags for both. Each figure is the
time from spawning ``fastvllm serve`` / ``fastvllm restore`` to the first streamed token of
its probe request: process start-up and imports included (measured from outside as wall
time minus the command's own total), plus the command's own time to first token. Results: experiments/results/cold_vs_restore-*.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time

from harness import run, first_token_from_spawn, parser, RESULTS, SNAPSHOTS, bundled_model, drop_caches, fastvllm, machine, stop_all, summary


def main() -> None:
    cli = parser(__doc__, "tiny")
    cli.add_argument("--level", default="2", choices=["0", "2"], help="snapshot level (default 2)")
    cli.add_argument("server_args", nargs="*", default=None, help="vLLM flags (after --)")
    args = cli.parse_args()
    server_args = args.server_args or ["--enforce-eager"]

    model = bundled_model(args.size)
    stop_all()
    snap_dir = SNAPSHOTS / f"bench-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"level-{args.level} snapshot of {model} with {' '.join(server_args)} ...", file=sys.stderr, flush=True)
    snap, _ = fastvllm("snapshot", str(model), "--out", str(snap_dir), "--port", str(args.port),
                       "--level", args.level, "--", *server_args)
    runs = []
    try:
        for i in range(args.repeats):
            for method in ("cold", "restore"):
                dropped = drop_caches() if args.drop_caches else False
                if method == "cold":
                    out, wall = fastvllm("serve", str(model), "--port", str(args.port), "--", *server_args)
                else:
                    out, wall = fastvllm("restore", str(snap_dir))
                stop_all()
                runs.append({"method": method, "repeat": i, "first_token_s": first_token_from_spawn(out, wall), "wall_s": round(wall, 3),
                             "cache_dropped": dropped, "timings": out["timings"]})
                print(f"  {method:<8} run {i + 1}/{args.repeats}: first token after {runs[-1]['first_token_s']:6.2f} s",
                      file=sys.stderr, flush=True)
    finally:
        stop_all()
        shutil.rmtree(snap_dir, ignore_errors=True)

    cold = [r["first_token_s"] for r in runs if r["method"] == "cold"]
    rest = [r["first_token_s"] for r in runs if r["method"] == "restore"]
    result = {
        "experiment": "cold_vs_restore", "model": args.size, "level": int(args.level), "server_args": server_args,
        "cache": "dropped before each run" if args.drop_caches else "warm", "machine": machine(),
        "snapshot": {"image_bytes": snap["image_bytes"], "timings": snap["timings"]},
        "cold_first_token_s": summary(cold), "restore_first_token_s": summary(rest),
        "ratio_of_medians": round(statistics.median(cold) / statistics.median(rest), 2),
        "median_pairwise_ratio": round(statistics.median(c / r for c, r in zip(cold, rest)), 2),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cold_vs_restore-{args.size}-l{args.level}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    c, r = result["cold_first_token_s"], result["restore_first_token_s"]
    print(f"\n| method | time to first token, median (min-max) of {args.repeats} |\n|---|---|")
    print(f"| cold start (`fastvllm serve`) | {c['median']:.2f} s ({c['min']:.2f}-{c['max']:.2f}) |")
    print(f"| CRIU restore, level {args.level} (`fastvllm restore`) | {r['median']:.2f} s ({r['min']:.2f}-{r['max']:.2f}) |")
    print(f"| ratio (of medians / median pairwise) | {result['ratio_of_medians']:.1f}x / "
          f"{result['median_pairwise_ratio']:.1f}x |")
    print(f"\nimage {snap['image_bytes'] / 2**30:.2f} GiB; results in {path}")


if __name__ == "__main__":
    run(main)
