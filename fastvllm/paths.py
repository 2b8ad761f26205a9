"""Where fastvllm keeps run-time state that must outlive one command.

The server's log file lives here rather than in the snapshot: CRIU records the absolute
path of every open file, so the path must be the same at dump and at every restore.
"""

import os
from pathlib import Path

from . import run_dir_check

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_dir() -> Path:
    """Base directory for logs and the server registry (``$FASTVLLM_RUN_DIR``)."""
    base = Path(os.environ.get("FASTVLLM_RUN_DIR", "/var/tmp/fastvllm"))
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return run_dir_check.check(base)  # ours, 0700, not a symlink


def logs_dir() -> Path:
    path = run_dir() / "logs"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def servers_dir() -> Path:
    path = run_dir() / "servers"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def criu_work_dir() -> Path:
    """CRIU's logs go here, never into a snapshot (snapshots are read-only on restore)."""
    path = run_dir() / "criu-logs"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def new_control_dir() -> Path:
    """A fresh path for one server's control channel (:mod:`fastvllm.inside_vllm.control`).

    Under the run dir, so that it is private (0700) and its absolute path, which the
    server keeps polling, can be re-created at every restore of a snapshot of it."""
    import secrets

    base = run_dir() / "control"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / secrets.token_hex(8)
