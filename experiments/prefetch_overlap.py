"""Cold restore with page-cache prefetch: overlapped vs none vs prefetch-then-restore.

    .venv/bin/python experiments/prefetch_overlap.py [--size small] [--repeats 3] [--drop-caches]

One level-2 snapshot; before every restore the snapshot's files (CRIU images, external
files, weights) are evicted from the page cache (`fastvllm restore --cold`; with
--drop-caches the whole cache is dropped too). Modes alternate (A B C A B C ...). Figures:
spawn -> first token of `fastvllm restore`, medians, plus each mode's per-phase timeline from
its median run. Results: experiments/results/prefetch_overlap-*.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time

from harness import (RESULTS, SNAPSHOTS, bundled_model, fastvllm, first_token_from_spawn, machine, parser, run,
                     stop_all, summary)

MODES = ("off", "before", "overlap")


def main() -> None:
    args = parser(__doc__, "small").parse_args()
    model = bundled_model(args.size)
    stop_all()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    snap_dir = SNAPSHOTS / f"bench-prefetch-{args.size}-{stamp}"
    print(f"level-2 snapshot of {model.name} ...", file=sys.stderr, flush=True)
    fastvllm("snapshot", str(model), "--out", str(snap_dir), "--port", str(args.port), "--", "--enforce-eager")
    runs = []
    try:
        for i in range(args.repeats):
            for mode in MODES:
                extra = ["--drop-caches"] if args.drop_caches else []
                out, wall = fastvllm("restore", str(snap_dir), "--cold", "--prefetch", mode, *extra)
                stop_all()
                runs.append({"mode": mode, "repeat": i, "first_token_s": first_token_from_spawn(out, wall),
                             "timings": out["timings"], "timeline": out["timeline"],
                             "resident_bytes": out["resident_bytes"]})
                print(f"  {mode:<8} run {i + 1}/{args.repeats}: first token after {runs[-1]['first_token_s']:6.2f} s",
                      file=sys.stderr, flush=True)
    finally:
        stop_all()
        shutil.rmtree(snap_dir, ignore_errors=True)
    per = {m: [r["first_token_s"] for r in runs if r["mode"] == m] for m in MODES}
    median_runs = {}
    for m in MODES:
        ordered = sorted((r for r in runs if r["mode"] == m), key=lambda r: r["first_token_s"])
        median_runs[m] = ordered[len(ordered) // 2]
    result = {"experiment": "prefetch_overlap", "model": args.size, "machine": machine(),
              "cache": "snapshot files evicted before each run" + (" + drop_caches" if args.drop_caches else ""),
              "first_token_s": {m: summary(v) for m, v in per.items()},
              "overlap_vs_off": round(statistics.median(per["off"]) / statistics.median(per["overlap"]), 2),
              "overlap_vs_before": round(statistics.median(per["before"]) / statistics.median(per["overlap"]), 2),
              "median_run_timelines": {m: r["timeline"] for m, r in median_runs.items()}, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"prefetch_overlap-{args.size}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\n| prefetch | first token, median (min-max) of {args.repeats} | prefetch | CRIU restore | weights | healthy |"
          "\n|---|---|---|---|---|---|")
    for m in MODES:
        s, t = result["first_token_s"][m], median_runs[m]["timeline"]

        def span(key):
            v = t.get(key)
            return f"{v['start']:.2f}-{v['end']:.2f}" if isinstance(v, dict) and v.get("end") is not None else "-"

        print(f"| {m} | {s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f}) | {span('prefetch')} | "
              f"{span('criu_restore')} | {span('weights')} | {t['healthy']:.2f} |")
    print(f"\noverlap vs off {result['overlap_vs_off']:.2f}x, vs before {result['overlap_vs_before']:.2f}x; results in {path}")


if __name__ == "__main__":
    run(main)
