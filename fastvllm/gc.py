"""``fastvllm gc``: remove what interrupted snapshots and restores leave behind, and nothing else.

A killed ``snapshot`` or ``restore`` cannot clean up after itself (issue 12, case 2):

- ``.NAME.partial-XXXX`` snapshot directories (gigabytes of CRIU images) beside the
  ``--out`` target. Where they are is known only to the process that made them, so the
  snapshot code records each in the run dir (:func:`register_partial`, removed again by
  :func:`unregister_partial` on commit or discard) with its PID and start time. A recorded
  partial whose creator is dead is debris. Partials gc was not told about (an older
  fastvllm, a path passed on the command line) are removed only when no process has
  anything open, mapped or as its working directory inside, and nothing in them changed
  for ``min_age_s``: a snapshot that is still starting its server writes nothing for a
  while, and must not lose its directory.
- ``/dev/shm`` objects of a vLLM tree: ``psm_*`` (shared-memory rings), ``sem.mp-*``
  (multiprocessing semaphores), CRIU's ``link_remap.N`` hard links, and CRIU's
  ``NAME.cr.N.ghost`` restore-time copies of those. They are debris when
  no process on the host has them open or mapped (every ``/proc/PID/fd`` and
  ``/proc/PID/maps`` is read, and files are matched by device and inode, so a
  ``link_remap`` hard link of a live semaphore counts as live), when they have not changed
  for ``min_age_s`` (a restore puts them back a moment *before* CRIU maps them: they are
  fresh then), and when no fastvllm restore or dump holds its lock (:mod:`fastvllm.locks`).
  Python's ``multiprocessing`` uses the same names for other programs; an object nobody
  has open or mapped is unreachable for them too, except by a name passed on and opened
  later, which the age rule covers.
- server records in the run dir whose server is gone (``ps`` drops them too, but only when
  it is run), and :mod:`fastvllm.model_identity`'s cached digests of files that are gone
  or changed.

Never removed: anything a live process has open, mapped or as its cwd; a partial whose
creator still runs; a file under someone else's name pattern; a ``/dev/shm`` object owned
by another user (fastvllm's trees run as the user that runs fastvllm). When some process cannot be
inspected (not root), shared objects that others could open (mode not 0600) are kept.
``dry_run`` reports the same decisions and removes nothing.

For tests only: ``FASTVLLM_GC_SHM_DIR`` points the ``/dev/shm`` sweep at another directory
(a private one on tmpfs), so tests never touch other programs' objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from . import locks, registry, server
from .external_files import SHM_DIR
from .paths import run_dir, servers_dir

DEFAULT_MIN_AGE_S = 600.0
SHM_DIR_ENV = "FASTVLLM_GC_SHM_DIR"
PARTIAL_NAME = re.compile(r"^\..+\.partial-[0-9a-zA-Z]+$")
# CRIU restores a deleted-but-open file through a temporary "<name>.cr.<id>.ghost" file;
# one left over after an interrupted restore (seen here as sem.mp-*.cr.1.ghost) is debris too.
SHM_NAME = re.compile(r"^(psm_[0-9a-zA-Z_]+|sem\.mp-[0-9a-zA-Z_]+|link_remap\.\d+)(\.cr\.[0-9a-f]+\.ghost)?$")


@dataclass
class Item:
    """One thing gc looked at: removed (or would be, on a dry run), or kept and why."""

    kind: str  # "partial" | "shm" | "server-record" | "orphan-server" | "partial-record" | "model-hash-record"
    path: str
    why: str
    bytes: int = 0


@dataclass
class Report:
    dry_run: bool
    removed: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.removed)

    def to_json(self) -> dict:
        return {"dry_run": self.dry_run, "bytes_freed": self.bytes_freed,
                "removed": [asdict(i) for i in self.removed], "kept": [asdict(i) for i in self.kept]}


AUTO_ENV = "FASTVLLM_AUTO_GC"


def collect_in_background(who: str) -> threading.Thread | None:
    """Run :func:`collect` with its defaults in a daemon thread, so that debris of killed
    commands does not pile up where nobody runs ``fastvllm gc`` (a node that only ever
    runs the container). ``snapshot`` and the container's entrypoint start it: both spend
    tens of seconds starting a server, so the sweep (a read of every process's fds and
    maps) costs them nothing they wait for; ``restore`` does not (every millisecond of it is
    on the path to the first token). The rules are the same as ``fastvllm gc``'s, so
    nothing in use, recent (10 min) or under a held lock is touched. One line on stderr
    when something was removed; a failure never fails the command.
    ``FASTVLLM_AUTO_GC=0`` turns it off.
    """
    if os.environ.get(AUTO_ENV, "1") == "0":
        return None

    def sweep() -> None:
        try:
            report = collect()
        except Exception as exc:  # noqa: BLE001 - housekeeping never fails the command
            print(f"fastvllm: gc ({who}): skipped ({exc.__class__.__name__}: {exc})", file=sys.stderr)
            return
        if report.removed:
            print(f"fastvllm: gc ({who}): removed {len(report.removed)} leftovers of killed commands "
                  f"({report.bytes_freed / 2**20:.1f} MiB): "
                  + ", ".join(i.path for i in report.removed[:3]) + (" ..." if len(report.removed) > 3 else ""),
                  file=sys.stderr)

    thread = threading.Thread(target=sweep, name="fastvllm-gc", daemon=True)
    thread.start()
    return thread


# -- partial snapshot directories: the records the snapshot code keeps ---------------------

def partials_dir() -> Path:
    path = run_dir() / "partials"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _record_path(partial: Path) -> Path:
    import xxhash

    return partials_dir() / f"{xxhash.xxh3_64_hexdigest(str(Path(partial).absolute()).encode())}.json"


def register_partial(path: Path) -> None:
    """Record that this process is building the partial snapshot directory ``path``."""
    me = psutil.Process()
    record = {"path": str(Path(path).absolute()), "pid": me.pid, "create_time": me.create_time(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    target = _record_path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)


def unregister_partial(path: Path) -> None:
    """Forget ``path`` (it was renamed into place or discarded)."""
    _record_path(path).unlink(missing_ok=True)


# -- the sweep -----------------------------------------------------------------------------

def collect(paths: list[Path] | tuple = (), *, dry_run: bool = False, min_age_s: float = DEFAULT_MIN_AGE_S,
            shm_dir: Path | None = None) -> Report:
    """Find and (unless ``dry_run``) remove debris; ``paths`` are partial directories or
    directories to search for them (the parents of ``--out`` targets)."""
    report = Report(dry_run=dry_run)
    usage = _Usage.scan()
    now = time.time()
    seen: set[str] = set()
    for record_file in sorted(partials_dir().glob("*.json")):
        _registered_partial(record_file, usage, report, seen)
    for given in paths:
        for candidate in _partials_in(Path(given).absolute()):
            if str(candidate) in seen:
                continue
            seen.add(str(candidate))
            _unregistered_partial(candidate, usage, report, now, min_age_s)
    _shm(Path(shm_dir or os.environ.get(SHM_DIR_ENV) or SHM_DIR), usage, report, now, min_age_s)
    _server_records(report)
    _model_hash_records(report)
    return report


def _registered_partial(record_file: Path, usage: "_Usage", report: Report, seen: set[str]) -> None:
    try:
        record = json.loads(record_file.read_text())
        path, pid, created = Path(record["path"]), int(record["pid"]), float(record["create_time"])
    except (OSError, ValueError, KeyError, TypeError):
        _remove(report, Item("partial-record", str(record_file), "unreadable record"), record_file)
        return
    seen.add(str(path))
    if _alive(pid, created):
        report.kept.append(Item("partial", str(path), f"its snapshot (pid {pid}) is still running"))
        return
    if not path.exists():
        _remove(report, Item("partial-record", str(record_file), f"{path} no longer exists"), record_file)
        return
    if not PARTIAL_NAME.match(path.name) or path.is_symlink() or not path.is_dir():
        report.kept.append(Item("partial", str(path), "recorded, but not a .NAME.partial-* directory"))
        return
    holder = usage.holder_under(path)
    if holder:
        report.kept.append(Item("partial", str(path), f"in use by pid {holder}"))
        return
    _remove(report, Item("partial", str(path), f"its snapshot (pid {pid}) died", _tree_bytes(path)), path)
    _remove(report, None, record_file)


def _unregistered_partial(path: Path, usage: "_Usage", report: Report, now: float, min_age_s: float) -> None:
    holder = usage.holder_under(path)
    if holder:
        report.kept.append(Item("partial", str(path), f"in use by pid {holder}"))
        return
    age = now - _newest_change(path)
    if age < min_age_s:
        report.kept.append(Item("partial", str(path), f"changed {age:.0f} s ago (younger than {min_age_s:.0f} s)"))
        return
    _remove(report, Item("partial", str(path), f"unused, unchanged for {age:.0f} s", _tree_bytes(path)), path)


def _partials_in(path: Path) -> list[Path]:
    if PARTIAL_NAME.match(path.name):
        return [path] if path.is_dir() and not path.is_symlink() else []
    try:
        return sorted(p for p in path.iterdir()
                      if PARTIAL_NAME.match(p.name) and p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _shm(shm_dir: Path, usage: "_Usage", report: Report, now: float, min_age_s: float) -> None:
    busy = _busy_locks()
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        return
    for name in names:
        if not SHM_NAME.match(name):
            continue
        path = shm_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        holder = usage.inodes.get((st.st_dev, st.st_ino))
        if holder:
            report.kept.append(Item("shm", str(path), f"in use by pid {holder}"))
            continue
        if busy:
            report.kept.append(Item("shm", str(path), f"a fastvllm {busy} is running"))
            continue
        if st.st_uid != os.geteuid():
            report.kept.append(Item("shm", str(path), f"owned by uid {st.st_uid}, not by this user"))
            continue
        age = now - max(st.st_mtime, st.st_ctime)
        if age < min_age_s:
            report.kept.append(Item("shm", str(path), f"changed {age:.0f} s ago (younger than {min_age_s:.0f} s)"))
            continue
        if usage.unreadable and st.st_mode & 0o077:
            report.kept.append(Item("shm", str(path), "others may open it and not every process could be inspected"))
            continue
        _remove(report, Item("shm", str(path), f"open or mapped by no process, unchanged for {age:.0f} s",
                             st.st_blocks * 512), path)


def _busy_locks() -> str | None:
    """What fastvllm operation holds a lock now (its objects may be unmapped for a moment)."""
    for lock in sorted(locks.locks_dir().glob("*.lock")):
        who = locks.holder(lock)
        if who is not None:
            return f"{who.get('what', 'operation')} (pid {who.get('pid', '?')})"
    return None


def _server_records(report: Report) -> None:
    for path in sorted(servers_dir().glob("*.json")):
        try:
            record = registry.ServerRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            _remove(report, Item("server-record", str(path), "unreadable record"), path)
            continue
        if not record.alive():
            _remove(report, Item("server-record", str(path), f"server pid {record.root_pid} is gone"), path)
        elif record.endpoint == server.UNBOUND and not record.owner_alive():
            _kill_orphan(report, record, path)


def _kill_orphan(report: Report, record: "registry.ServerRecord", path: Path) -> None:
    """A server that never listened and whose fastvllm process is dead (a SIGKILLed
    snapshot, serve or restore): loading, released for a dump or half woken, it will never
    be bound or dumped, and it holds memory, /dev/shm objects and the snapshot's PIDs."""
    pids = server.tree_pids(record.root_pid) or [record.root_pid]
    item = Item("orphan-server", str(path), f"unbound server pid {record.root_pid} ({record.how}) whose "
                f"fastvllm pid {record.owner_pid} is gone: killed {len(pids)} processes")
    report.removed.append(item)
    if not report.dry_run:
        server.kill_tree(pids)
        path.unlink(missing_ok=True)


def _model_hash_records(report: Report) -> None:
    """model_identity's cache: one record per inode; drop those whose file is gone or changed."""
    from .model_identity import cache_dir

    for path in sorted(cache_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
            st = os.stat(record["path"])
            if [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns] == record["key"]:
                continue
            why = f"{record['path']} changed since it was hashed"
        except FileNotFoundError:
            why = "its model file is gone"
        except (OSError, ValueError, KeyError, TypeError):
            why = "unreadable record"
        _remove(report, Item("model-hash-record", str(path), why), path)


def _remove(report: Report, item: Item | None, path: Path) -> None:
    if not report.dry_run:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if item is not None:
        report.removed.append(item)


# -- who uses what ------------------------------------------------------------------------

@dataclass
class _Usage:
    """Every file the host's processes have open or mapped, and their working directories."""

    inodes: dict[tuple[int, int], int]  # (dev, ino) -> a pid using it
    paths: list[tuple[str, int]]  # (path, pid): fd targets, mapped files, cwds
    unreadable: int = 0

    @classmethod
    def scan(cls) -> "_Usage":
        inodes: dict[tuple[int, int], int] = {}
        paths: list[tuple[str, int]] = []
        unreadable = 0
        for entry in os.listdir("/proc"):  # this process too: a caller's own files are in use
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue
            except PermissionError:
                unreadable += 1
                continue
            for fd in fds:
                link = f"/proc/{pid}/fd/{fd}"
                try:
                    st = os.stat(link)
                    inodes.setdefault((st.st_dev, st.st_ino), pid)
                    paths.append((os.readlink(link), pid))
                except OSError:
                    continue
            try:
                paths.append((os.readlink(f"/proc/{pid}/cwd"), pid))
            except OSError:
                pass
            try:
                with open(f"/proc/{pid}/maps") as fh:
                    for line in fh:
                        parts = line.split(maxsplit=5)
                        if len(parts) < 6 or parts[4] == "0":
                            continue
                        major, minor = parts[3].split(":")
                        inodes.setdefault((os.makedev(int(major, 16), int(minor, 16)), int(parts[4])), pid)
                        paths.append((parts[5].rstrip("\n"), pid))
            except (OSError, ValueError):
                continue
        return cls(inodes=inodes, paths=paths, unreadable=unreadable)

    def holder_under(self, directory: Path) -> int | None:
        prefix = str(directory).rstrip("/") + "/"
        for path, pid in self.paths:
            if path == str(directory) or path.startswith(prefix):
                return pid
        return None


def _alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _newest_change(root: Path) -> float:
    newest = 0.0
    for dirpath, dirnames, files in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, f) for f in files + dirnames)]:
            try:
                st = os.lstat(name)
                newest = max(newest, st.st_mtime, st.st_ctime)
            except OSError:
                continue
    return newest


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total
