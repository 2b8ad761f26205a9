"""The private control channel between fastvllm's CLI and the vLLM API server it runs.

It carries: "ready + canary" (server -> CLI, once the engine is warm), "release for the
dump", "wake / reload", "canary check", and after a restore "bind HOST:PORT" (CLI ->
server, each answered). Nothing else can drive the server's engine: vLLM's HTTP dev
endpoints are never enabled.

Why files in a 0700 directory, and not a unix socket or an inherited fd:

- **It survives CRIU untouched.** The server holds no descriptor of the channel between
  two messages: it ``stat()``s one path on a timer (5 ms until it serves, 50 ms after).
  A dump therefore catches no socket, no pipe, no open file of the channel, and a restored
  process simply goes on polling the same path. A listening unix socket would be dumped
  and re-created by CRIU at restore (its path must then be free, and a connected one has
  a peer outside the tree); an inherited pipe would have its other end in a process that
  no longer exists after a restore.
- **Owner-only by the file system.** The directory is created 0700 under fastvllm's run
  directory (itself 0700) before the server starts, and re-created so at every restore;
  messages are files 0600 written to a temporary name and renamed into place (a reader
  never sees half a message). Whoever can open it is the server's owner (or root), who
  can already ptrace the server: the channel grants nothing new. Other users cannot even
  see it exists. Symlinks are refused, so the directory cannot be redirected.
- **One request at a time.** The CLI drives one server step after step; a client takes
  an exclusive ``flock`` on ``client.lock`` for the duration of a call, so two CLIs (say,
  ``restore`` and a test asking for a worker RPC) never interleave. Requests and replies
  carry a random id, so a stale reply (a client killed mid-call) is never taken for a
  fresh one.

Files: ``ready.json`` (server, once), ``request.json`` (client), ``reply.json`` (server).
This module is pure Python with no vLLM import: the server half runs inside vLLM's
API-server process, the client half in the CLI.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Callable

READY = "ready.json"
REQUEST = "request.json"
REPLY = "reply.json"
LOCK = "client.lock"


class ControlError(Exception):
    """The channel is unusable, the server refused a request, or it did not answer."""


def prepare_dir(path: Path) -> Path:
    """Create (or take back) the channel directory: 0700, ours, not a symlink, and empty of
    messages from an earlier life of the server (a restore reuses the snapshot's path)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"control directory {path} is not a plain directory")
    if info.st_uid != os.getuid():
        raise ControlError(f"control directory {path} belongs to uid {info.st_uid}, not to us")
    os.chmod(path, 0o700)
    for name in (READY, REQUEST, REPLY, REQUEST + ".tmp", REPLY + ".tmp", READY + ".tmp"):
        try:
            os.unlink(path / name)
        except FileNotFoundError:
            pass
    return path


def remove_dir(path: Path) -> None:
    """Remove a channel directory once its server is gone (a restore re-creates it)."""
    path = Path(path)
    for name in (READY, REQUEST, REPLY, LOCK, REQUEST + ".tmp", REPLY + ".tmp", READY + ".tmp"):
        try:
            os.unlink(path / name)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def write_message(path: Path, message: dict) -> None:
    """Write ``message`` as JSON to ``path`` atomically (temporary name, 0600, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(message).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_message(path: Path) -> dict | None:
    """The message at ``path`` or None if there is none; never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class ServerEnd:
    """The half inside vLLM's API server: announce readiness, take requests, answer them."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def announce_ready(self, info: dict) -> None:
        write_message(self.path / READY, info)

    def take_request(self) -> dict | None:
        """The pending request, removed from the directory, or None (one ``stat`` when idle)."""
        request_path = self.path / REQUEST
        try:
            os.stat(request_path)
        except FileNotFoundError:
            return None
        message = read_message(request_path)
        try:
            os.unlink(request_path)
        except FileNotFoundError:
            pass
        return message

    def answer(self, request: dict, ok: bool, payload) -> None:
        reply = {"id": request.get("id"), "ok": ok, ("result" if ok else "error"): payload}
        write_message(self.path / REPLY, reply)


class ClientEnd:
    """The CLI's half: wait for the server to be ready, call it, read its answers.

    ``alive`` tells whether the server is still running, so that a server that dies is
    reported at once instead of after a timeout.
    """

    def __init__(self, path: Path, alive: Callable[[], bool] | None = None, poll_s: float = 0.002):
        self.path = Path(path)
        self.alive = alive or (lambda: True)
        self.poll_s = poll_s

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = read_message(self.path / READY)
            if message is not None:
                return message
            if not self.alive():
                raise ControlError("the server exited before it was ready")
            time.sleep(0.05)
        raise ControlError(f"the server was not ready after {timeout:.0f} s")

    def call(self, op: str, timeout: float = 900.0, **args) -> dict:
        """Send one request and wait for its reply; a refusal raises :class:`ControlError`
        with the server's one-line reason."""
        request = {"id": secrets.token_hex(8), "op": op, "args": args}
        lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                os.unlink(self.path / REPLY)
            except FileNotFoundError:
                pass
            write_message(self.path / REQUEST, request)
            deadline = time.monotonic() + timeout
            checked = time.monotonic()
            while True:
                reply = read_message(self.path / REPLY)
                if reply is not None and reply.get("id") == request["id"]:
                    os.unlink(self.path / REPLY)
                    break
                now = time.monotonic()
                if now > deadline:
                    raise ControlError(f"the server did not answer {op!r} within {timeout:.0f} s")
                if now - checked > 0.2:  # a liveness check costs a /proc read: not every poll
                    checked = now
                    if not self.alive():
                        raise ControlError(f"the server exited while handling {op!r}")
                time.sleep(self.poll_s)
        finally:
            os.close(lock_fd)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error") or f"{op} failed"))
        return reply.get("result") or {}
