"""Servers that fastvllm started or restored, so that ``ps`` and ``stop`` can find them.

One JSON record per server in the run dir, keyed by root PID. A record is trusted only
while a process with that PID exists and started at the recorded time (PIDs get reused).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import psutil

from .paths import servers_dir


@dataclass
class ServerRecord:
    root_pid: int
    pids: list[int]
    endpoint: str
    model: str
    how: str  # "serve" | "restore" | "snapshot"
    log: str
    snapshot: str | None = None
    control: str = ""  # the server's control channel directory (fastvllm.inside_vllm.control)
    started_at: float = field(default_factory=time.time)
    create_time: float = 0.0
    # The fastvllm process driving a server that is not serving yet (unbound: loading,
    # released for a dump, or restored and waking). If it dies (SIGKILL, OOM), nobody will
    # ever bind or dump that tree: `fastvllm gc` kills it (see gc.py).
    owner_pid: int = field(default_factory=os.getpid)
    owner_create_time: float = field(default_factory=lambda: _create_time(os.getpid()))

    def owner_alive(self) -> bool:
        return bool(self.owner_pid) and abs(_create_time(self.owner_pid) - self.owner_create_time) < 1.0

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.root_pid)
            return abs(proc.create_time() - self.create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return -1.0


def add(record: ServerRecord) -> ServerRecord:
    try:
        record.create_time = psutil.Process(record.root_pid).create_time()
    except psutil.Error:
        pass
    path = servers_dir() / f"{record.root_pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    os.replace(tmp, path)
    return record


def remove(root_pid: int) -> None:
    try:
        (servers_dir() / f"{root_pid}.json").unlink()
    except FileNotFoundError:
        pass


def live() -> list[ServerRecord]:
    """Records of servers still running; stale records are dropped."""
    out = []
    for path in sorted(servers_dir().glob("*.json")):
        try:
            record = ServerRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if record.alive():
            out.append(record)
        else:
            path.unlink(missing_ok=True)
    return out


def find(target: str) -> list[ServerRecord]:
    """Records matching an endpoint URL, a port, or a PID of any process in the tree."""
    target = target.rstrip("/")
    matches = []
    for record in live():
        if target == record.endpoint or target.endswith(f":{record.endpoint.rsplit(':', 1)[-1]}"):
            matches.append(record)
        elif target.isdigit() and (int(target) in record.pids or int(target) == record.root_pid):
            matches.append(record)
    return matches
