"""The ``fastvllm`` command line: a thin Typer layer over the library modules.

Every command prints one line and exits non-zero on a :class:`FastvllmError`; ``--json``
prints exactly one JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Optional

import typer

from . import registry, server
from .errors import FastvllmError, Terminated
from .paths import logs_dir
from .progress import Progress

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Snapshot a ready vLLM server with CRIU and restore it in seconds.")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
API_KEY_HELP = ("Require this key on the OpenAI routes (default $VLLM_API_KEY; also taken from the vLLM args). "
                "Never written to the manifest, records or logs.")
HOST_HELP = "Address to listen on (127.0.0.1; 0.0.0.0 for every interface)."


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for line in lines:
            print(line)


def _timings_line(timings: dict) -> str:
    return "  ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in timings.items())


@app.command("make-model")
def make_model_cmd(out: Path = typer.Argument(..., help="Directory to create (must not exist or be empty)."),
                   size: Optional[str] = typer.Option(None, help="tiny (~12 MB, the default) or small (~0.9 GB)."),
                   like: Optional[str] = typer.Option(None, help="A real checkpoint's exact shapes with random "
                                                      "weights: llama-3.2-1b, llama-3.2-3b (6.4 GB), llama-3.1-8b."),
                   seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
                   as_json: bool = typer.Option(False, "--json")):
    """Write a random-init Llama model with a locally trained tokenizer (no hub needed)."""
    from .model_maker import SIZES, make_model

    if size is not None and like is not None:
        raise FastvllmError("--size and --like are exclusive", fix="pass one of them")
    if size is not None and size not in SIZES:
        raise FastvllmError(f"unknown --size {size}", fix=f"choose one of {', '.join(SIZES)}, or use --like")
    try:
        info = make_model(out, size=size, seed=seed, like=like)
    except FileExistsError as exc:
        raise FastvllmError(str(exc)) from None
    _emit(info, as_json, [f"model written to {info['path']} ({info['weight_bytes'] / 1e6:.1f} MB of weights, "
                          f"{info['params'] / 1e6:.0f}M params, {info['seconds']:.1f}s)"])


@app.command(context_settings=EXTRA)
def serve(ctx: typer.Context, model: str = typer.Argument(..., help="Model directory or hub id."),
          port: int = typer.Option(server.DEFAULT_PORT, help="Port to listen on."),
          host: str = typer.Option(server.LOOPBACK, help=HOST_HELP),
          api_key: Optional[str] = typer.Option(None, "--api-key", help=API_KEY_HELP, show_default=False),
          as_json: bool = typer.Option(False, "--json")):
    """Cold-start a vLLM OpenAI server (detached) through fastvllm's API-server entry (the
    same program a restore runs), wait for it to answer, print timings."""
    from . import api_key as keys
    from .snapshot import resolve_model

    progress = Progress(quiet=as_json)
    args, key = keys.resolve(api_key, list(ctx.args))
    spec = server.ServerSpec(model=resolve_model(model), port=port, host=host, extra_args=args, api_key=key)
    log_path = logs_dir() / f"serve-{secrets.token_hex(6)}.log"
    with progress.step(f"starting vLLM server on {host}:{port}"):
        started = server.start_and_probe(spec, log_path, "serve", progress.elapsed, server.CANARY_PROMPT)
    proc = started.proc
    timings = {"healthy_s": round(started.healthy_s, 3), "first_token_s": round(started.first_token_s, 3),
               "total_s": round(progress.elapsed(), 3)}
    _emit({"endpoint": spec.endpoint, "pids": started.pids, "log": str(log_path), "timings": timings}, as_json,
          [f"serving {spec.model} at {spec.endpoint} (pid {proc.pid}, log {log_path})", _timings_line(timings)])


@app.command(context_settings=EXTRA)
def snapshot(ctx: typer.Context, model: str = typer.Argument(..., help="Model directory or hub id."),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Snapshot directory to create."),
             port: int = typer.Option(server.DEFAULT_PORT, help="Port restores listen on by default (the snapshotted "
                                                                "server itself never listens)."),
             host: str = typer.Option(server.LOOPBACK, help="Address restores listen on by default."),
             api_key: Optional[str] = typer.Option(None, "--api-key", help="Mark the snapshot as protected: every "
                                                   "restore must be given a key (default $VLLM_API_KEY). "
                                                   "No key is stored.", show_default=False),
             level: Optional[int] = typer.Option(None, help="1: release the KV cache before the dump (the image keeps "
                                                          "the packed weights; default on CPU); 2: release weights "
                                                          "and KV cache, reload the weights on restore (smallest "
                                                          "image; default on GPU); 0: whole process."),
             copy_weights: bool = typer.Option(False, "--copy-weights",
                                               help="Level 2: copy the safetensors into the snapshot "
                                                    "instead of referencing the model directory."),
             as_json: bool = typer.Option(False, "--json")):
    """Start MODEL's server, warm it, record a canary, and CRIU-dump the whole process tree."""
    from .snapshot import take_snapshot

    result = take_snapshot(model, out, port, list(ctx.args), Progress(quiet=as_json), level=level,
                           copy_weights=copy_weights, host=host, api_key=api_key)
    _emit(result, as_json, [f"snapshot written to {result['snapshot']} "
                            f"({result['image_bytes'] / 2**20:.0f} MiB of CRIU images)",
                            _timings_line(result["timings"])])


@app.command()
def restore(snapshot: Path = typer.Argument(..., help="Snapshot directory."),
            host: Optional[str] = typer.Option(None, help="Address to listen on (default: the snapshot's).",
                                               show_default=False),
            port: Optional[int] = typer.Option(None, help="Port to listen on (default: the snapshot's).",
                                               show_default=False),
            api_key: Optional[str] = typer.Option(None, "--api-key", help=API_KEY_HELP + " Required when the "
                                                  "snapshot's server had one.", show_default=False),
            loader: str = typer.Option("fast", help="Level 2: 'fast' (fastvllm's parallel reader) or "
                                                    "'vllm' (vLLM's own reload_weights)."),
            threads: Optional[int] = typer.Option(None, help="Level 2 fast loader: reader threads."),
            chunk_mb: Optional[int] = typer.Option(None, help="Level 2 fast loader: chunk size in MiB."),
            buffers: Optional[int] = typer.Option(None, help="Level 2 fast loader: rotating chunk buffers (>= 2)."),
            prefetch: str = typer.Option("overlap", help="Page-cache prefetch of the snapshot's files: "
                                                         "overlap (beside restore), before, or off."),
            cold: bool = typer.Option(False, "--cold", help="Evict the snapshot's files from the page cache first."),
            drop_caches: bool = typer.Option(False, "--drop-caches",
                                             help="With --cold: drop the whole page cache (root only)."),
            memory: str = typer.Option("auto", help="CRIU memory engine: auto (mmap where the patched CRIU "
                                                    "has it, else copy), copy (read the page images), hugepage "
                                                    "(copy into transparent huge pages), mmap (map the page "
                                                    "images copy-on-write: zero-copy), lazy (userfaultfd)."),
            privatize: bool = typer.Option(True, "--privatize/--no-privatize",
                                           help="After an mmap restore, copy the mapped weights into private "
                                                "memory in the background (full decode speed after ~10 s on 6 GB)."),
            trust_images: bool = typer.Option(False, "--trust-images",
                                              help="Skip proving the CRIU images unchanged before a copy, hugepage "
                                                   "or lazy restore (for storage you trust; mmap always checks)."),
            as_json: bool = typer.Option(False, "--json")):
    """Restore a snapshot's server, wake it, check its canary in-process, and only then
    listen on HOST:PORT (default: the snapshot's) and leave it serving."""
    from . import api_key as keys
    from .restore import restore_snapshot

    if loader not in ("fast", "vllm"):
        raise FastvllmError(f"unknown --loader {loader}", fix="use fast or vllm")
    tuning = {"threads": threads, "chunk_bytes": chunk_mb * 2**20 if chunk_mb else None, "buffers": buffers}
    result = restore_snapshot(snapshot, Progress(quiet=as_json), loader=loader, tuning=tuning,
                              prefetch_mode=prefetch, cold=cold, drop_caches=drop_caches,
                              measure_residency=as_json, memory=memory, privatize=privatize, host=host, port=port,
                              api_key=keys.resolve(api_key, [])[1], trust_images=trust_images)
    mem = result["memory"]
    _emit(result, as_json, [f"serving again at {result['endpoint']} (pids {result['pids']}, "
                            f"level {result['level']}, {mem['engine']} memory"
                            + (f"; fell back: {mem['fallback']}" if mem["fallback"] and mem["requested"] != "auto" else "")
                            + ")",
                            _timings_line(result["timings"])])


@app.command()
def inspect(snapshot: Path = typer.Argument(..., help="Snapshot directory."),
            as_json: bool = typer.Option(False, "--json")):
    """Show a snapshot (model, level, sizes, versions, canary) and whether this host can
    restore it, each check with its verdict; exits 1 when it cannot."""
    from .inspection import inspect_snapshot, render

    info = inspect_snapshot(snapshot)
    _emit(info, as_json, render(info))
    if not info["restorable"]:
        raise typer.Exit(1)


cache_app = typer.Typer(help="Page-cache state of a snapshot's files (CRIU images, external files, weights).")
app.add_typer(cache_app, name="cache")


def _snapshot_files(snapshot: Path) -> list[Path]:
    from .restore import snapshot_files

    return snapshot_files(snapshot.absolute())


@cache_app.command("status")
def cache_status(snapshot: Path, as_json: bool = typer.Option(False, "--json")):
    """How much of each snapshot file is in the page cache."""
    from . import prefetch

    try:
        rows = prefetch.residency(_snapshot_files(snapshot))
    except (FileNotFoundError, prefetch.PrefetchError) as exc:
        raise FastvllmError(f"cannot read page-cache residency: {exc}", fix="check the snapshot's files") from None
    total, resident = sum(r.size for r in rows), sum(r.resident_bytes for r in rows)
    lines = [f"{r.resident_bytes / 2**20:9.1f} / {r.size / 2**20:9.1f} MiB  {r.path}" for r in rows]
    lines.append(f"{resident / 2**20:9.1f} / {total / 2**20:9.1f} MiB resident ({prefetch.backend()})")
    _emit({"backend": prefetch.backend(), "resident_bytes": resident, "total_bytes": total,
           "files": [{"path": r.path, "size": r.size, "resident_bytes": r.resident_bytes} for r in rows]},
          as_json, lines)


@cache_app.command("warm")
def cache_warm(snapshot: Path, as_json: bool = typer.Option(False, "--json")):
    """Read the snapshot's files into the page cache, in the order restore needs them."""
    from . import prefetch

    try:
        stats = prefetch.warm(_snapshot_files(snapshot))
    except prefetch.PrefetchError as exc:
        raise FastvllmError(f"prefetch failed: {exc}", fix="see fastvllm doctor (vmtouch)") from None
    _emit({k: v for k, v in stats.items() if k != "files"}, as_json,
          [f"warmed {stats.get('bytes', 0) / 2**20:.0f} MiB in {stats.get('seconds', 0):.2f} s ({stats.get('backend')})"])


@cache_app.command("evict")
def cache_evict(snapshot: Path, as_json: bool = typer.Option(False, "--json")):
    """Drop the snapshot's files from the page cache (for cold-start experiments)."""
    from . import prefetch

    files = _snapshot_files(snapshot)
    try:
        prefetch.evict(files)
    except (FileNotFoundError, prefetch.PrefetchError) as exc:
        raise FastvllmError(f"cannot evict: {exc}", fix="check the snapshot's files") from None
    _emit({"evicted": [str(f) for f in files]}, as_json, [f"evicted {len(files)} files"])


@app.command(context_settings=EXTRA)
def bench(ctx: typer.Context, model: str = typer.Argument(..., help="Model directory or hub id."),
          repeats: int = typer.Option(3, help="Runs of each method in each mode and page-cache state."),
          methods: str = typer.Option("all", help="Ladder steps to run (numbered above): all, or e.g. 1-6 or 1,3,8,9."),
          modes: str = typer.Option("eager,compiled", help="Server modes: eager (--enforce-eager), compiled."),
          caches: str = typer.Option("warm,evicted", help="Page-cache states: warm, evicted."),
          port: int = typer.Option(server.DEFAULT_PORT, help="Port every server of the run listens on."),
          results_dir: Optional[Path] = typer.Option(None, help="Where the run's directory is created "
                                                                 "(default: experiments/results in a clone, else ./bench-results)."),
          work_dir: Path = typer.Option(Path("/var/tmp"), help="Where the run's snapshots and caches live."),
          keep_work: bool = typer.Option(False, help="Keep the snapshots and compile caches afterwards."),
          decode_tokens: int = typer.Option(64, help="Tokens of the decode-speed probe after each start "
                                                     "(fewer for big models on CPU: a 3B model decodes ~1.7 tok/s)."),
          as_json: bool = typer.Option(False, "--json", help="Print the summary rows as one JSON object.")):
    """Time every start-up method side by side, then each server's decode tokens/s: 1 cold
    (compile caches cleared), 2 cold (caches kept); CRIU restores with --memory copy: 3 level 0,
    4 level 2 + vLLM reload_weights, 5 level 2 + fast reloader, 6 as 5 with overlapped prefetch,
    8 level 1 (KV cache released); other memory engines: 7 level 0 mmap, 9 level 1 mmap,
    10 level 1 hugepage, 11 level 1 lazy, 12 level 2 fast reloader mmap, 13 level 1 auto,
    14 level 0 hugepage, 15 level 0 lazy, 16 level 2 fast reloader hugepage, 17 level 2 lazy,
    18 level 1 hugepage with its readiness check off;
    warm and evicted page cache; eager and compiled. Writes raw JSON per run, summary.csv,
    table.md and ladder.png. ARGS after -- go to every server."""
    from .bench import LadderConfig, run_ladder, report
    from .bench.methods import parse_ids
    from .paths import REPO_ROOT

    try:
        ids = parse_ids(methods)
    except ValueError as exc:
        raise FastvllmError(str(exc), fix="use --methods all, a range such as 1-6 or a list such as 1,3,8,9") from None
    if results_dir is None:
        clone = REPO_ROOT / "experiments"
        results_dir = clone / "results" if clone.is_dir() else Path("bench-results")
    cfg = LadderConfig(model=model, repeats=repeats, methods=ids, modes=_csv(modes), caches=_csv(caches),
                       port=port, results_dir=results_dir, work_dir=work_dir, keep_work=keep_work,
                       server_args=list(ctx.args), command=" ".join(["fastvllm", "bench", *sys.argv[2:]]),
                       decode_tokens=decode_tokens)
    progress = Progress()  # one line per run, on stderr (also with --json: the run is long)
    run_dir = run_ladder(cfg, say=progress.note)
    _, runs = report.load(run_dir)
    if as_json:
        print(json.dumps({"results": str(run_dir), "rows": report.aggregate(runs)}))
    else:
        print((run_dir / "table.md").read_text() if (run_dir / "table.md").is_file() else "no runs completed")
        print(f"results: {run_dir} (runs/*.json, summary.csv, table.md, ladder.png)")
    failed = [r for r in runs if not r.get("ok")]
    if failed or not runs:
        print(f"fastvllm: error: {len(failed)} of {len(runs)} runs failed (recorded in {run_dir / 'runs'})",
              file=sys.stderr)
        raise typer.Exit(1)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("bench-weights", context_settings=EXTRA)
def bench_weights(ctx: typer.Context):
    """Weight reload throughput: fast reader vs raw read, load_file, runai streamer (ARGS go to
    experiments/bench_weights.py, e.g. --repeats 3 --sweep)."""
    import subprocess

    from .paths import REPO_ROOT

    script = REPO_ROOT / "experiments" / "bench_weights.py"
    if not script.is_file():
        raise FastvllmError(f"{script} not found", fix="run from a clone of the fastvllm repository")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *ctx.args]))


@app.command("bench-weights-gpu", context_settings={**EXTRA, "help_option_names": []})
def bench_weights_gpu(ctx: typer.Context):
    """The weight path to a GPU alone: a Llama-3.2-3B-shaped checkpoint read into preallocated
    device tensors by fastvllm's reader vs pinned host-to-device copies, load_file and safe_open,
    every tensor checked bit-identical; CPU analogues without a GPU. Needs only torch and
    safetensors. ARGS go to python -m fastvllm.bench.weights_gpu (see its --help), e.g. --out DIR."""
    from .bench.weights_gpu import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@app.command()
def ps(as_json: bool = typer.Option(False, "--json")):
    """List servers fastvllm started or restored that are still running."""
    records = registry.live()
    rows = [{"pid": r.root_pid, "endpoint": r.endpoint, "how": r.how, "model": r.model,
             "snapshot": r.snapshot, "log": r.log} for r in records]
    lines = [f"{r['pid']:>8}  {r['endpoint']:<24} {r['how']:<8} {r['model']}" for r in rows]
    _emit({"servers": rows}, as_json, lines or ["no servers running"])


@app.command()
def stop(target: Optional[str] = typer.Argument(None, help="Endpoint URL, port (:8000) or PID."),
         all_: bool = typer.Option(False, "--all", help="Stop every server fastvllm started or restored."),
         as_json: bool = typer.Option(False, "--json")):
    """Stop servers fastvllm started or restored."""
    if all_:
        records = registry.live()
    elif target:
        records = registry.find(target)
        if not records:
            raise FastvllmError(f"no running fastvllm server matches {target}", fix="see fastvllm ps")
    else:
        raise FastvllmError("say which server to stop", fix="pass an endpoint, port or PID, or --all")
    from .inside_vllm.control import remove_dir

    for record in records:
        server.stop_tree(record.root_pid, server.tree_pids(record.root_pid))
        registry.remove(record.root_pid)
        if record.control:
            remove_dir(Path(record.control))
    _emit({"stopped": [r.root_pid for r in records]}, as_json,
          [f"stopped {r.endpoint} (pid {r.root_pid})" for r in records] or ["nothing to stop"])


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json"),
           snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="Also compare this snapshot's recorded "
                                                   "host (CPU, flags, kernel, versions, GPU) with this one.")):
    """Check CRIU, kernel, io_uring, vmtouch, vLLM and GPU tooling; each problem with its fix."""
    from .doctor import run_checks_and_compare

    checks, rows = run_checks_and_compare(snapshot)  # rows: None without --snapshot or if unreadable
    fatal = [c for c in checks if not c.ok and c.fatal]
    if as_json:
        print(json.dumps({"ok": not fatal, "checks": [c.to_json() for c in checks],
                          **({"host": rows} if rows is not None else {})}))
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
            print(f"[{mark}] {c.name}: {c.detail}" + ("" if c.ok or not c.fix else f" -> {c.fix}"))
        if rows is not None:
            from .host_compat import render_comparison

            print(f"{snapshot}'s host against this one:")
            print("\n".join(render_comparison(rows)))
    if fatal:
        raise typer.Exit(1)


@app.command(context_settings=EXTRA)
def entrypoint(ctx: typer.Context,
               model: Optional[str] = typer.Argument(None, help="Model directory or hub id "
                                                          "(default $FASTVLLM_MODEL)."),
               port: Optional[int] = typer.Option(None, help="Port (default $FASTVLLM_PORT or 8000)."),
               host: Optional[str] = typer.Option(None, help="Bind address (default $FASTVLLM_HOST or 0.0.0.0)."),
               snapshot_dir: Optional[Path] = typer.Option(None, help="Snapshot volume "
                                                           "(default $FASTVLLM_SNAPSHOT_DIR or /snapshots)."),
               snapshot_on_miss: Optional[bool] = typer.Option(None, "--snapshot-on-miss/--no-snapshot-on-miss",
                                                               help="Create the snapshot when none matches "
                                                                    "(default $FASTVLLM_SNAPSHOT_ON_MISS)."),
               level: Optional[int] = typer.Option(None, help="Snapshot level (default $FASTVLLM_LEVEL, else the "
                                                              "CLI's default)."),
               api_key: Optional[str] = typer.Option(None, "--api-key", help=API_KEY_HELP, show_default=False)):
    """Container main process: restore the matching snapshot or cold-start, then serve in the
    foreground (VLLM_ARGS after --, or $FASTVLLM_VLLM_ARGS)."""
    from .container.config import Config
    from .container.main import run

    cfg = Config.from_env(model=model, vllm_args=list(ctx.args), port=port, host=host,
                          snapshot_root=snapshot_dir, snapshot_on_miss=snapshot_on_miss, level=level, api_key=api_key)
    raise typer.Exit(run(cfg))


@app.command()
def verify(snapshot: Path = typer.Argument(..., help="Snapshot directory."),
           as_json: bool = typer.Option(False, "--json")):
    """Recompute every CRIU image's xxh3-128 digest and check every other file's size;
    exit 1 naming the first bad file."""
    from .verify import verify_snapshot

    report = verify_snapshot(snapshot)
    _emit(report.to_json(), as_json,
          [f"{f.verdict:<9} {f.path}" + (f"  {f.detail}" if f.verdict != "size-ok" and f.detail else "")
           for f in report.files]
          + [f"{len(report.files)} files, {report.bytes_read / 2**20:.0f} MiB digested in {report.seconds:.2f} s"])
    if not report.ok:
        raise FastvllmError(report.problem(), fix="the snapshot is damaged; copy it again or take a new one")


@app.command("gc")
def gc_cmd(paths: Optional[list[Path]] = typer.Argument(None, help="Directories to search for stale "
                                                        ".NAME.partial-* snapshot directories (the parents of "
                                                        "--out targets), or such directories themselves."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
           min_age: float = typer.Option(600.0, help="Seconds an unrecorded partial or a /dev/shm object must be "
                                                     "unchanged before it counts as debris."),
           as_json: bool = typer.Option(False, "--json")):
    """Remove debris of interrupted snapshots and restores: stale partial snapshot directories,
    /dev/shm objects (psm_*, sem.mp-*, link_remap.*) no process has open or mapped, and records
    of servers that are gone. Never touches anything a live process uses."""
    from . import gc

    if min_age < 0:
        raise FastvllmError(f"--min-age {min_age} is negative", fix="pass seconds >= 0")
    for path in paths or []:
        if not path.exists():
            raise FastvllmError(f"{path} does not exist", fix="pass directories that hold .NAME.partial-* directories")
    report = gc.collect(paths or [], dry_run=dry_run, min_age_s=min_age)
    verb = "would remove" if dry_run else "removed"
    _emit(report.to_json(), as_json,
          [f"{verb} {i.kind} {i.path} ({i.why})" for i in report.removed]
          + [f"{verb} {len(report.removed)} items ({report.bytes_freed / 2**20:.1f} MiB); "
             f"kept {len(report.kept)} in use or too recent"])


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


def main() -> None:
    # Typer handles usage errors, --help and exit codes (standalone mode); our own errors
    # become one line on stderr and exit 1, never a traceback. SIGTERM and SIGHUP unwind
    # like Ctrl-C, through every command's clean-up (see errors.Terminated).
    import signal

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
    try:
        app()
    except FastvllmError as exc:
        print(f"fastvllm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Terminated as exc:
        print(f"fastvllm: error: stopped by {signal.Signals(exc.signum).name}; what this command had started "
              "was cleaned up", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        print("fastvllm: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
