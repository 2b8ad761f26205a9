"""Checkpoint and restore a process tree with CRIU.

Talks to CRIU through ``pycriu``'s RPC (``criu swrk``), which reports errors as structured
responses, and falls back to the ``criu`` command line when pycriu is not importable.
Either way CRIU's log is read back on failure and distilled into one line that says what
is wrong and what to do (see :func:`explain_log`).

CRIU 4.2 or newer is required: 3.17 fails on kernels with the new vDSO layout, and 4.1
cannot dump any TCP socket on kernels >= 6.16.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .errors import CriuFailed, FastvllmError
from .paths import REPO_ROOT, criu_work_dir

MIN_VERSION = (4, 2)


@dataclass(frozen=True)
class Criu:
    """A located CRIU binary and its version."""

    binary: Path
    version: tuple[int, ...]

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


@dataclass
class DumpOptions:
    """What a vLLM server tree needs from CRIU, with the reason for each flag.

    - ``link_remap``: glibc/multiprocessing semaphores in /dev/shm are unlinked while open.
    - ``tcp_established`` / ``tcp_skip_in_flight``: the API server keeps loopback TCP
      connections (clients, ZMQ) that may be established or half-open at dump time.
    - ``ext_unix_sk``: unix sockets connected to peers outside the tree (e.g. syslog).
    - ``file_locks``: torch/triton caches take flock()s.
    - ``ghost_limit``: deleted-but-open files up to this size are stored in the image.
    - ``shell_job``: only for trees that are not their own session (not started by us).
    """

    leave_running: bool = False
    shell_job: bool = False
    ext_unix_sk: bool = True
    tcp_established: bool = True
    tcp_skip_in_flight: bool = True
    link_remap: bool = True
    file_locks: bool = True
    ghost_limit: int = 256 << 20
    log_level: int = 4
    extra_cli: list[str] = field(default_factory=list)


def find_criu() -> Criu:
    """Locate CRIU: ``$FASTVLLM_CRIU``, the project build in ``.criu/``, then ``$PATH``."""
    candidates = []
    if os.environ.get("FASTVLLM_CRIU"):
        forced = Path(os.environ["FASTVLLM_CRIU"])
        if not (forced.is_file() and os.access(forced, os.X_OK)):
            raise FastvllmError(f"FASTVLLM_CRIU={forced} is not an executable file",
                                fix="point it at a CRIU >= 4.2 binary, or unset it to use the one ./run.sh setup builds")
        candidates.append(forced)
    candidates.append(REPO_ROOT / ".criu" / "sbin" / "criu")
    on_path = shutil.which("criu")
    if on_path:
        candidates.append(Path(on_path))
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            version = _binary_version(cand.resolve())
            if version < MIN_VERSION:
                raise FastvllmError(
                    f"CRIU {'.'.join(map(str, version))} at {cand} is too old "
                    f"(need >= {'.'.join(map(str, MIN_VERSION))} on this kernel)",
                    fix="run ./run.sh setup to build CRIU 4.2.1 into .criu/, or set FASTVLLM_CRIU",
                )
            return Criu(cand.resolve(), version)
    raise FastvllmError(
        "CRIU not found",
        fix="run ./run.sh setup (builds CRIU 4.2.1 into .criu/) or set FASTVLLM_CRIU=/path/to/criu",
    )


def _binary_version(binary: Path) -> tuple[int, ...]:
    out = _version_text(binary)  # also read for the memory engines: one `criu --version` per process
    match = re.search(r"Version:\s*([\d.]+)", out)
    if not match:
        raise FastvllmError(f"cannot read the version of {binary}", fix="reinstall CRIU with ./run.sh setup")
    return tuple(int(x) for x in match.group(1).split(".") if x)


def check(criu: Criu) -> tuple[bool, str]:
    """Run ``criu check``; returns (ok, output)."""
    proc = subprocess.run([str(criu.binary), "check"], capture_output=True, text=True, timeout=60)
    text = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, text


# ---------------------------------------------------------------------------------------
# dump


def dump_tree(criu: Criu, pid: int, images_dir: Path, opts: DumpOptions | None = None) -> Path:
    """Dump the tree rooted at ``pid`` into ``images_dir``; returns CRIU's log path.

    With ``leave_running=False`` (the default) CRIU kills the tree once it is dumped.
    A tree restored with the ``mmap`` engine is refused: its memory maps another
    snapshot's page images, which the new snapshot would silently depend on.
    """
    opts = opts or DumpOptions()
    _refuse_mapped_images(pid)
    images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = _new_log_path("dump")
    try:
        if _pycriu_available():
            _dump_rpc(criu, pid, images_dir, opts, log_path)
        else:
            _dump_cli(criu, pid, images_dir, opts, log_path)
    except _CriuCallFailed as exc:
        raise CriuFailed(explain_log(log_path, action="dump", detail=str(exc))) from None
    for image in images_dir.iterdir():  # process memory: owner-only, like the directory
        image.chmod(0o600)
    return log_path


def _refuse_mapped_images(pid: int) -> None:
    from .integrity import mapped_images

    try:
        root = psutil.Process(pid)
        pids = [pid] + [child.pid for child in root.children(recursive=True)]
    except psutil.Error:
        return  # CRIU reports a missing tree better than we can
    mapped = mapped_images(pids)
    if mapped:
        who, path = next(iter(mapped.items()))
        raise FastvllmError(f"process {who} maps the CRIU image {path} (it was restored with --memory mmap): "
                            "a snapshot of it would depend on that snapshot's files",
                            fix="snapshot a freshly started server (fastvllm snapshot MODEL), "
                                "or restore with --memory copy before dumping it again")


@contextmanager
def _rpc_client(criu: Criu, images_dir: Path, opts, log_path: Path):
    """A pycriu client with the options dump and restore share; yields (client, pycriu)."""
    import pycriu

    client = pycriu.criu()
    client.use_binary(str(criu.binary))
    fds = _open_dirs(images_dir, log_path.parent)
    try:
        o = client.opts
        o.images_dir_fd, o.work_dir_fd = fds
        o.log_file = log_path.name
        o.log_level = opts.log_level
        o.shell_job = opts.shell_job
        o.ext_unix_sk = opts.ext_unix_sk
        o.tcp_established = opts.tcp_established
        o.link_remap = opts.link_remap
        o.file_locks = opts.file_locks
        o.network_lock = _network_lock(pycriu)
        try:
            yield client, pycriu
        except pycriu.CRIUException as exc:
            raise _CriuCallFailed(str(exc)) from None
    finally:
        for fd in fds:
            os.close(fd)


def _dump_rpc(criu: Criu, pid: int, images_dir: Path, opts: DumpOptions, log_path: Path) -> None:
    with _rpc_client(criu, images_dir, opts, log_path) as (client, _):
        client.opts.pid = pid
        client.opts.leave_running = opts.leave_running
        client.opts.tcp_skip_in_flight = opts.tcp_skip_in_flight
        client.opts.ghost_limit = opts.ghost_limit
        client.dump()


def _dump_cli(criu: Criu, pid: int, images_dir: Path, opts: DumpOptions, log_path: Path) -> None:
    cmd = [str(criu.binary), "dump", "-t", str(pid), "-D", str(images_dir),
           "-W", str(log_path.parent), "-o", log_path.name, f"-v{opts.log_level}",
           "--ghost-limit", str(opts.ghost_limit)]
    cmd += _flag_args(opts)
    if opts.leave_running:
        cmd.append("--leave-running")
    if shutil.which("iptables") is None:
        cmd += ["--network-lock", "skip"]
    _run_cli(cmd + opts.extra_cli)


# ---------------------------------------------------------------------------------------
# restore


@dataclass
class RestoreOptions:
    """Restore-side mirror of :class:`DumpOptions` (CRIU needs the same socket/file flags).

    The log is CRIU's debug level (4) unless ``FASTVLLM_CRIU_LOG_LEVEL`` says otherwise:
    its ~13k lines per vLLM tree cost no measurable restore time here (A/B, 4 runs each).
    """

    shell_job: bool = False
    ext_unix_sk: bool = True
    tcp_established: bool = True
    link_remap: bool = True
    file_locks: bool = True
    log_level: int = field(default_factory=lambda: int(os.environ.get("FASTVLLM_CRIU_LOG_LEVEL", "4")))
    extra_cli: list[str] = field(default_factory=list)
    memory: str = "copy"  # one of MEMORY_ENGINES; see memory_engines()


# How private anonymous memory comes back (patches/criu/0001-restore-memory-engines.patch):
#   copy      upstream CRIU: preadv() the pages image into fresh 4 KiB pages.
#   hugepage  the same read, into transparent huge pages the restorer asks for first.
#   mmap      large runs of the image mapped MAP_PRIVATE: no copy at restore, pages are read
#             on first touch and copied on first write. The image files stay mapped for the
#             process's life, so they must never be rewritten in place (write a new file and
#             rename it instead), and MADV_DONTNEED on such memory brings back image bytes,
#             not zeros (glibc's calloc still clears what it reuses: see the memhog test).
#   lazy      CRIU's own userfaultfd lazy pages, served by a `criu lazy-pages` daemon.
MEMORY_ENGINES = ("copy", "hugepage", "mmap", "lazy")
PATCHED_ENGINES = ("hugepage", "mmap")  # need fastvllm's CRIU patch
RESTORE_MEMORY_ENV = "CRIU_RESTORE_MEMORY"
LAZY_SOCKET = "lazy-pages.socket"
LAZY_START_TIMEOUT_S = 10.0
_ENV_LOCK = threading.Lock()  # os.environ is process-wide: one RPC restore sets it at a time


def restore_tree(criu: Criu, images_dir: Path, opts: RestoreOptions | None = None) -> tuple[int, Path]:
    """Restore the tree in ``images_dir``, detached; returns (root pid, CRIU log path).

    The images directory is only read: CRIU's log and work files go to the run dir, so a
    snapshot on a read-only volume restores and is never modified. ``opts.memory`` picks
    the memory engine; an engine this CRIU lacks is an error, not a silent copy.
    """
    opts = opts or RestoreOptions()
    if opts.memory not in MEMORY_ENGINES:
        raise FastvllmError(f"unknown restore memory engine {opts.memory!r}",
                            fix=f"use one of {', '.join(MEMORY_ENGINES)}")
    patched = restore_memory_support(criu)
    if opts.memory in PATCHED_ENGINES and opts.memory not in patched:
        raise FastvllmError(f"CRIU at {criu.binary} has no {opts.memory} memory engine "
                            "(not built with fastvllm's patches)",
                            fix="run ./run.sh setup (or bash scripts/build_criu.sh) to rebuild it with patches/criu/")
    log_path = _new_log_path("restore")
    lazy = None
    if opts.memory == "lazy":
        # Restore and daemon meet on a socket in the work dir: one dir per restore, so two
        # lazy restores at once never share it.
        log_path = _lazy_work_dir(log_path) / log_path.name
        lazy = _start_lazy_daemon(criu, images_dir, log_path.parent, opts.log_level)
    # The engine the patched restorer applies ("copy" for lazy: its pages are not read).
    engine = opts.memory if opts.memory in PATCHED_ENGINES else "copy"
    try:
        try:
            if _pycriu_available():
                pid = _restore_rpc(criu, images_dir, opts, log_path, engine if patched else None, lazy is not None)
            else:
                pid = _restore_cli(criu, images_dir, opts, log_path, engine if patched else None, lazy is not None)
        except _CriuCallFailed as exc:
            raise CriuFailed(explain_log(log_path, action="restore", detail=str(exc))) from None
    except BaseException:
        if lazy is not None:
            _stop(lazy)
        raise
    if lazy is not None:
        _LAZY_DAEMONS.append(lazy)  # exits by itself once every page is served; reaped later
    return pid, log_path


def _restore_rpc(criu: Criu, images_dir: Path, opts: RestoreOptions, log_path: Path,
                 engine: str | None = None, lazy: bool = False) -> int:
    with _rpc_client(criu, images_dir, opts, log_path) as (client, _):
        # The restored root becomes our child rather than criu swrk's, and is reparented to
        # init when this command exits: it keeps serving after `fastvllm restore` returns.
        client.opts.rst_sibling = True
        if lazy:
            client.opts.lazy_pages = True
        if engine is None:  # an unpatched CRIU: leave its environment alone
            return int(client.restore().pid)
        # The RPC has no field for the engine: criu swrk, forked from here per request,
        # reads it from the environment it inherits.
        with _ENV_LOCK:
            saved = os.environ.get(RESTORE_MEMORY_ENV)
            os.environ[RESTORE_MEMORY_ENV] = engine
            try:
                return int(client.restore().pid)
            finally:
                if saved is None:
                    os.environ.pop(RESTORE_MEMORY_ENV, None)
                else:
                    os.environ[RESTORE_MEMORY_ENV] = saved


def _restore_cli(criu: Criu, images_dir: Path, opts: RestoreOptions, log_path: Path,
                 engine: str | None = None, lazy: bool = False) -> int:
    pidfile = log_path.with_suffix(".pid")
    cmd = [str(criu.binary), "restore", "-d", "-D", str(images_dir), "-W", str(log_path.parent),
           "-o", log_path.name, f"-v{opts.log_level}", "--pidfile", str(pidfile)]
    cmd += _flag_args(opts)
    if engine is not None:
        cmd += ["--restore-memory", engine]
    if lazy:
        cmd.append("--lazy-pages")
    if shutil.which("iptables") is None:
        cmd += ["--network-lock", "skip"]
    _run_cli(cmd + opts.extra_cli)
    return int(pidfile.read_text().strip())


# ---------------------------------------------------------------------------------------
# memory engines


_LAZY_DAEMONS: list[subprocess.Popen] = []


def _lazy_work_dir(log_path: Path) -> Path:
    work = criu_work_dir()
    old = sorted(p for p in work.glob("lazy-*") if p.is_dir())
    for stale in old[:-KEEP_LOGS]:
        shutil.rmtree(stale, ignore_errors=True)
    sub = work / f"lazy-{log_path.stem.removeprefix('restore-')}"
    sub.mkdir(mode=0o700, exist_ok=True)
    (sub / LAZY_SOCKET).unlink(missing_ok=True)
    return sub


def _start_lazy_daemon(criu: Criu, images_dir: Path, work_dir: Path, log_level: int) -> subprocess.Popen:
    """Start ``criu lazy-pages`` detached and wait until it listens.

    Its own session, so a signal to our process group never reaches it in the middle of
    serving a restored server's page faults; it exits once every page is delivered.
    """
    for proc in list(_LAZY_DAEMONS):  # reap the ones that finished
        if proc.poll() is not None:
            _LAZY_DAEMONS.remove(proc)
    log = work_dir / "lazy-pages.log"
    cmd = [str(criu.binary), "lazy-pages", "-D", str(images_dir), "-W", str(work_dir),
           "-o", log.name, f"-v{log_level}"]
    with open(work_dir / "lazy-pages.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + LAZY_START_TIMEOUT_S
    while not (work_dir / LAZY_SOCKET).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise CriuFailed(explain_log(log, action="lazy-pages", detail="the lazy-pages daemon did not start"))
        time.sleep(0.01)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


@functools.lru_cache(maxsize=None)
def _version_text(binary: Path) -> str:
    try:
        return subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def parse_restore_memory_line(version_text: str) -> tuple[str, ...]:
    """The engines a patched CRIU's ``--version`` lists (``Restore-memory: copy hugepage mmap``)."""
    match = re.search(r"^Restore-memory:\s*(.*)$", version_text, re.M)
    return tuple(match.group(1).split()) if match else ()


def restore_memory_support(criu: Criu) -> tuple[str, ...]:
    """Engines the binary's restorer implements; empty for an unpatched CRIU."""
    return parse_restore_memory_line(_version_text(criu.binary))


@functools.lru_cache(maxsize=None)
def _lazy_pages_reason(binary: Path) -> str | None:
    try:
        proc = subprocess.run([str(binary), "check", "--feature", "uffd-noncoop"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"criu check failed: {exc}"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "RLIMIT_NOFILE" not in ln]
    return "no non-cooperative userfaultfd in this kernel (criu check --feature uffd-noncoop" + \
        (f": {lines[-1].strip()[:120]})" if lines else ")")


def memory_engines(criu: Criu, names: tuple[str, ...] = MEMORY_ENGINES) -> dict[str, str | None]:
    """Each engine of ``names`` -> None if it runs here, else the one-line reason it does not.

    ``hugepage`` is listed as available when the patch and THP are there; whether the
    kernel has free huge pages *now* is :func:`hugepages_ready`'s question, per restore.
    Ask only for the engines needed: ``lazy``'s probe runs ``criu check`` (~40 ms).
    """
    patched = restore_memory_support(criu)
    unpatched = f"CRIU at {criu.binary} is not built with fastvllm's patches (patches/criu/)"
    out: dict[str, str | None] = {}
    for name in names:
        if name == "copy":
            out[name] = None
        elif name in PATCHED_ENGINES and name not in patched:
            out[name] = unpatched
        elif name == "hugepage":
            thp = thp_mode()
            out[name] = ("this kernel has no transparent huge pages" if thp is None else
                         "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled is never)"
                         if thp == "never" else None)
        elif name == "mmap":
            out[name] = None
        elif name == "lazy":
            out[name] = _lazy_pages_reason(criu.binary)
    return out


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
BUDDYINFO = Path("/proc/buddyinfo")
HUGE_ORDER = 9  # 2 MiB = 2**9 pages of 4 KiB
HUGE_BYTES = 2 << 20


def thp_mode(text: str | None = None) -> str | None:
    """The selected THP mode (``always``/``madvise``/``never``), None without THP."""
    if text is None:
        try:
            text = THP_ENABLED.read_text()
        except OSError:
            return None
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else None


def free_huge_blocks(buddyinfo: str) -> int:
    """How many 2 MiB blocks the buddy allocator has free right now, without compacting.

    A free block of order o >= 9 holds 2**(o-9) huge pages.
    """
    total = 0
    for line in buddyinfo.splitlines():
        fields = line.split()
        if "zone" not in fields:
            continue
        counts = fields[fields.index("zone") + 2:]
        for order, count in enumerate(counts):
            if order >= HUGE_ORDER and count.isdigit():
                total += int(count) << (order - HUGE_ORDER)
    return total


VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
VIRTIO_ID_BALLOON = 5
VIRTIO_BALLOON_F_REPORTING = 5  # feature bit: the guest reports free pages to the host


def free_page_reporting(devices: Path | None = None) -> bool:
    """Whether a virtio-balloon with free page reporting is active (VMs like Firecracker).

    The kernel then reports free blocks of order >= 9, exactly the 2 MiB blocks huge pages
    come from, to the hypervisor, which discards their backing; faulting them back in costs
    a host fault per 4 KiB. Low-order free pages are never reported, so 4 KiB allocations
    (the copy engine) mostly land on still-backed memory.
    """
    root = devices or VIRTIO_DEVICES
    try:
        entries = list(root.iterdir())
    except OSError:
        return False
    for dev in entries:
        try:
            if int((dev / "device").read_text().strip(), 16) != VIRTIO_ID_BALLOON:
                continue
            bits = (dev / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        if len(bits) > VIRTIO_BALLOON_F_REPORTING and bits[VIRTIO_BALLOON_F_REPORTING] == "1":
            return True
    return False


HUGEPAGE_CHECK_ENV = "FASTVLLM_HUGEPAGE_CHECK"


def hugepages_ready(nbytes: int, *, buddyinfo: str | None = None, thp: str | None = None,
                    reporting: bool | None = None) -> tuple[bool, str]:
    """Whether ``nbytes`` of huge pages can be had now without stalling; (ok, why).

    Two ways a huge page fault stalls: free 2 MiB blocks run short and the kernel compacts
    memory first, or (in a VM with free page reporting, see :func:`free_page_reporting`)
    the free blocks are no longer backed by the host. On this project's Firecracker VMs the
    second is what happens: a 2 GiB hugepage restore took 4.5-8.5 s with no compaction at
    all (compact_stall unchanged) against ~1 s for copy. Callers fall back to ``copy`` on
    False. ``reporting=False`` asks only whether the kernel *can* hand the pages out.
    ``FASTVLLM_HUGEPAGE_CHECK=off`` skips the check, for a host where the operator knows
    better and for measuring what forced huge pages do (ladder method 18).
    """
    if os.environ.get(HUGEPAGE_CHECK_ENV) == "off":
        return True, f"readiness check skipped ({HUGEPAGE_CHECK_ENV}=off)"
    mode = thp if thp is not None else thp_mode()
    if mode is None:
        return False, "this kernel has no transparent huge pages"
    if mode == "never":
        return False, "transparent huge pages are off (enabled = never)"
    if buddyinfo is None:
        try:
            buddyinfo = BUDDYINFO.read_text()
        except OSError:
            return False, "cannot read /proc/buddyinfo"
    need = -(-max(nbytes, 0) // HUGE_BYTES)
    free = free_huge_blocks(buddyinfo)
    if free < need:
        return False, (f"only {free} free 2 MiB blocks for {need} huge pages "
                       f"({nbytes / 2**20:.0f} MiB): the kernel would have to compact memory")
    if reporting is None:
        reporting = free_page_reporting()
    if reporting:
        return False, ("virtio-balloon free page reporting hands free 2 MiB blocks back to the hypervisor: "
                       "faulting them back in makes huge pages slower than copy here")
    return True, f"{free} free 2 MiB blocks for {need} huge pages"


_STATS_PATTERNS = {
    "mmap": re.compile(r"restore-memory: mmap: mapped (\d+) runs \((\d+) bytes\), read (\d+) runs \((\d+) bytes\)"),
    "read": re.compile(r"restore-memory: (copy|hugepage): read (\d+) runs \((\d+) bytes\)"),
    "advise": re.compile(r"restore-memory: hugepage: (?:.*?)advised (\d+) areas \((\d+) bytes\), skipped (\d+) areas"),
    "engine": re.compile(r"restore-memory: engine (\w+) \(([^)]*)\)"),
}


def memory_stats(log_path: Path) -> dict:
    """What the patched restorer reported in a restore log, summed over the tree's tasks.

    Empty counters (and ``engine`` None) for an unpatched CRIU or a log level below 3.
    """
    stats = {"engine": None, "engine_from": None, "tasks": 0, "mapped_runs": 0, "mapped_bytes": 0,
             "read_runs": 0, "read_bytes": 0, "hugepage_areas": 0, "hugepage_bytes": 0, "hugepage_skipped": 0}
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return stats
    for line in text.splitlines():
        if "restore-memory:" not in line:
            continue
        if m := _STATS_PATTERNS["engine"].search(line):
            stats["engine"], stats["engine_from"] = m.group(1), m.group(2)
        elif m := _STATS_PATTERNS["mmap"].search(line):
            stats["tasks"] += 1
            stats["mapped_runs"] += int(m.group(1))
            stats["mapped_bytes"] += int(m.group(2))
            stats["read_runs"] += int(m.group(3))
            stats["read_bytes"] += int(m.group(4))
        elif m := _STATS_PATTERNS["read"].search(line):
            stats["tasks"] += 1
            stats["read_runs"] += int(m.group(2))
            stats["read_bytes"] += int(m.group(3))
        elif m := _STATS_PATTERNS["advise"].search(line):
            stats["hugepage_areas"] += int(m.group(1))
            stats["hugepage_bytes"] += int(m.group(2))
            stats["hugepage_skipped"] += int(m.group(3))
    return stats


# ---------------------------------------------------------------------------------------
# shared helpers


class _CriuCallFailed(Exception):
    pass


def _pycriu_available() -> bool:
    if os.environ.get("FASTVLLM_CRIU_MODE") == "cli":
        return False
    try:
        import pycriu  # noqa: F401
    except ImportError:
        return False
    return True


def _open_dirs(images_dir: Path, work_dir: Path) -> tuple[int, int]:
    # criu swrk is exec'd from a fork of this process: the fds must survive exec.
    img = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
    work = os.open(work_dir, os.O_DIRECTORY | os.O_RDONLY)
    os.set_inheritable(img, True)
    os.set_inheritable(work, True)
    return img, work


def _network_lock(pycriu) -> int:
    # Default iptables locking needs the iptables binary; without it (and for an idle,
    # loopback-only server) skipping the lock is safe.
    if shutil.which("iptables") is None:
        return pycriu.rpc.SKIP
    return pycriu.rpc.IPTABLES


def _flag_args(opts) -> list[str]:
    flags = {
        "--shell-job": opts.shell_job,
        "--ext-unix-sk": opts.ext_unix_sk,
        "--tcp-established": opts.tcp_established,
        "--link-remap": opts.link_remap,
        "--file-locks": opts.file_locks,
        "--skip-in-flight": getattr(opts, "tcp_skip_in_flight", False),
    }
    return [flag for flag, on in flags.items() if on]


def _run_cli(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise _CriuCallFailed(lines[-1] if lines else f"criu exited with {proc.returncode}")


KEEP_LOGS = 20


def _new_log_path(action: str) -> Path:
    work = criu_work_dir()
    old = sorted(work.glob(f"{action}-*.log"))  # names start with a timestamp
    for stale in old[:-KEEP_LOGS]:
        stale.unlink(missing_ok=True)
    return work / f"{action}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


# Known CRIU log lines -> what the user should do. First match wins, so specific first.
_LOG_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"Can't fork for (\d+): File exists"),
     "PID {0} is taken by another process ({owner}); the snapshot needs its original PIDs: "
     "stop that process (fastvllm stop if it is a restored server) and retry"),
    (re.compile(r"anon_inode:\[io_uring\]"),
     "the server holds an io_uring, which CRIU cannot dump; start it through fastvllm (which blocks "
     "io_uring per process) or set sysctl kernel.io_uring_disabled=2 before starting it"),
    (re.compile(r"vdso: Unexpected rt vDSO area bounds"),
     "this CRIU is too old for the kernel's vDSO; run ./run.sh setup to build CRIU 4.2.1"),
    (re.compile(r"Can't get \d+:\d+ opt: Operation not supported"),
     "this CRIU cannot dump TCP sockets on kernel >= 6.16; run ./run.sh setup to build CRIU 4.2.1"),
    (re.compile(r"File (\S+) has bad (size|mode)"),
     "file /{0} has a different {1} than when the snapshot was taken; the snapshot cannot restore against it"),
    (re.compile(r"Can't open file /?(\S+) on restore.*No such file"),
     "/{0} existed when the snapshot was taken but is missing now"),
    (re.compile(r"Address already in use"),
     "a port or unix socket path the server used is taken by another process; stop it and retry"),
    (re.compile(r"No space left on device"),
     "no space left on device; free space where the snapshot is written, and retry"),
    (re.compile(r"(?:Operation not permitted|Permission denied).*(?:ptrace|seize|PTRACE)", re.I),
     "CRIU may not ptrace the process: run as root (or with CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE)"),
    (re.compile(r"SEIZE (\d+): (?:can't|task not stopped|unsupported)"),
     "could not freeze process {0} (it exited or is being traced); retry with an idle server"),
]


# "Error" lines CRIU logs and then carries on from: never the cause of a failure. In a
# container the tun one comes first on every restore and would hide the real error.
_HARMLESS_ERRORS = ("RLIMIT_NOFILE", "Unable to create tun")


def explain_log(log_path: Path, *, action: str, detail: str = "") -> str:
    """Turn a CRIU log into one line: the known cause and fix, or the first error line."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        text = ""
    for pattern, template in _LOG_PATTERNS:
        match = pattern.search(text)
        if match:
            owner = "unknown"
            if match.groups() and match.group(1).isdigit():
                owner = _describe_pid(int(match.group(1)))
            return f"CRIU {action} failed: " + template.format(*match.groups(), owner=owner) + f" (log: {log_path})"
    errors = [ln for ln in text.splitlines() if "Error" in ln and not any(h in ln for h in _HARMLESS_ERRORS)]
    if errors:  # "(00.1) Error (criu/cr-dump.c:2098): msg" -> "msg"
        first = re.sub(r"^.*?Error\s*(?:\([^)]*\))?:?\s*", "", errors[0]).strip() or errors[0].strip()
    else:
        first = detail or "unknown error"
    return f"CRIU {action} failed: {first} (full log: {log_path})"


def _describe_pid(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(" ".join(proc.cmdline()).split())  # one line, whatever argv holds
        return f"pid {pid} '{cmd[:60] or proc.name()}'"
    except psutil.Error:
        return f"pid {pid}, now gone"


def pids_in_use(pids: list[int]) -> dict[int, str]:
    """Which of ``pids`` exist right now, described; restore needs all of them free."""
    busy = {}
    for pid in pids:
        if psutil.pid_exists(pid):
            busy[pid] = _describe_pid(pid)
    return busy


def wait_pids_free(pids: list[int], timeout: float = 10.0) -> dict[int, str]:
    """Wait for ``pids`` to be reaped (a killed tree's PIDs linger as zombies briefly)."""
    deadline = time.monotonic() + timeout
    busy = pids_in_use(pids)
    while busy and time.monotonic() < deadline:
        for pid in list(busy):
            try:  # reap our own zombie children (a restored root is our child)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.05)
        busy = pids_in_use(pids)
    return busy
