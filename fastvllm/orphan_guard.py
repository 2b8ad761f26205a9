"""Kill what a fastvllm command started when that command is SIGKILLed before handing it over.

``snapshot`` and ``restore`` run a vLLM server tree and CRIU as their children. On an error,
Ctrl-C, SIGTERM or SIGHUP they clean up themselves (``errors.Terminated``). SIGKILL (an
orchestrator's second signal, the OOM killer) gives the process no chance to run anything:
CRIU's ``swrk`` would go on restoring a tree nobody will bind, a released server would
keep running weightless, and the /dev/shm objects put back for CRIU would stay.

So each of those commands starts this small watcher first, in its own session, so that a
signal to the command's process group never reaches it. It holds a pidfd of the command
(exact, no PID reuse) and:

- every 100 ms notes the command's children (CRIU, the server root, the lazy-pages daemon);
- learns from the command what else is at stake: the PIDs CRIU will restore (a restore
  gives the tree the PIDs in its images) and the paths to remove (a partial snapshot, the
  /dev/shm objects put back);
- on ``release`` (the tree is bound and serving, or the command's own clean-up has run)
  exits without touching anything;
- when the command dies unreleased, SIGKILLs its noted children, every process of the
  sessions they lead, and each restored PID, but only processes started after the watcher
  (a PID that existed before is never ours), then removes the paths.

Why not PR_SET_PDEATHSIG: CRIU restores each task's own death signal from the image, and a
death signal fires when the parent *thread* exits, not the process. Why not a cgroup:
these hosts and most containers give no writable cgroup v2 hierarchy, and CRIU would record
that cgroup in a later dump.

It runs as ``python -m fastvllm.orphan_guard OWNER_PID`` and imports only the standard
library until it must remove /dev/shm objects (then it takes the same host-wide lock the
commands hold around CRIU's names, see :mod:`fastvllm.locks`).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.1
KILL_ROUNDS = 20  # sweeps 50 ms apart: a CRIU that is being killed may still fork
GONE_TIMEOUT_S = 10.0


class OrphanGuard:
    """The command's end: start the watcher, tell it what is at stake, release it."""

    def __init__(self, hold_fds: tuple[int, ...] = ()) -> None:
        """``hold_fds``: lock fds the watcher inherits, so that a lock the command holds
        (the snapshot's restore lock) stays held until the watcher has cleaned up after
        the command's death, and no new restore of that snapshot starts in the middle."""
        self.proc: subprocess.Popen | None = None
        self.hold_fds = tuple(hold_fds)

    def start(self) -> "OrphanGuard":
        from .paths import logs_dir

        # The watcher may start after we are dead (SIGKILL right after the spawn): a pidfd
        # taken here, handed over, still says so; and it learns from us when our work began.
        me = os.pidfd_open(os.getpid())
        log = open(logs_dir() / f"orphan-guard-{os.getpid()}.log", "ab")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "fastvllm.orphan_guard", str(os.getpid()), str(me),
                                          str(_now_ticks() - _clock_ticks())],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True, close_fds=True, pass_fds=(me, *self.hold_fds),
                                         cwd=str(Path(__file__).resolve().parent.parent))
        finally:
            log.close()
            os.close(me)
        return self

    def watch_pids(self, pids: list[int]) -> None:
        """PIDs the command is about to create through CRIU (killed if started after the guard)."""
        self._send({"pids": [int(p) for p in pids]})

    def remove_paths(self, paths) -> None:
        """Files or directories to remove if the command dies unreleased."""
        self._send({"paths": [str(p) for p in paths]})

    def release(self) -> None:
        """Hand over: the watcher exits and touches nothing."""
        if self.proc is None:
            return
        self._send({"release": True})
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def _send(self, message: dict) -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # a watcher that died cannot help; the command's own clean-up still runs

    def __enter__(self) -> "OrphanGuard":
        return self.start()

    def __exit__(self, *exc) -> None:
        # Reached after the command's own success or clean-up: nothing is left for the watcher.
        self.release()


# ---------------------------------------------------------------------------------------
# the watcher process


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _now_ticks() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * _clock_ticks())


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, start time in ticks since boot) of ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[3]), int(fields[19])


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _is_fastvllm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fastvllm" in f.read()
    except OSError:
        return False


def _orphaned(parent: int) -> bool:
    """Is a CRIU process with this parent an orphan? Its parent is neither a fastvllm
    command (another command's CRIU) nor a CRIU (the tasks a live CRIU is restoring, whose
    names are "criu" until CRIU gives them theirs back)."""
    return not _is_fastvllm(parent) and _comm(parent) != "criu"


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class _Watch:
    def __init__(self, owner: int, since: int):
        self.owner = owner
        self.since = since  # only processes started at or after this tick are ever ours
        self.children: dict[int, int] = {}  # pid -> start time
        self.pids: set[int] = set()
        self.paths: list[str] = []

    def note_children(self) -> None:
        for pid in _children(self.owner):
            st = _stat(pid)
            if st and st[2] >= self.since:
                self.children.setdefault(pid, st[2])

    def handle(self, message: dict) -> bool:
        """Apply one message; True on release."""
        self.pids.update(int(p) for p in message.get("pids", ()))
        self.paths += [str(p) for p in message.get("paths", ())]
        return bool(message.get("release"))

    def victims(self) -> set[int]:
        sessions = set()
        found = set()
        for pid, started in self.children.items():
            st = _stat(pid)
            if st and st[2] == started:
                found.add(pid)
                if st[1] == pid:  # it leads its own session: the server tree, or CRIU's daemon
                    sessions.add(pid)
        for pid in self.pids:
            st = _stat(pid)
            if st and st[2] >= self.since:
                found.add(pid)
                if st[1] in self.pids:  # the restored tree's own session
                    sessions.add(st[1])
        for pid in _all_pids():
            if pid in found or pid == os.getpid():
                continue
            st = _stat(pid)
            if not st or st[2] < self.since:
                continue
            if st[1] in sessions or (_comm(pid) == "criu" and _orphaned(st[0])):
                # A CRIU started since we began whose fastvllm parent is gone was the dead
                # command's (the watcher may have started too late to see it as a child).
                found.add(pid)
        found.discard(os.getpid())
        return found

    def clean_up(self) -> dict:
        killed: set[int] = set()
        for _ in range(KILL_ROUNDS):
            batch = self.victims() - killed
            # A killed tree cannot unlink its /dev/shm objects: note them before the kill.
            self.paths += sorted(_shm_objects_of(batch) - set(self.paths))
            for pid in batch:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while time.monotonic() < deadline and any(_stat(p) and _stat(p)[2] >= self.since for p in killed):
            time.sleep(0.05)
        removed = _remove(self.paths)
        return {"killed": sorted(killed), "removed": removed}


def _shm_objects_of(pids) -> set[str]:
    """/dev/shm files the processes hold open or mapped, under any of their names."""
    from .external_files import shm_paths_of

    return {p for p in shm_paths_of(sorted(pids)) if not p.startswith("/dev/shm/.fastvllm")}


def _remove(paths: list[str]) -> list[str]:
    """Remove the paths; /dev/shm ones under the host's CRIU-names lock (another tree's
    restore may have put back a file of the same name by now: then it is open or mapped,
    and the lock orders us after its CRIU)."""
    removed = []
    shm = [p for p in paths if p.startswith("/dev/shm/")]
    rest = [p for p in paths if p not in shm]
    for path in rest:
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(path)
    if shm:
        from .locks import criu_names_lock

        with criu_names_lock(what="fastvllm orphan guard (removing /dev/shm objects of a killed command)"):
            for path in shm:
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


def main(argv: list[str]) -> int:
    owner, pidfd, since = int(argv[0]), int(argv[1]), int(argv[2])
    watch = _Watch(owner, since=since)
    sel = selectors.DefaultSelector()
    sel.register(pidfd, selectors.EVENT_READ, "owner")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    buffer = b""
    stdin_open = True

    def read_messages(wait: bool) -> bool:
        """Apply what the command sent: one read when select said so (``wait``), else all
        that is already in the pipe. True on release."""
        nonlocal buffer, stdin_open
        fd = sys.stdin.fileno()
        while stdin_open and (wait or _readable(fd, 0)):
            chunk = os.read(fd, 65536)
            if not chunk:  # the command closed its end (or died): nothing more will come
                stdin_open = False
                sel.unregister(fd)
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip() and watch.handle(json.loads(line)):
                    return True
            if wait:
                break
        return False

    while True:
        watch.note_children()
        events = [key.data for key, _ in sel.select(timeout=POLL_S)]
        if "stdin" in events and read_messages(wait=True):
            return 0
        if "owner" in events:
            # What the command sent before it died is still in the pipe: read it all first.
            if read_messages(wait=False):
                return 0
            result = watch.clean_up()
            print(json.dumps({"owner": owner, "died": True, **result}), file=sys.stderr, flush=True)
            return 0


def _readable(fd: int, timeout: float | None) -> bool:
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        return bool(sel.select(timeout=timeout))
    finally:
        sel.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
