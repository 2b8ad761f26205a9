"""Weight streaming throughput: fastvllm.weights.iter_weights vs the alternatives.

    .venv/bin/python experiments/bench_weights.py [--model-dir DIR] [--repeats 3] [--json OUT]
    .venv/bin/python experiments/bench_weights.py --sweep      # pick threads/chunk/buffers

Methods, all over the same safetensors files:
  (a) raw      single-thread sequential readinto() in 16 MiB blocks (the disk/page-cache ceiling)
  (b) load_file  safetensors.torch.load_file
  (c) vLLM reload_weights  PLACEHOLDER, filled by the vLLM integration work
  (d) runai    runai-model-streamer SafetensorsStreamer (owned=True, its default; and owned=False)
  fast         fastvllm.weights.iter_weights with the module defaults, io=mmap (CPU default)
               and io=pread (the rotating buffers the CUDA path uses)

Consumer work, identical for every method: each tensor's bytes are copied into one
preallocated destination (at the tensor's own file offset), like vLLM copying a
checkpoint tensor into its parameter. For (a), each 16 MiB block is copied the same way,
so every method moves the same bytes twice (file -> memory -> destination).
Each method runs with the page cache warm and dropped (sync + drop_caches, if permitted);
figures are medians of --repeats runs, methods interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import RESULTS, drop_caches, machine  # noqa: E402

from fastvllm import weights  # noqa: E402
from fastvllm.weights import MiB, ReadStats, iter_weights, plan_weights  # noqa: E402

RAW_BLOCK = 16 * MiB


class Sink:
    """The consumer work: copy every tensor into its slot of one preallocated buffer."""

    def __init__(self, plan: weights.WeightPlan):
        self.base, total = {}, 0
        for f in plan.files:
            self.base[f] = total
            total += f.stat().st_size
        self.dest = torch.zeros(total, dtype=torch.uint8)  # faulted in now, not during a timed run
        self.slot = {e.name: self.base[e.file] + e.offset for e in plan.entries}

    def tensor(self, name: str, t: torch.Tensor) -> None:
        lo = self.slot[name]
        self.dest[lo:lo + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))

    def block(self, file: Path, offset: int, t: torch.Tensor) -> None:
        lo = self.base[file] + offset
        self.dest[lo:lo + t.numel()].copy_(t)


def run_raw(plan, sink) -> int:
    buf = bytearray(RAW_BLOCK)
    view = torch.frombuffer(buf, dtype=torch.uint8)
    total = 0
    for path in plan.files:
        with open(path, "rb", buffering=0) as f:
            offset = 0
            while n := f.readinto(buf):
                sink.block(path, offset, view[:n])
                offset += n
        total += offset
    return total


def run_load_file(plan, sink) -> int:
    from safetensors.torch import load_file

    total = 0
    for path in plan.files:
        tensors = load_file(path)
        for name, t in tensors.items():
            sink.tensor(name, t)
            total += t.nbytes
        del tensors
    return total


def run_runai(plan, sink, owned: bool) -> int:
    from runai_model_streamer import SafetensorsStreamer

    total = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(p) for p in plan.files], owned=owned)
        for name, t in streamer.get_tensors():
            sink.tensor(name, t)
            total += t.nbytes
    return total


def run_fast(plan, sink, **kw) -> int:
    total = 0
    for name, t in iter_weights(plan, **kw):
        sink.tensor(name, t)
        total += t.nbytes
    return total


def runai_status() -> str | None:
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError as err:
        return f"not importable ({err})"
    return None


def timed(fn, cold: bool) -> float:
    """GB/s of one run; page cache dropped first if ``cold``."""
    gc.collect()
    if cold:
        drop_caches()
    start = time.perf_counter()
    nbytes = fn()
    return nbytes / (time.perf_counter() - start) / 1e9


def compare(plan, repeats: int, cold_ok: bool) -> dict:
    sink = Sink(plan)
    methods = {"(a) raw sequential read": lambda: run_raw(plan, sink),
               "(b) safetensors load_file": lambda: run_load_file(plan, sink)}
    unavailable = runai_status()
    if unavailable is None:
        methods["(d) runai-model-streamer"] = lambda: run_runai(plan, sink, owned=True)
        methods["(d') runai-model-streamer owned=False"] = lambda: run_runai(plan, sink, owned=False)
    methods["fast iter_weights io=mmap (CPU default)"] = lambda: run_fast(plan, sink, io="mmap")
    methods["fast iter_weights io=pread (CUDA path's buffers)"] = lambda: run_fast(plan, sink, io="pread")
    for fn in methods.values():  # warm the page cache, imports, allocator
        fn()
    results: dict = {}
    for cache in ["warm", "cold"] if cold_ok else ["warm"]:
        runs: dict[str, list[float]] = {m: [] for m in methods}
        for i in range(repeats):
            for name, fn in methods.items():
                runs[name].append(timed(fn, cold=cache == "cold"))
                print(f"  {cache} #{i + 1} {name}: {runs[name][-1]:.2f} GB/s", file=sys.stderr, flush=True)
        if cache == "cold":
            run_raw(plan, sink)  # leave the cache warm
        results[cache] = {m: {"gb_per_s_median": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]}
                          for m, v in runs.items()}
        raw = results[cache]["(a) raw sequential read"]["gb_per_s_median"]
        best_alt = max(v["gb_per_s_median"] for m, v in results[cache].items() if m.startswith(("(b)", "(d")))
        for m, v in results[cache].items():
            v["vs_raw"] = round(v["gb_per_s_median"] / raw, 2)
            v["vs_best_b_d"] = round(v["gb_per_s_median"] / best_alt, 2)
        results[cache]["(c) vLLM reload_weights"] = {
            "placeholder": True, "gb_per_s_median": None,
            "note": "needs a live server: measured by experiments/bench_reload_server.py (both loaders "
                    "through vLLM's in-place reload, including its per-layer processing)"}
    if unavailable is not None:
        results["(d) runai-model-streamer"] = {"unavailable": unavailable}
    return results


def sweep_one(plan, sink, repeats: int, io: str, threads: int, chunk_mib: int, buffers: int, slice_mib: int) -> dict:
    p = plan.rechunk(chunk_mib * MiB)
    weights.SLICE_BYTES = slice_mib * MiB
    stats = [ReadStats() for _ in range(repeats)]
    speeds = [timed(lambda: run_fast(p, sink, threads=threads, buffers=buffers, stats=s, io=io), cold=False)
              for s in stats]
    row = {"io": io, "threads": threads, "chunk_mib": chunk_mib, "buffers": buffers, "slice_mib": slice_mib,
           "gb_per_s_median": round(statistics.median(speeds), 3),
           "wait_s_median": round(statistics.median(s.wait_seconds for s in stats), 3),
           "copies": stats[0].copies, "buffer_mib": round(buffers * p.max_chunk_bytes / MiB)}
    print(f"  io={io} threads={threads} chunk={chunk_mib}MiB buffers={buffers} slice={slice_mib}MiB: "
          f"{row['gb_per_s_median']:.2f} GB/s (consumer waited {row['wait_s_median']:.3f}s)", file=sys.stderr, flush=True)
    return row


def sweep(plan, repeats: int, ios: list[str]) -> list[dict]:
    """Per io mode: the brief's grid at the default slice size, then slice sizes at the
    grid's best."""
    sink = Sink(plan)
    run_raw(plan, sink)  # warm
    default_slice = weights.SLICE_BYTES // MiB
    rows = []
    for io in ios:
        grid = [sweep_one(plan, sink, repeats, io, t, c, b, default_slice)
                for t, c, b in itertools.product([1, 2, 4, 8], [16, 64, 256], [2, 3])]
        best = max(grid, key=lambda r: r["gb_per_s_median"])
        for slice_mib in (1, 16):
            grid.append(sweep_one(plan, sink, repeats, io, best["threads"], best["chunk_mib"], best["buffers"], slice_mib))
        rows += grid
    weights.SLICE_BYTES = default_slice * MiB
    return rows


def markdown(results: dict) -> str:
    caches = [c for c in ("warm", "cold") if c in results]
    lines = ["| method | " + " | ".join(f"{c} GB/s | {c} vs (a) | {c} vs best (b)/(d)" for c in caches) + " |",
             "|---|" + "---|---|---|" * len(caches)]
    for m in results[caches[0]]:
        cells = []
        for c in caches:
            v = results[c][m]
            cells += ["in a live server: experiments/bench_reload_server.py", "", ""] if v.get("placeholder") else [
                f"{v['gb_per_s_median']:.2f}", f"{v['vs_raw']:.2f}x", f"{v['vs_best_b_d']:.2f}x"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_model() -> Path:
    path = Path(__file__).resolve().parent.parent / "models" / "small"
    if not (path / "config.json").is_file():
        from fastvllm.model_maker import make_model

        print(f"building {path} (once, ~15 s)", file=sys.stderr)
        make_model(path, size="small")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write results here (default: experiments/results/)")
    parser.add_argument("--sweep", action="store_true", help="grid over threads/chunk/buffers, warm cache")
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--io", nargs="+", default=["mmap", "pread"], choices=["mmap", "pread"], help="io modes to sweep")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads for the consumer's copies (default: torch's own)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()
    model_dir = args.model_dir or default_model()
    plan = plan_weights(model_dir)
    out = {"model_dir": str(model_dir), "bytes": plan.total_bytes, "slice_bytes": weights.SLICE_BYTES, "files": [str(f) for f in plan.files],
           "repeats": args.repeats, "machine": machine(), "torch_threads": torch.get_num_threads(),
           "defaults": {"threads": weights.DEFAULT_THREADS, "chunk_bytes": weights.DEFAULT_CHUNK_BYTES,
                        "buffers": weights.DEFAULT_BUFFERS},
           "consumer": "copy each tensor's bytes into a preallocated destination"}
    if load_before[0] > 1.0:
        print(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} cores; numbers will be noisy",
              file=sys.stderr)
    if args.sweep:
        rows = sweep(plan, args.repeats, args.io)
        out["sweep"] = rows
        out["best"] = {io: max((r for r in rows if r["io"] == io), key=lambda r: r["gb_per_s_median"]) for io in args.io}
        print("| io | threads | chunk MiB | buffers | slice MiB | GB/s | consumer wait s | buffer MiB |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["io"], -r["gb_per_s_median"])):
            print(f"| {r['io']} | {r['threads']} | {r['chunk_mib']} | {r['buffers']} | {r['slice_mib']} "
                  f"| {r['gb_per_s_median']:.2f} | {r['wait_s_median']:.3f} | {r['buffer_mib']} |")
        print(f"\nbest: {out['best']}")
    else:
        cold_ok = not args.warm_only and drop_caches()
        out["cold_measured"] = cold_ok
        if not cold_ok and not args.warm_only:
            out["cold_note"] = "drop_caches not permitted: warm cache only"
        out["results"] = compare(plan, args.repeats, cold_ok)
        print(markdown(out["results"]))
    out["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = args.json or RESULTS / f"bench_weights{'-sweep' if args.sweep else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\nresults: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
