"""Restore memory engines side by side: one memhog dump, restored with each engine.

    python -m fastvllm.bench.memory_engines [--mib 2048] [--repeats 3] [--results-dir experiments/results]

A process with ``--mib`` MiB of private anonymous memory (tests/programs/memhog.c) is
dumped once; then, for every repeat, each page-cache state (``warm``: the images read in
first; ``cold``: their pages evicted) and each engine (order rotated per repeat), the
previous restored process is killed, the images are put in that cache state, and:

(``warm-prefaulted``: warm, and right before the restore a helper faults in and frees
1.1x the image size as huge pages, so that free 2 MiB blocks are backed by the host: on a
VM with free page reporting that is the only state in which huge pages are not slowed
down by host faults, i.e. what a bare-metal host gives every time.)


- ``restore_s``: the CRIU restore call itself (:func:`fastvllm.criu_ops.restore_tree`);
- ``touch_s``: from SIGUSR1 until memhog has checksummed every page. ``mmap`` and ``lazy``
  move work from the restore to here (first-touch faults), so both are reported, and
- ``total_s``: call to restored-and-checksum-verified.

``hugepage`` falls back to ``copy`` (recorded) when :func:`criu_ops.hugepages_ready`
says no, as a caller's restore would; ``hugepage-forced`` is the hugepage engine run
regardless, to show what the fallback avoids (on a VM with free page reporting, see
:func:`criu_ops.free_page_reporting`). Writes ``memory-engines-<time>/`` with runs.json, table.md and plot.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import criu_ops, prefetch
from ..errors import FastvllmError
from ..paths import REPO_ROOT
from . import machine

ENGINES = ("copy", "hugepage", "hugepage-forced", "mmap", "lazy")
CACHES = ("warm", "cold", "warm-prefaulted")
MEMHOG_SRC = REPO_ROOT / "tests" / "programs" / "memhog.c"


class Memhog:
    """The benchmark's process, and whichever restored copy owns its PID now."""

    def __init__(self, binary: Path, workdir: Path, mib: int):
        self.out = workdir / "report.txt"
        self.stdout = workdir / "stdout.txt"
        with open(self.stdout, "w") as log:
            self.proc = subprocess.Popen([str(binary), str(mib), str(self.out)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 300
        while not self.stdout.read_text().startswith("ready"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise FastvllmError(f"memhog did not start: {self.stdout.read_text()[:200]!r}",
                                    fix="check that gcc built tests/programs/memhog.c and memory is free")
            time.sleep(0.05)
        self.checksum = self.stdout.read_text().split()[1]

    def touch_all(self, pid: int, timeout: float = 300) -> tuple[float, str]:
        """SIGUSR1: memhog reads every page and writes its checksum; (seconds, checksum)."""
        self.out.unlink(missing_ok=True)
        start = time.perf_counter()
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not self.out.exists():
            if time.monotonic() > deadline:
                raise FastvllmError(f"restored memhog {pid} did not answer SIGUSR1 in {timeout:.0f} s",
                                    fix="see the CRIU restore log")
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        return elapsed, self.out.read_text().split()[-1]


def _kill(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    busy = criu_ops.wait_pids_free([pid], timeout=30)
    if busy:
        raise FastvllmError(f"PID {pid} is still taken after SIGKILL: {busy[pid]}", fix="stop it and rerun")


def _set_cache(files: list[Path], cache: str, memhog: Path) -> None:
    if cache == "cold":
        prefetch.evict(files)
        return
    buf = bytearray(8 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    if cache == "warm-prefaulted":
        mib = int(sum(p.stat().st_size for p in files) * 1.1) >> 20
        subprocess.run([str(memhog), str(mib), "-", "prefault"], check=True)


def _anon_huge_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _free_huge_blocks() -> int:
    try:
        return criu_ops.free_huge_blocks(Path("/proc/buddyinfo").read_text())
    except OSError:
        return -1


def run(mib: int, repeats: int, results_dir: Path, engines: tuple[str, ...] = ENGINES) -> Path:
    """Run the whole matrix; returns the results directory it wrote."""
    criu = criu_ops.find_criu()
    available = criu_ops.memory_engines(criu)
    available["hugepage-forced"] = available["hugepage"]
    skipped = {e: available[e] for e in engines if available.get(e)}
    engines = tuple(e for e in engines if e not in skipped)
    if "copy" not in engines:
        raise FastvllmError("the benchmark needs the copy engine as its baseline", fix="include copy in --engines")
    if shutil.which("gcc") is None:
        raise FastvllmError("gcc not found (the benchmark builds tests/programs/memhog.c)", fix="apt-get install gcc")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = results_dir / f"memory-engines-{stamp}"
    work = Path(tempfile.mkdtemp(prefix="fastvllm-memory-engines-", dir=os.environ.get("FASTVLLM_BENCH_TMP")))
    host = machine.describe(work)  # the disk the images are on
    runs: list[dict] = []
    current: int | None = None
    try:
        binary = work / "memhog"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(MEMHOG_SRC)], check=True)
        hog = Memhog(binary, work, mib)
        current = hog.pid
        images = work / "img"
        t = time.perf_counter()
        criu_ops.dump_tree(criu, hog.pid, images)
        dump_s = time.perf_counter() - t
        hog.proc.wait(timeout=60)
        _kill(hog.pid)
        current = None
        image_files = sorted(images.glob("pages-*.img"))
        image_bytes = sum(p.stat().st_size for p in image_files)
        print(f"[bench] dumped {mib} MiB memhog in {dump_s:.2f} s ({image_bytes / 2**20:.0f} MiB of pages)", flush=True)
        for rep in range(repeats):
            order = engines[rep % len(engines):] + engines[:rep % len(engines)]
            for cache in CACHES:
                for engine in order:
                    _kill(current)
                    current = None
                    freed_at = time.perf_counter()
                    _set_cache(image_files, cache, binary)
                    used, fallback = engine.removesuffix("-forced"), None
                    if engine == "hugepage":
                        ready, why = criu_ops.hugepages_ready(image_bytes)
                        if not ready:
                            used, fallback = "copy", why
                    free_blocks = _free_huge_blocks()
                    start = time.perf_counter()
                    pid, log = criu_ops.restore_tree(criu, images, criu_ops.RestoreOptions(memory=used))
                    restore_s = time.perf_counter() - start
                    current = pid
                    huge_kib = _anon_huge_kib(pid)
                    touch_s, checksum = hog.touch_all(pid)
                    total_s = time.perf_counter() - start
                    record = {
                        "repeat": rep, "cache": cache, "engine": engine, "engine_used": used, "fallback": fallback,
                        "restore_s": round(restore_s, 4), "touch_s": round(touch_s, 4), "total_s": round(total_s, 4),
                        "checksum_ok": checksum == hog.checksum, "anon_huge_kib": huge_kib,
                        "free_2mib_blocks_before": free_blocks,
                        "s_since_previous_freed": round(start - freed_at, 3),
                        "stats": criu_ops.memory_stats(log),
                    }
                    if used == "lazy":
                        daemon = criu_ops._LAZY_DAEMONS[-1]
                        record["lazy_daemon_rc"] = daemon.wait(timeout=120)
                    runs.append(record)
                    print(f"[bench] r{rep} {cache:4} {engine:8}{'->' + used if used != engine else '':10} "
                          f"restore {restore_s:6.3f} s  touch {touch_s:6.3f} s  total {total_s:6.3f} s  "
                          f"sum {'ok' if record['checksum_ok'] else 'WRONG'}", flush=True)
                    if not record["checksum_ok"]:
                        raise FastvllmError(f"{engine} ({cache}) restored different memory: checksum {checksum}, "
                                            f"expected {hog.checksum}", fix=f"see {log}")
        _kill(current)
        current = None
    finally:
        if current is not None:
            try:
                _kill(current)
            except FastvllmError:
                pass
        shutil.rmtree(work, ignore_errors=True)
    meta = {"mib": mib, "repeats": repeats, "image_bytes": image_bytes, "dump_s": round(dump_s, 3),
            "engines": list(engines), "skipped_engines": skipped, "caches": list(CACHES),
            "criu": {"binary": str(criu.binary), "version": criu.version_str,
                     "restore_memory": list(criu_ops.restore_memory_support(criu))},
            "thp": criu_ops.thp_mode(), "machine": host,
            "free_page_reporting": criu_ops.free_page_reporting(),
            "hugepages_ready": criu_ops.hugepages_ready(image_bytes), "started": stamp,
            "command": " ".join([Path(sys.executable).name, "-m", "fastvllm.bench.memory_engines", *sys.argv[1:]])}
    out_dir.mkdir(parents=True, exist_ok=False)
    (out_dir / "runs.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    rows = summarize(runs)
    (out_dir / "table.md").write_text(markdown(meta, rows))
    plot(rows, out_dir / "plot.png", title=f"CRIU restore of a {mib} MiB process, by memory engine")
    return out_dir


METRICS = (("restore_s", "CRIU restore call"), ("touch_s", "then touching every page"),
           ("total_s", "call to checksum verified"))


def summarize(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(engine, cache) -> {metric: {median, min, max, n}} plus the fallbacks seen."""
    rows: dict[tuple[str, str], dict] = {}
    for run_ in runs:
        rows.setdefault((run_["engine"], run_["cache"]), {"runs": []})["runs"].append(run_)
    for row in rows.values():
        for metric, _ in METRICS:
            values = [r[metric] for r in row["runs"]]
            row[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                           "n": len(values)}
        row["fallbacks"] = sorted({r["fallback"] for r in row["runs"] if r["fallback"]})
        row["anon_huge_kib"] = statistics.median(r["anon_huge_kib"] for r in row["runs"])
    return rows


def markdown(meta: dict, rows: dict[tuple[str, str], dict]) -> str:
    """One table per metric: engines down, cache states across, each cell median (min-max)
    and the ratio of copy's median to this one in the same column (>1: faster than copy)."""
    engines = [e for e in ENGINES if any(k[0] == e for k in rows)]
    caches = [c for c in CACHES if any(k[1] == c for k in rows)]
    lines = [f"# Restore memory engines: {meta['mib']} MiB process, {meta['repeats']} repeats",
             "",
             f"CRIU {meta['criu']['version']} with restore-memory "
             f"{' '.join(meta['criu']['restore_memory']) or 'none'}; "
             f"THP {meta['thp']}; free page reporting {'on' if meta.get('free_page_reporting') else 'off'}; "
             f"{machine.one_line(meta['machine'])}.",
             f"Pages image {meta['image_bytes'] / 2**20:.0f} MiB, dumped once in {meta['dump_s']:.2f} s. "
             "Seconds, median (min-max); `x copy` = copy's median / this median in the same column.",
             ""]
    if meta.get("skipped_engines"):
        lines += ["Not run: " + "; ".join(f"{e}: {why}" for e, why in meta["skipped_engines"].items()), ""]
    for metric, title in METRICS:
        lines += [f"## {title} (`{metric}`)", "",
                  "| engine | " + " | ".join(f"{c} s | {c} x copy" for c in caches) + " |",
                  "|---|" + "---:|---:|" * len(caches)]
        for engine in engines:
            cells = []
            for cache in caches:
                row = rows.get((engine, cache))
                base = rows.get(("copy", cache))
                if not row:
                    cells += ["-", "-"]
                    continue
                s = row[metric]
                ratio = base[metric]["median"] / s["median"] if base and s["median"] > 0 else float("nan")
                star = "*" if row["fallbacks"] else ""
                cells += [f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}){star}", f"{ratio:.1f}x"]
            lines.append(f"| {engine} | " + " | ".join(cells) + " |")
        lines.append("")
    fallbacks = {f"{e}/{c}": row["fallbacks"] for (e, c), row in rows.items() if row["fallbacks"]}
    if fallbacks:
        lines += ["\\* fell back to copy in some runs: " +
                  "; ".join(f"{k}: {', '.join(v)}" for k, v in fallbacks.items()), ""]
    lines += ["Every restore's checksum matched the dumped process's. Raw runs: runs.json; plot: plot.png.",
              f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def plot(rows: dict[tuple[str, str], dict], path: Path, title: str = "") -> None:
    """Stacked bars per engine, one panel per cache state: the restore call, then first touch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in ENGINES if any(k[0] == e for k in rows)]
    caches = [c for c in CACHES if any(k[1] == c for k in rows)]
    fig, axes = plt.subplots(1, len(caches), figsize=(4.5 * len(caches), 4.2), sharey=True, squeeze=False)
    for ax, cache in zip(axes[0], caches):
        restore = [rows[(e, cache)]["restore_s"]["median"] if (e, cache) in rows else 0 for e in engines]
        touch = [rows[(e, cache)]["touch_s"]["median"] if (e, cache) in rows else 0 for e in engines]
        ax.bar(engines, restore, label="CRIU restore call")
        ax.bar(engines, touch, bottom=restore, label="then touching every page")
        for i, (r, t) in enumerate(zip(restore, touch)):
            ax.text(i, r + t, f"{r:.2f}+{t:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"page cache {cache}", fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylabel("seconds (median)")
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvllm.bench.memory_engines", description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=2048, help="memory of the dumped process (MiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "experiments" / "results")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset (copy is required)")
    args = parser.parse_args(argv)
    try:
        engines = tuple(e for e in args.engines.split(",") if e)
        unknown = [e for e in engines if e not in ENGINES]
        if unknown:
            raise FastvllmError(f"unknown engine(s) {', '.join(unknown)}", fix=f"use some of {', '.join(ENGINES)}")
        out = run(args.mib, args.repeats, args.results_dir, engines)
    except FastvllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"[bench] results in {out}")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
