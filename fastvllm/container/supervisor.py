"""The container's PID 1 duties: forward signals to the server tree, reap every child,
exit with the server's status, and keep the PIDs a snapshot needs free.

This process is PID 1 (or a child subreaper): a restored tree becomes its child once CRIU
is done. CRIU restores a tree with its original PIDs, so the snapshotting container moves
its PID counter past ``PID_FLOOR`` before the server starts; a restoring container's own
helpers (low PIDs) then never hold one the snapshot needs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path

from ..launcher import forward_signals
from ..paths import run_dir
from .logs import LogFollower, say

PID_FLOOR = 1000


def foreground(root_pid: int, follower: "LogFollower", how: str) -> int:
    """Forward signals to the server's root, reap every child, return the root's status."""
    say(f"serving ({how}); root pid {root_pid}")
    forward_signals(root_pid)  # before anyone can see us ready (and so send a stop)
    # For a startup probe: /health alone also answers from the server a snapshot is about
    # to stop, this file only once the server that stays is up.
    ready_file().write_text(f"{root_pid} {how}\n")
    code = _wait_for(root_pid)
    ready_file().unlink(missing_ok=True)
    follower.stop()
    say(f"server exited with status {code}")
    return code


def _wait_for(root_pid: int) -> int:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # PID 1 / subreaper: orphans are ours to reap too
        except InterruptedError:
            continue
        except ChildProcessError:  # the root is not our child (should not happen): poll it
            while _exists(root_pid):
                time.sleep(0.5)
            return 1
        if pid == root_pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


def ready_file() -> Path:
    """Exists while the server this entrypoint keeps is serving (``$FASTVLLM_RUN_DIR/serving``)."""
    return run_dir() / "serving"


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def exit_on_signals() -> None:
    """PID 1 ignores signals it has no handler for: make a stop during start-up unwind."""

    def bail(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, bail)


def become_subreaper() -> None:
    """Orphans (a restored tree, once CRIU is done) come to us even when we are not PID 1."""
    PR_SET_CHILD_SUBREAPER = 36
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reserve_low_pids(floor: int = PID_FLOOR) -> None:
    """In a fresh PID namespace, push the PID counter past ``floor`` before the server starts
    (threads take IDs from the same counter; ~0.1 s), so that a restoring container's own
    helpers, which run before CRIU and get low PIDs, never hold one the snapshot needs."""
    if os.getpid() > floor:
        return
    last = 0
    while last < floor:
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        last = t.native_id or floor
