"""Warm the page cache with the files a restore is about to read.

On a cold machine (fresh boot, evicted cache) a restore is bound by reading the CRIU
page images and the model weights from disk, not by CRIU or vLLM. Reading those files
into the page cache in parallel with, and ahead of, the restore overlaps that I/O with
the work the restore does anyway; by the time CRIU or the weight reloader asks for a
file, much of it is already in memory.

Two backends do the same thing:

* ``vmtouch`` (if installed): ``vmtouch -t`` maps and touches each file; ``-e`` evicts,
  ``-v`` reports residency.
* ``fallback`` (pure Python): ``posix_fadvise(WILLNEED)`` plus sequential reads to warm,
  ``posix_fadvise(DONTNEED)`` to evict, ``mincore(2)`` via ctypes for residency.

``FASTVLLM_PREFETCH_BACKEND=vmtouch|fallback`` forces one. Prefetching is an
optimisation only: :class:`Prefetcher` never lets a failure reach the restore.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .manifest import CRIU_DIR, EXTERNAL_DIR

ENV_BACKEND = "FASTVLLM_PREFETCH_BACKEND"
BLOCK = 8 << 20
# vmtouch silently skips files above -m (default 500M): weight files are larger.
_VMTOUCH_MAX = "1048576G"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class PrefetchError(RuntimeError):
    """The prefetch backend failed (e.g. vmtouch crashed or vanished)."""


def backend() -> str:
    """``"vmtouch"`` when available (it is faster and battle-tested), else ``"fallback"``."""
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced == "fallback":
        return "fallback"
    if forced == "vmtouch":
        return "vmtouch"
    return "vmtouch" if shutil.which("vmtouch") else "fallback"


def _vmtouch() -> str:
    exe = shutil.which("vmtouch")
    if exe is None:
        raise PrefetchError("vmtouch not found on PATH")
    return exe


def _run_vmtouch(args: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([_vmtouch(), "-m", _VMTOUCH_MAX, *args], capture_output=True, text=True,
                              errors="replace")
    except OSError as e:  # vanished or not executable between which() and exec
        raise PrefetchError(f"cannot run vmtouch: {e}") from e
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        detail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise PrefetchError(f"vmtouch {how}" + (f": {detail}" if detail else ""))
    return proc


# ----------------------------------------------------------------------------- residency


@dataclass
class Residency:
    path: str
    size: int
    resident_bytes: int

    @property
    def fraction(self) -> float:
        """Share of the file in the page cache; an empty file counts as fully resident."""
        return 1.0 if self.size == 0 else min(1.0, self.resident_bytes / self.size)


_PAGES_RE = re.compile(r"(\d+)/(\d+)\s*$")


def parse_vmtouch(output: str) -> dict[str, tuple[int, int]]:
    """Per-file ``{path: (resident_pages, total_pages)}`` from ``vmtouch -v`` output.

    Pure, so it is tested on captured text. ``-v`` prints the path on one line and a
    progress bar (redrawn with ``\\r``) ending in ``resident/total`` on the next; empty
    files and skipped files print nothing; the summary block follows a blank line.
    """
    files: dict[str, tuple[int, int]] = {}
    pending: str | None = None
    for raw in output.split("\n"):
        line = raw.split("\r")[-1]  # the last redraw of the bar is the final state
        if pending is not None:
            m = _PAGES_RE.search(line)
            if line.lstrip().startswith("[") and m:
                files[pending] = (int(m.group(1)), int(m.group(2)))
                pending = None
                continue
        if not line.strip():
            if pending is None and files:
                break  # blank line before the summary
            continue
        if line.startswith(" ") and ":" in line:  # summary ("  Resident Pages: ...")
            break
        pending = raw
    return files


_LOW_BIT = bytes(i & 1 for i in range(256))


@functools.cache
def _libc():
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def _mincore_bytes(path: str, size: int) -> int:
    """Resident bytes of ``path`` by mmap + mincore(2): no reads, so it does not warm the file."""
    if size == 0:
        return 0
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}", path)
        try:
            pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}", path)
            resident = bytes(vec).translate(_LOW_BIT).count(1)  # bit 0: page resident
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(size, resident * PAGE_SIZE)


def residency(paths: Iterable[str | os.PathLike]) -> list[Residency]:
    """How much of each file is in the page cache (raises ``FileNotFoundError`` for a missing one)."""
    items = [(os.path.abspath(p), os.stat(p).st_size) for p in paths]
    found: dict[str, tuple[int, int]] = {}
    if backend() == "vmtouch":
        nonempty = [p for p, size in items if size > 0]
        if nonempty:
            found = parse_vmtouch(_run_vmtouch(["-v", "--", *nonempty]).stdout)
    out = []
    for path, size in items:
        if path in found:
            resident = min(size, found[path][0] * PAGE_SIZE)
        else:  # fallback backend, empty file, or a hard link vmtouch deduplicated
            resident = _mincore_bytes(path, size)
        out.append(Residency(path, size, resident))
    return out


# ----------------------------------------------------------------------------- evict


def drop_page_cache() -> None:
    """sync, then drop the whole page cache (root, outside restricted containers; raises
    OSError otherwise). It slows every process on the host: only when asked."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def evict(paths: Iterable[str | os.PathLike]) -> None:
    """Drop the files' clean pages from the page cache (benchmarks and tests of cold restores)."""
    files = [os.path.abspath(p) for p in paths]
    for path in files:
        os.stat(path)  # vmtouch -q would skip a missing file silently; be as strict as the fallback
    if not files:
        return
    if backend() == "vmtouch":
        _run_vmtouch(["-q", "-e", "--", *files])
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- warm


def _warm_fallback(path: str, buf: bytearray) -> int:
    with open(path, "rb", buffering=0) as f:
        # WILLNEED starts kernel readahead of the whole file; the reads make sure it lands.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        total = 0
        view = memoryview(buf)
        while n := f.readinto(view):
            total += n
    return total


def _warm_vmtouch(path: str) -> None:
    # No -q: it would also silence the warning, the only sign that a file could not be read
    # (vmtouch exits 0 when it cannot stat or open a file).
    proc = _run_vmtouch(["-t", "--", path])
    if "WARNING" in proc.stderr:
        raise FileNotFoundError(proc.stderr.strip().splitlines()[-1])


def warm(paths: Sequence[str | os.PathLike], workers: int = 4) -> dict:
    """Read ``paths`` into the page cache with ``workers`` parallel readers, in list order.

    Worker i takes the next file of the list, so the files restore needs first are
    warmed first. A missing or unreadable file is skipped and listed in ``skipped``;
    a backend failure (vmtouch crashed) stops all workers and raises.
    """
    t0 = time.monotonic()
    kind = backend()
    files = [os.path.abspath(p) for p in paths]
    lock = threading.Lock()
    next_index = 0
    per_file: list[tuple[str, float, float]] = []
    skipped: list[tuple[str, str]] = []
    total = 0
    failure: list[BaseException] = []

    def worker() -> None:
        nonlocal next_index, total
        buf = bytearray(BLOCK) if kind == "fallback" else None
        while True:
            with lock:
                if failure or next_index >= len(files):
                    return
                path = files[next_index]
                next_index += 1
                start = time.monotonic() - t0
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    raise IsADirectoryError(f"not a regular file: {path}")
                if kind == "vmtouch":
                    _warm_vmtouch(path)
                    n = st.st_size
                else:
                    n = _warm_fallback(path, buf)
            except PrefetchError as e:
                with lock:
                    failure.append(e)
                return
            except OSError as e:
                with lock:
                    skipped.append((path, f"{type(e).__name__}: {e.strerror or e}"))
                continue
            except BaseException as e:  # anything unexpected stops the warm, never hangs it
                with lock:
                    failure.append(e)
                return
            with lock:
                total += n
                per_file.append((path, start, time.monotonic() - t0))

    threads = [threading.Thread(target=worker, name=f"fastvllm-prefetch-{i}", daemon=True)
               for i in range(max(1, min(workers, len(files))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failure:
        raise failure[0]
    order = {p: i for i, p in enumerate(files)}
    per_file.sort(key=lambda item: order.get(item[0], 0))
    return {"bytes": total, "seconds": time.monotonic() - t0, "backend": kind, "files": per_file,
            "skipped": skipped}


# ----------------------------------------------------------------------------- background


def _say(what: str) -> None:
    print(f"fastvllm: prefetch: {what}; restore continues without it", file=sys.stderr, flush=True)


class Prefetcher:
    """Runs :func:`warm` in a background thread next to a restore; failures never propagate.

    ``t0`` is the caller's ``time.monotonic()`` (e.g. restore start) so ``stats["start_s"]``
    and ``stats["end_s"]`` line up with the restore's own timeline.
    """

    def __init__(self, paths: Sequence[Path], workers: int = 4, t0: float | None = None):
        self.paths = [Path(p) for p in paths]
        self.workers = workers
        self.t0 = time.monotonic() if t0 is None else t0
        self.stats: dict = {"error": None}
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def start(self) -> Prefetcher:
        self._thread = threading.Thread(target=self._run, name="fastvllm-prefetch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        self.stats["start_s"] = time.monotonic() - self.t0
        try:
            result = warm(self.paths, workers=self.workers)
            self.stats.update(result)
            if result["skipped"]:
                path, why = result["skipped"][0]
                more = len(result["skipped"]) - 1
                self.stats["error"] = f"skipped {path} ({why})" + (f" and {more} more file(s)" if more else "")
                _say(self.stats["error"])
        except BaseException as e:  # noqa: BLE001 - a prefetch must never break a restore
            self.stats["error"] = f"{type(e).__name__}: {e}"
            _say(f"failed ({type(e).__name__}: {e})")
        finally:
            self.stats["end_s"] = time.monotonic() - self.t0
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the warm has finished (or failed); False on timeout or if never started."""
        if self._thread is None:
            return False
        return self._done.wait(timeout)


# ----------------------------------------------------------------------------- order


def ordered_files(snapshot: Path, weight_paths: list[str]) -> list[Path]:
    """The files of a restore, in the order it needs them.

    CRIU reads its small metadata images first, then the page images (largest first:
    in a parallel restore the largest is the critical path), then the external files
    it re-opens; the weight reloader runs last and reads ``weight_paths`` in order.
    Only existing regular files are returned.
    """

    def regular(p: Path) -> bool:
        try:
            return stat.S_ISREG(p.stat().st_mode)
        except OSError:
            return False

    def listing(d: Path) -> list[Path]:
        try:
            return sorted((p for p in d.iterdir() if regular(p)), key=lambda p: p.name)
        except OSError:
            return []

    criu = listing(Path(snapshot) / CRIU_DIR)
    meta = [p for p in criu if not (p.name.startswith("pages-") and p.name.endswith(".img"))]
    pages = sorted((p for p in criu if p not in meta), key=lambda p: (-p.stat().st_size, p.name))
    external = listing(Path(snapshot) / EXTERNAL_DIR)
    out: list[Path] = [*meta, *pages, *external]
    seen = set(out)
    for w in weight_paths:
        p = Path(w)
        if p not in seen and regular(p):
            out.append(p)
            seen.add(p)
    return out
