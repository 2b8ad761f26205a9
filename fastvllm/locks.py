"""Host-wide locks: one restore per snapshot, one dump per host.

Why each lock exists (issue 12):

- ``restore_lock(snapshot)``: a restore writes the snapshot's ``/dev/shm`` objects back at
  their original paths and a failed restore removes them again. Two restores of one snapshot
  at once overwrite each other's objects, and the loser's cleanup unlinks the winner's.
- ``criu_names_lock()`` (``dump_lock()`` is its non-waiting form): CRIU names the hard
  links it makes for unlinked-but-open files ``/dev/shm/link_remap.N``, and N is the same
  in every vLLM tree (seen here: ``link_remap.240`` in snapshots of two different models).
  A restore puts its remap files back at those names before CRIU runs and CRIU unlinks
  them when it is done; a dump creates them. So two of these at once on one host collide:
  a dump fails with "Can't link remap ... File exists" on another restore's file, one
  restore's CRIU unlinks the other's (its CRIU then fails), and a dump could save (and
  later remove) another tree's remap files as its own. All three were seen here with
  concurrent runs. Unlike the restore lock, this one is waited for: the window it covers
  (put back -> CRIU done, or the dump) is seconds, and two different snapshots restoring
  at once should both succeed, one after the other.

How: ``flock(LOCK_EX | LOCK_NB)`` on a file in ``<run dir>/locks`` (the run dir is checked
to be ours and private, so nobody else can plant or pre-lock these files). flock locks die
with the process that holds them (also on SIGKILL), so there are no stale locks to break.
The holder writes who it is (PID, command, since when) into the file; the second comer
reads it and fails at once with one line naming the holder, rather than waiting behind a
restore that may take minutes.

The lock file descriptor is opened close-on-exec: a server or CRIU started while the lock
is held must not inherit (and so keep holding) the lock after fastvllm exits. Lock files
are never unlinked (unlinking a flock file races with a process about to lock it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from .errors import FastvllmError
from .paths import run_dir


class LockBusy(FastvllmError):
    """Another fastvllm process holds the lock."""


def locks_dir() -> Path:
    path = run_dir() / "locks"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _key(snapshot: Path) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(str(Path(snapshot).resolve()).encode())


def restore_lock_path(snapshot: Path) -> Path:
    """The lock file of one snapshot (by its resolved path)."""
    return locks_dir() / f"restore-{_key(snapshot)}.lock"


def dump_lock_path() -> Path:
    """The CRIU-names lock lives in the /dev/shm it protects, not in the run dir: every
    fastvllm on the host (whatever its ``FASTVLLM_RUN_DIR``: tests, benchmarks, users) and
    only those sharing that /dev/shm (a container has its own) must see the same lock.
    ``FASTVLLM_CRIU_NAMES_LOCK`` moves it (tests)."""
    import os as _os

    from .external_files import SHM_DIR

    return Path(_os.environ.get("FASTVLLM_CRIU_NAMES_LOCK") or SHM_DIR / ".fastvllm-criu-names.lock")


@contextmanager
def restore_lock(snapshot: Path) -> Iterator[dict]:
    """Hold the restore lock of ``snapshot``; raise :class:`LockBusy` at once if it is held."""
    snapshot = Path(snapshot).resolve()
    with _held(restore_lock_path(snapshot), what=f"restore of {snapshot}",
               fix="wait for it to finish, or stop it (fastvllm ps / kill the PID); one restore of a "
                   "snapshot per host at a time") as me:
        yield me


@contextmanager
def criu_names_lock(wait_s: float = 300.0, what: str = "CRIU dump or restore") -> Iterator[dict]:
    """Hold this host's lock on CRIU's /dev/shm names, waiting up to ``wait_s`` for it;
    then :class:`LockBusy` naming the holder."""
    with _held(dump_lock_path(), what=what, wait_s=wait_s,
               fix="wait for it to finish: CRIU's /dev/shm/link_remap names collide between "
                   "dumps and restores on one host") as me:
        yield me


@contextmanager
def dump_lock() -> Iterator[dict]:
    """Hold this host's dump lock; raise :class:`LockBusy` at once if it is held."""
    with criu_names_lock(wait_s=0, what="snapshot (CRIU dump)") as me:
        yield me


def holder(path: Path) -> dict | None:
    """Who holds the lock at ``path`` (their own record), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_record(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def _held(path: Path, *, what: str, fix: str, wait_s: float = 0.0) -> Iterator[dict]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():  # /dev/shm is world-writable: a planted file is not ours to trust
            raise FastvllmError(f"lock file {path} belongs to uid {owner}, not to us",
                                fix="remove it (it holds nothing) and run again")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    record = _read_record(fd, wait=True)
                    if record.get("pid") and not psutil.pid_exists(int(record["pid"])) \
                            and time.monotonic() < deadline + HANDOVER_WAIT_S:
                        # Its holder was killed; the orphan guard that inherited the lock is
                        # still cleaning up after it (orphan_guard.py): a second or so.
                        time.sleep(0.05)
                        continue
                    waited = f" (waited {wait_s:g} s)" if wait_s else ""
                    raise LockBusy(f"another {record.get('what') or what} is running{waited}: {_describe(record)}",
                                   fix=fix) from None
                time.sleep(0.05)
        me = {"pid": os.getpid(), "command": _command(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield {**me, "fd": fd}  # the fd lets an orphan guard inherit the lock
        finally:
            os.ftruncate(fd, 0)  # still ours: the record goes before the lock does
    finally:
        os.close(fd)  # releases the flock


HANDOVER_WAIT_S = 30.0


def _read_record(fd: int, wait: bool = False) -> dict:
    """The holder's record; a holder that just locked may not have written it yet."""
    for _ in range(20 if wait else 1):
        try:
            data = os.pread(fd, 4096, 0)
            if data:
                return json.loads(data)
        except ValueError:
            pass
        time.sleep(0.01)
    return {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "holder unknown (it has not written its record yet)"
    return f"pid {record['pid']} ({record.get('command', '?')}) since {record.get('since', '?')}"


def _command() -> str:
    prog = os.path.basename(sys.argv[0]) or sys.executable
    if prog in ("cli.py", "__main__.py"):  # python -m fastvllm.cli
        prog = "fastvllm"
    text = " ".join([prog, *sys.argv[1:]])
    return text if len(text) <= 160 else text[:157] + "..."
