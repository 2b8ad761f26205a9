"""Checkpoint and restore a process tree with CRIU.

Talks to CRIU through ``pycriu``'s RPC (``criu swrk``), which reports errors as structured
responses, and falls back to the ``criu`` command line when pycriu is not importable.
Either way CRIU's log is read back on failure and distilled into one line that says what
is wrong and what to do (see :func:`explain_log`).

CRIU 4.2 or newer is required: 3.17 fails on kernels with the new vDSO layout, and 4.1
cannot dump any TCP socket on kernels >= 6.16.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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
            version = _binary_version(cand)
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
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FastvllmError(f"cannot run {binary}: {exc}", fix="reinstall CRIU with ./run.sh setup") from exc
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
    """
    opts = opts or DumpOptions()
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


def restore_tree(criu: Criu, images_dir: Path, opts: RestoreOptions | None = None) -> tuple[int, Path]:
    """Restore the tree in ``images_dir``, detached; returns (root pid, CRIU log path).

    The images directory is only read: CRIU's log and work files go to the run dir, so a
    snapshot on a read-only volume restores and is never modified.
    """
    opts = opts or RestoreOptions()
    log_path = _new_log_path("restore")
    try:
        if _pycriu_available():
            pid = _restore_rpc(criu, images_dir, opts, log_path)
        else:
            pid = _restore_cli(criu, images_dir, opts, log_path)
    except _CriuCallFailed as exc:
        raise CriuFailed(explain_log(log_path, action="restore", detail=str(exc))) from None
    return pid, log_path


def _restore_rpc(criu: Criu, images_dir: Path, opts: RestoreOptions, log_path: Path) -> int:
    with _rpc_client(criu, images_dir, opts, log_path) as (client, _):
        # The restored root becomes our child rather than criu swrk's, and is reparented to
        # init when this command exits: it keeps serving after `fastvllm restore` returns.
        client.opts.rst_sibling = True
        return int(client.restore().pid)


def _restore_cli(criu: Criu, images_dir: Path, opts: RestoreOptions, log_path: Path) -> int:
    pidfile = log_path.with_suffix(".pid")
    cmd = [str(criu.binary), "restore", "-d", "-D", str(images_dir), "-W", str(log_path.parent),
           "-o", log_path.name, f"-v{opts.log_level}", "--pidfile", str(pidfile)]
    cmd += _flag_args(opts)
    if shutil.which("iptables") is None:
        cmd += ["--network-lock", "skip"]
    _run_cli(cmd + opts.extra_cli)
    return int(pidfile.read_text().strip())


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
