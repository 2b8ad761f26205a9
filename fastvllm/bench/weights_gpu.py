"""The weight path to a GPU, timed alone: safetensors on local disk -> preallocated tensors on
the device, fastvllm's reader against the limit and against safetensors' own ways.

    python -m fastvllm.bench.weights_gpu --out DIR [--device auto|cuda|cpu] [--gib N]
                                         [--repeats 3] [--quick] [--work DIR] [--keep]
    fastvllm bench-weights-gpu --out DIR ...          (the same, through the CLI)

Why alone: a level-2 restore on a GPU spends its reload in exactly this path (pinned
pieces, a side stream, events: :mod:`fastvllm.device_reader`), and a GPU machine lent for a
few minutes has torch and safetensors but no vLLM and no CRIU. So this needs nothing else:
importing it pulls in torch, safetensors, psutil and fastvllm's stdlib-only modules.

It writes a checkpoint with the tensor names, shapes, shards and order of ``fastvllm
make-model --like llama-3.2-3b`` (random bf16, 6.4 GB; ``--gib`` scales hidden, intermediate
and vocabulary sizes down, keeping all 254 tensors, for CPU smoke runs), then times, with
the page cache warm and (where it can be emptied) cold, medians of ``--repeats``, every
method delivering into the same preallocated tensors, as a reload delivers into parameters:

* (a) the limit: one host-to-device copy of the same byte count from pinned memory, and
  the same bytes in copies of the reader's chunk size;
* (b) ``safetensors.torch.load_file(path, device=...)``;
* (c) ``safe_open`` + ``get_tensor(name).to(device)`` per tensor;
* (d) ``fastvllm.weights.iter_weights(device=...)`` at its defaults, then a sweep of
  threads x chunk size x buffers (warm).

Every run of (b)-(d) starts from poisoned destinations and ends with every tensor compared,
on the device, byte for byte against safetensors' own load of the file. Without a GPU it
says ``no GPU: CUDA figures not measured`` and times the CPU analogues (a host memcpy for
(a), CPU destinations for the rest), which exercises all of this except the CUDA engine
(that one is covered on CPU by tests/unit/test_device_reader.py's deferred-copy engine).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import model_maker, prefetch, weights
from ..weights import MiB, ReadStats, WeightPlan, iter_weights, plan_weights
from . import machine

LIKE = "llama-3.2-3b"
SCHEMA = "fastvllm.bench.weights_gpu/1"
NO_GPU = "no GPU: CUDA figures not measured"
TARGET_VS_LIMIT = 0.8  # issue 13: the reader at >= 0.8x pinned host-to-device bandwidth
TARGET_VS_LIBRARIES = 1.5  # ... and >= 1.5x the better of load_file and safe_open
DEFAULT_WORK = Path("/var/tmp/fastvllm-bench-weights-gpu")
_MARKER = "bench-checkpoint.json"
_ALIGN = 256  # destination offsets: any dtype view is aligned


@dataclass
class Config:
    out: Path
    device: str = "auto"
    gib: float | None = None  # None: the full llama-3.2-3b size
    repeats: int = 3
    quick: bool = False
    work: Path = DEFAULT_WORK
    keep: bool = False
    evict: str = "drop_caches"  # drop_caches (falls back to files), files, none
    budget_s: float = 420.0
    seed: int = 0
    command: str = ""


@dataclass
class Deadline:
    """Sections run in order of importance and are skipped, and said so, once the budget
    would be overrun: a lent GPU machine runs one command for at most 10 minutes."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


# --------------------------------------------------------------------------- the checkpoint


def bench_config(gib: float | None) -> dict:
    """``llama-3.2-3b``'s config, or the same 28 layers with hidden, intermediate and
    vocabulary sizes scaled so the weights are about ``gib`` GiB: names, groups, shard
    layout and file order stay those of the real model; only the sizes shrink."""
    cfg = model_maker.like_config(LIKE)
    full = 2 * model_maker.param_count(cfg)
    if gib is None or gib * 2**30 >= full:
        return cfg
    f = math.sqrt(gib * 2**30 / full)
    hd = cfg["head_dim"]
    heads = max(1, round(cfg["num_attention_heads"] * f))
    cfg.update(hidden_size=heads * hd, num_attention_heads=heads,
               num_key_value_heads=max(1, round(cfg["num_key_value_heads"] * f)),
               intermediate_size=max(hd, round(cfg["intermediate_size"] * f / hd) * hd),
               vocab_size=max(512, round(cfg["vocab_size"] * f)))
    return cfg


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    """Normal bf16 everywhere, norms included: any misplaced byte changes a value. Drawn
    on the GPU where there is one (6.4 GB in well under a second instead of ~20 s of CPU)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(generator=gen).cpu()


def write_checkpoint(directory: Path, cfg: dict, seed: int, gen_device: str) -> dict:
    """The shards of ``make-model --like`` (same names, shapes, shard split, tensors sorted
    by name by ``safetensors.save_file``), synced to disk so they can be evicted; a run
    with the same config and seed reuses them."""
    from safetensors.torch import save_file

    want = {"schema": SCHEMA, "config": cfg, "seed": seed}
    marker = directory / _MARKER
    if marker.is_file():
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = {}
        if {k: have.get(k) for k in want} == want and all((directory / f).is_file() for f in have.get("files", [])):
            return {**have, "reused": True, "seconds": 0.0}
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    t0 = time.perf_counter()
    shards = model_maker.shard_plan(model_maker.tensor_table(cfg), model_maker.LIKE_SHARD_BYTES)
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {n: _random_tensor(n, shape, seed, gen_device) for n, shape in shard}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files.append(name)
        weight_map.update({n: name for n, _ in shard})
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    info = {**want, "files": files, "tensor_bytes": total, "tensors": len(weight_map), "generated_on": gen_device}
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False, "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- destinations


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class Destination:
    """One preallocated tensor per checkpoint tensor, as a reload's parameters are, carved
    out of one flat buffer so a whole pass can be poisoned with one fill."""

    def __init__(self, plan: WeightPlan, device: str):
        offsets, total = {}, 0
        for e in plan.entries:
            offsets[e.name] = total
            total += -(-e.nbytes // _ALIGN) * _ALIGN
        self.flat = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        self.tensors = {e.name: self.flat[offsets[e.name]:offsets[e.name] + e.nbytes].view(e.torch_dtype).view(e.shape)
                        for e in plan.entries}

    def poison(self) -> None:
        self.flat.fill_(0xFF)

    def mismatches(self, reference: dict[str, torch.Tensor]) -> list[str]:
        """Names whose bytes differ from ``reference`` (compared where they live)."""
        bad = [n for n, t in self.tensors.items()
               if t.shape != reference[n].shape or t.dtype != reference[n].dtype
               or not torch.equal(_bytes(t), _bytes(reference[n]))]
        return bad + [n for n in reference if n not in self.tensors]


def load_reference(plan: WeightPlan, device: str) -> dict[str, torch.Tensor]:
    """The checkpoint as safetensors itself loads it onto ``device``: what (d) must equal."""
    from safetensors.torch import load_file

    ref: dict[str, torch.Tensor] = {}
    for f in plan.files:
        ref.update(load_file(str(f), device=device))
    if device == "cpu":  # CPU tensors may map the file, which would keep it in the page cache
        ref = {name: t.clone() for name, t in ref.items()}
    return ref


# --------------------------------------------------------------------------- methods


@dataclass
class Method:
    key: str
    label: str
    run: Callable[[], object]  # returns a ReadStats for the reader, else None
    verify: bool = True


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _free_host_cache() -> None:
    """Give cached pinned memory back (the 6.4 GB source of (a) would stay pinned)."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


class Methods:
    """The methods of one run, over one plan, into one :class:`Destination`."""

    def __init__(self, plan: WeightPlan, dest: Destination, device: str):
        self.plan, self.dest, self.device = plan, dest, device
        self.cuda = device.startswith("cuda")
        self.host: torch.Tensor | None = None

    def limit_source(self) -> None:
        """(a)'s source: pinned memory on a GPU, ordinary (faulted-in) memory on CPU."""
        if self.host is None:
            self.host = torch.empty(self.plan.total_bytes, dtype=torch.uint8, pin_memory=self.cuda)
            self.host.fill_(1)

    def drop_limit_source(self) -> None:
        self.host = None
        gc.collect()
        if self.cuda:
            _free_host_cache()

    def limit_one(self) -> None:
        self.dest.flat[:self.host.numel()].copy_(self.host, non_blocking=self.cuda)

    def limit_chunked(self, chunk: int) -> None:
        n = self.host.numel()
        for lo in range(0, n, chunk):
            self.dest.flat[lo:min(n, lo + chunk)].copy_(self.host[lo:min(n, lo + chunk)], non_blocking=self.cuda)

    def load_file(self) -> None:
        from safetensors.torch import load_file

        for f in self.plan.files:
            loaded = load_file(str(f), device=self.device)
            for name, t in loaded.items():
                self.dest.tensors[name].copy_(t)
            del loaded

    def safe_open(self) -> None:
        from safetensors import safe_open

        for f in self.plan.files:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    self.dest.tensors[name].copy_(handle.get_tensor(name).to(self.device))

    def reader(self, **tuning) -> ReadStats:
        stats = ReadStats()
        for name, t in iter_weights(self.plan, device=self.device, stats=stats, **tuning):
            self.dest.tensors[name].copy_(t)
        return stats


def tuning_label(t: dict) -> str:
    parts = [f"{t['threads']} threads", f"{t['chunk_bytes'] // MiB} MiB x {t['buffers']}"]
    if t.get("io"):
        parts.append(f"io={t['io']}")
    return ", ".join(parts)


def default_tuning(device: str) -> dict:
    if device.startswith("cuda"):
        from ..device_reader import DEFAULT_DEVICE_THREADS as threads
    else:
        threads = weights.DEFAULT_THREADS
    return {"threads": threads, "chunk_bytes": weights.DEFAULT_CHUNK_BYTES, "buffers": weights.DEFAULT_BUFFERS}


def sweep_grid(device: str, quick: bool) -> list[dict]:
    """Threads x chunk x buffers around the defaults; threads beyond 2x the cores are left out."""
    cores = os.cpu_count() or 1
    if quick:  # one step away from the CPU defaults in each direction
        settings = [(1, 64, 2), (2, 16, 2), (2, 64, 3)]
    else:
        settings = [(t, c, b) for t in (2, 4, 8, 16) for c in (16, 64, 256) for b in (2, 4)]
    rows = [{"threads": t, "chunk_bytes": c * MiB, "buffers": b} for t, c, b in settings if t <= 2 * cores]
    if not device.startswith("cuda"):
        rows = [dict(r, io="pread") for r in rows]  # on CPU the buffers only matter to pread
    return rows


# --------------------------------------------------------------------------- page cache


def resident_fraction(files: list[Path]) -> float | None:
    try:
        rows = prefetch.residency(files)
    except (OSError, prefetch.PrefetchError):
        return None
    total = sum(r.size for r in rows)
    return round(sum(r.resident_bytes for r in rows) / total, 3) if total else None


def evict(files: list[Path], how: str) -> str | None:
    """Empty the page cache of the checkpoint: the whole cache (``drop_caches``, which needs
    root outside a sandbox; falls back to the files) or the files alone. Returns what worked."""
    if how == "drop_caches":
        try:
            prefetch.drop_page_cache()
            return "drop_caches"
        except OSError:
            how = "files"
    if how == "files":
        try:
            prefetch.evict(files)
            return "files (" + prefetch.backend() + ")"
        except (OSError, prefetch.PrefetchError):
            return None
    return None


# --------------------------------------------------------------------------- measuring


def _timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    gc.collect()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


class Recorder:
    """Runs methods, keeps their times, checks their destinations, and knows the bytes."""

    def __init__(self, methods: Methods, reference: dict, nbytes: int, say: Callable[[str], None]):
        self.m, self.ref, self.nbytes, self.say = methods, reference, nbytes, say

    def once(self, method: Method, row: dict, tag: str) -> None:
        if method.verify:
            self.m.dest.poison()
        seconds, out = _timed(method.run, self.m.device)
        row.setdefault("runs_s", []).append(round(seconds, 4))
        if isinstance(out, ReadStats):
            row.setdefault("reader_stats", []).append(
                {k: v for k, v in {**out.as_dict(), **out.extra}.items()
                 if k in ("wait_seconds", "chunks", "tensors", "copies", "pinned_bytes", "pinned_alloc_s", "io")})
        if method.verify:
            bad = self.m.dest.mismatches(self.ref)
            check = row.setdefault("verified", {"runs": 0, "tensors": len(self.ref), "runs_with_mismatches": 0,
                                                "mismatched": []})
            check["runs"] += 1
            if bad:
                check["runs_with_mismatches"] += 1
                check["mismatched"] = sorted(set(check["mismatched"]) | set(bad[:20]))[:20]
        self.say(f"  {tag} {method.label}: {self.nbytes / seconds / 1e9:.2f} GB/s ({seconds:.3f} s)"
                 + ("" if not method.verify else " identical" if not (row["verified"]["mismatched"]) else " MISMATCH"))

    def finish(self, row: dict, label: str) -> dict:
        runs = row.get("runs_s", [])
        row["label"] = label
        if runs:
            med = statistics.median(runs)
            row.update(seconds_median=round(med, 4), seconds_min=round(min(runs), 4), seconds_max=round(max(runs), 4),
                       gb_per_s_median=round(self.nbytes / med / 1e9, 3))
        return row


def ratios(rows: dict) -> dict:
    """(d) against the limit (the better (a)) and against the better of (b) and (c)."""
    def rate(key: str) -> float | None:
        return (rows.get(key) or {}).get("gb_per_s_median")

    limits = [r for r in (rate("a_one"), rate("a_chunked")) if r]
    libs = [r for r in (rate("b_load_file"), rate("c_safe_open")) if r]
    out: dict = {"limit_gb_per_s": max(limits) if limits else None, "best_library_gb_per_s": max(libs) if libs else None}
    for key in ("d_defaults", "d_best_sweep"):
        r = rate(key)
        if r is None:
            continue
        vs_limit = round(r / out["limit_gb_per_s"], 3) if limits else None
        vs_libs = round(r / out["best_library_gb_per_s"], 3) if libs else None
        out[key] = {"vs_limit": vs_limit, "vs_best_library": vs_libs,
                    "meets_vs_limit": vs_limit is not None and vs_limit >= TARGET_VS_LIMIT,
                    "meets_vs_library": vs_libs is not None and vs_libs >= TARGET_VS_LIBRARIES}
    return out


def summary_lines(result: dict) -> list[str]:
    """One line per method and cache state, then the targets, then the sweep's best."""
    lines = []
    if not result.get("gpu_measured"):
        lines.append(f"{NO_GPU} ({result.get('device_note', 'no CUDA device')}); the figures below are the "
                     "CPU analogues: (a) a host memcpy, (b)-(d) into preallocated host tensors")
    ck = result.get("checkpoint", {})
    load = result.get("loadavg_1min") or {}
    lines.append(f"checkpoint: {ck.get('tensors')} tensors, {ck.get('tensor_bytes', 0) / 1e9:.2f} GB in "
                 f"{len(ck.get('files', []))} files ({LIKE} shapes{', scaled' if result.get('scaled') else ''}); "
                 f"device {result.get('device')}; load average {load.get('start')} -> {load.get('end')} "
                 f"on {(result.get('machine') or {}).get('cores')} cores")
    for cache in ("warm", "cold"):
        rows = result.get("results", {}).get(cache) or {}
        for key, row in rows.items():
            if "gb_per_s_median" not in row:
                continue
            check = row.get("verified")
            ok = ("" if not check else f"; {check['tensors']} tensors bit-identical in {check['runs']} runs"
                  if not check["runs_with_mismatches"] else
                  f"; MISMATCH in {check['runs_with_mismatches']} of {check['runs']} runs: {check['mismatched'][:3]}")
            lines.append(f"{cache} {row['label']}: {row['gb_per_s_median']:.2f} GB/s "
                         f"(median {row['seconds_median']:.3f} s of {len(row['runs_s'])}){ok}")
        rat = (result.get("ratios") or {}).get(cache) or {}
        for key in ("d_defaults", "d_best_sweep"):
            if key in rat:
                r = rat[key]
                lines.append(f"{cache} {key}: {r['vs_limit']}x the limit (a) (target >= {TARGET_VS_LIMIT}x: "
                             f"{'met' if r['meets_vs_limit'] else 'NOT met'}), {r['vs_best_library']}x the best of "
                             f"(b),(c) (target >= {TARGET_VS_LIBRARIES}x: {'met' if r['meets_vs_library'] else 'NOT met'})"
                             + ("" if result.get("gpu_measured") else " [CPU analogue, not a GPU figure]"))
    sweep = result.get("sweep") or []
    if sweep:
        best = max(sweep, key=lambda r: r.get("gb_per_s_median", 0))
        lines.append(f"sweep ({len(sweep)} settings, warm): best {tuning_label(best)} at {best.get('gb_per_s_median')} "
                     f"GB/s; worst {min(r.get('gb_per_s_median', 0) for r in sweep)} GB/s")
    for note in result.get("skipped", []):
        lines.append(f"skipped: {note}")
    return lines


# --------------------------------------------------------------------------- the run


def resolve_device(requested: str) -> tuple[str, str | None]:
    """``cuda:N`` when asked for (or ``auto``) and usable, else ``cpu`` with the reason."""
    if requested == "cpu":
        return "cpu", "--device cpu"
    try:
        usable = torch.cuda.is_available()
    except Exception as err:  # a broken driver install
        return "cpu", f"CUDA unusable: {err}"
    if not usable:
        return "cpu", "torch.cuda.is_available() is False" + (f" (torch {torch.__version__}, CUDA build "
                                                                f"{torch.version.cuda})" if torch.version.cuda else
                                                                f" (torch {torch.__version__} is a CPU build)")
    dev = torch.device(requested if requested.startswith("cuda") else "cuda")
    return f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}", None


def _versions() -> dict:
    import safetensors

    out = {"python": platform.python_version(), "torch": torch.__version__, "safetensors": safetensors.__version__,
           "torch_threads": torch.get_num_threads()}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        out["fastvllm_commit"] = commit or None
    except (OSError, subprocess.TimeoutExpired):
        out["fastvllm_commit"] = None
    return out


def result_path(out: Path, device: str) -> Path:
    return out / f"bench_weights_gpu-{'cuda' if device.startswith('cuda') else 'cpu'}.json"


def run(cfg: Config, say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """The whole benchmark; writes ``bench_weights_gpu-{cuda,cpu}.json`` (after every section,
    so a run cut short still leaves its figures) and returns the same object."""
    deadline = Deadline(cfg.budget_s)
    device, note = resolve_device(cfg.device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = result_path(cfg.out, device)
    result: dict = {"schema": SCHEMA, "command": cfg.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "device": device, "gpu_measured": device.startswith("cuda"), "repeats": cfg.repeats,
                    "quick": cfg.quick, "scaled": cfg.gib is not None, "skipped": [], "notes": [],
                    "consumer": "each tensor copied into its own preallocated tensor on the device (one flat buffer), "
                                "as a reload copies into parameters; (a) copies into the same buffer"}
    result["loadavg_1min"] = {"start": round(os.getloadavg()[0], 2)}  # others' load makes figures noisy
    if note:
        result["device_note"] = note
        say(f"{NO_GPU} ({note}); timing the CPU analogues")
    if cfg.repeats < 3:
        result["notes"].append(f"repeats={cfg.repeats}: fewer than 3, medians are not robust")
    cfg.work.mkdir(parents=True, exist_ok=True)
    result["machine"] = {**machine.describe(cfg.work), "cuda": machine.cuda_info(device) if result["gpu_measured"] else None,
                         **_versions()}
    save = lambda: _write_json(path, result)  # noqa: E731
    ckpt_dir = cfg.work / "checkpoint"
    gen_device = device if result["gpu_measured"] else "cpu"
    say(f"writing the checkpoint to {ckpt_dir} ...")
    result["checkpoint"] = {**write_checkpoint(ckpt_dir, bench_config(cfg.gib), cfg.seed, gen_device),
                            "dir": str(ckpt_dir)}
    plan = plan_weights(ckpt_dir)
    nbytes = plan.total_bytes
    how = "reused" if result["checkpoint"]["reused"] else "written in {} s".format(result["checkpoint"]["seconds"])
    say(f"checkpoint: {len(plan.entries)} tensors, {nbytes / 1e9:.2f} GB in {len(plan.files)} files ({how})")
    save()
    try:
        _measure(cfg, result, plan, device, deadline, say, save)
    finally:
        result["seconds_total"] = round(time.perf_counter() - deadline.start, 1)
        result["loadavg_1min"]["end"] = round(os.getloadavg()[0], 2)
        result["summary"] = summary_lines(result)
        save()
        (path.with_suffix(".txt")).write_text("\n".join(result["summary"]) + "\n")
        if not cfg.keep:
            shutil.rmtree(cfg.work / "checkpoint", ignore_errors=True)
            try:
                cfg.work.rmdir()  # only if it is now empty: it may be a directory of the user's
            except OSError:
                pass
    return result


def _measure(cfg: Config, result: dict, plan: WeightPlan, device: str, deadline: Deadline,
             say: Callable[[str], None], save: Callable[[], None]) -> None:
    nbytes = plan.total_bytes
    dest = Destination(plan, device)
    t0 = time.perf_counter()
    reference = load_reference(plan, device)
    result["reference_load_s"] = round(time.perf_counter() - t0, 3)
    m = Methods(plan, dest, device)
    rec = Recorder(m, reference, nbytes, say)
    defaults = default_tuning(device)
    result["defaults"] = defaults
    where = "GPU" if m.cuda else "CPU analogue"
    a_src = "pinned host -> device" if m.cuda else "host memcpy (CPU analogue of pinned H2D)"
    main = [
        Method("b_load_file", f"(b) safetensors load_file(device={device})", m.load_file),
        Method("c_safe_open", f"(c) safe_open + get_tensor().to({device}) per tensor", m.safe_open),
        Method("d_defaults", f"(d) fastvllm reader, defaults ({tuning_label(defaults)})", lambda: m.reader()),
    ]
    if not m.cuda:
        pread = dict(defaults, io="pread")
        main.append(Method("d_pread", f"(d) fastvllm reader, {tuning_label(pread)}", lambda: m.reader(**pread)))
    limits = [Method("a_one", f"(a) {a_src}, one {nbytes / 1e9:.2f} GB copy", m.limit_one, verify=False),
              Method("a_chunked", f"(a) {a_src}, {defaults['chunk_bytes'] // MiB} MiB copies",
                     lambda: m.limit_chunked(defaults["chunk_bytes"]), verify=False)]
    results = result.setdefault("results", {})

    # (d)'s very first call in this process: creates the engine, pins its buffers.
    first = Method("d_first_call", "(d) defaults, first call in the process"
                   + (" (creates the engine, pins its buffers)" if m.cuda else ""), lambda: m.reader())
    row_first: dict = {}
    rec.once(first, row_first, "first")
    result["first_call"] = rec.finish(row_first, first.label)

    # warm: every file read once above; (a) has no file.
    say(f"warm page cache ({where}): {cfg.repeats} repeats, methods interleaved")
    for meth in main:
        _timed(meth.run, device)  # warm-up: page cache, allocator, safetensors' own caches
    result["page_cache"] = {"warm_resident_fraction": resident_fraction(list(plan.files))}
    warm = results.setdefault("warm", {})
    m.limit_source()
    for meth in limits:
        _timed(meth.run, device)
    for i in range(cfg.repeats):
        for meth in limits + main:
            rec.once(meth, warm.setdefault(meth.key, {}), f"warm #{i + 1}")
    m.drop_limit_source()
    for meth in limits + main:
        rec.finish(warm[meth.key], meth.label)
    result.setdefault("ratios", {})["warm"] = ratios(warm)
    save()

    # sweep of the reader (warm)
    sweep = result.setdefault("sweep", [])
    grid = sweep_grid(device, cfg.quick)
    per_run = warm["d_defaults"]["seconds_median"]
    say(f"sweep: {len(grid)} settings x {cfg.repeats}")
    cold_reserve = 0.0 if cfg.evict == "none" else min(120.0, 10 * cfg.repeats * sum(
        warm[k]["seconds_median"] for k in ("b_load_file", "c_safe_open", "d_defaults")))
    for j, tuning in enumerate(grid):
        if deadline.left() < cold_reserve + 3 * per_run * (cfg.repeats + 1) + 10:
            result["skipped"].append(f"sweep settings {j + 1}-{len(grid)} of {len(grid)}: time budget")
            break
        meth = Method("d_sweep", f"(d) {tuning_label(tuning)}", lambda t=tuning: m.reader(**t))
        row: dict = dict(tuning)
        _timed(meth.run, device)
        for i in range(cfg.repeats):
            rec.once(meth, row, f"sweep {j + 1}/{len(grid)} #{i + 1}")
        sweep.append(rec.finish(row, meth.label))
        save()
    if sweep:
        best = max(sweep, key=lambda r: r["gb_per_s_median"])
        warm["d_best_sweep"] = dict(best, label=f"(d) fastvllm reader, best of the sweep ({tuning_label(best)})")
        result["ratios"]["warm"] = ratios(warm)
    save()

    # cold: the page cache emptied before every run
    if cfg.evict == "none":
        result["skipped"].append("cold page cache: --evict none")
        return
    how = evict(list(plan.files), cfg.evict)
    left = resident_fraction(list(plan.files))
    result["page_cache"].update(evict=how, cold_resident_fraction=left)
    if how is None or (left is not None and left > 0.1):
        result["skipped"].append(f"cold page cache: eviction {'failed' if how is None else 'left'} "
                                 f"{'' if left is None else f'{left:.0%} of the checkpoint resident'}".strip())
        return
    cold = results.setdefault("cold", {})
    one_repeat = 10 * sum(warm[meth.key]["seconds_median"] for meth in main)  # cold: up to ~10x slower than warm
    say(f"cold page cache ({how}): {cfg.repeats} repeats")
    for i in range(cfg.repeats):
        if deadline.left() < one_repeat:
            result["skipped"].append(f"cold repeats {i + 1}-{cfg.repeats}: time budget")
            break
        for meth in main:
            evict(list(plan.files), how.split(" ")[0])
            rec.once(meth, cold.setdefault(meth.key, {}), f"cold #{i + 1}")
    for meth in main:
        if meth.key in cold:
            rec.finish(cold[meth.key], meth.label)
    if cold:
        limit_rows = {k: warm[k] for k in ("a_one", "a_chunked")}  # (a) reads no file: its cache state is moot
        result["ratios"]["cold"] = ratios({**limit_rows, **cold})
    result["page_cache"]["note"] = "(a) reads no file; the cold ratios use its warm figure"


def _write_json(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m fastvllm.bench.weights_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where the JSON and the summary go")
    p.add_argument("--device", default="auto", help="auto (CUDA if usable), cuda, cuda:N or cpu")
    p.add_argument("--gib", type=float, default=None, help="scale the checkpoint to about this many GiB "
                                                           "(default: the full 6.4 GB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a small sweep (CPU smoke runs)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the checkpoint is written (local disk)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (a rerun reuses it)")
    p.add_argument("--evict", choices=["drop_caches", "files", "none"], default="drop_caches",
                   help="cold runs: drop the whole page cache (falls back to the files), the checkpoint's "
                        "files only (leaves other processes' cache alone), or no cold runs")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the sweep's and cold runs' remainder past this")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return Config(out=a.out, device=a.device, gib=a.gib, repeats=a.repeats, quick=a.quick, work=a.work, keep=a.keep,
                  evict=a.evict, budget_s=a.budget_s, seed=a.seed,
                  command=" ".join(["python -m fastvllm.bench.weights_gpu", *(argv if argv is not None else sys.argv[1:])]))


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every checked tensor was bit-identical (with or without a GPU), else 1."""
    cfg = parse_args(argv)
    result = run(cfg)
    for line in result["summary"]:
        print(line)
    print(f"results: {result_path(cfg.out, result['device'])}")
    rows = [r for cache in result.get("results", {}).values() for r in cache.values()] + result.get("sweep", [])
    rows.append(result.get("first_call") or {})
    return 1 if any((r.get("verified") or {}).get("runs_with_mismatches") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
