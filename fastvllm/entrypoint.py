"""A container's main process: restore the snapshot that matches this model, server args
and image from the snapshot volume, or cold-start (and, if asked, snapshot first); then
stay in the foreground as the server's parent.

Why it is built this way:
- A snapshot is found by a key over everything that makes a restored server differ from a
  cold one: the model (path and files), the vLLM args, level, ``VLLM_*`` settings (less the
  API key) and the image's versions (Python, torch, vLLM, CRIU, fastvllm's own source).
  A changed image or model therefore never even looks at an old snapshot. Host, port and
  API key are not in the key: a snapshot is dumped before its server listens, and every
  restore binds ``FASTVLLM_HOST:FASTVLLM_PORT`` with the key it is given.
- A snapshot that is there but does not validate or restore (corrupt, truncated,
  mismatched) costs one log line and a cold start. It is only ever read, never repaired or
  deleted: it is the user's data.
- Inside a container the API listens on 0.0.0.0 (``FASTVLLM_HOST``) and snapshots take the
  CLI's default level: levels 1 and 2 are driven over the server's private control channel
  (:mod:`fastvllm.inside_vllm.control`), never over HTTP, so nothing ties them to loopback.
- ``VLLM_API_KEY`` (or ``--api-key`` among the vLLM args) protects the OpenAI routes of
  cold, snapshotted and restored servers alike; it is never written anywhere.
- This process is PID 1 (or a child subreaper): the restored tree becomes its child, it
  forwards signals to it, reaps orphans, and exits with the server's status. The server's
  log file (CRIU needs the tree's output in a file, see :mod:`fastvllm.paths`) is copied
  to stdout as it grows.
- CRIU restores a tree with its original PIDs. The snapshotting container moves its PID
  counter past ``PID_FLOOR`` before the server starts, so the few helpers a restoring
  container runs first (PIDs below that) never hold a PID the snapshot needs.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import api_key as keys
from . import manifest, server
from .errors import FastvllmError, SnapshotInvalid
from .launcher import forward_signals
from .paths import logs_dir, run_dir
from .progress import Progress

PID_FLOOR = 1000
_HASHED_FILE_MAX = 16 << 20  # model files up to this size are hashed; larger ones (weights) by size


@dataclass
class Config:
    """What the container was asked to serve (from the environment and/or arguments)."""

    model: str
    vllm_args: list[str] = field(default_factory=list)
    port: int = server.DEFAULT_PORT
    host: str = "0.0.0.0"
    snapshot_root: Path = Path("/snapshots")
    snapshot_on_miss: bool = False
    level: int | None = None  # None: the CLI's default
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **given) -> "Config":
        """Arguments win over ``FASTVLLM_*`` variables; unset ones take the defaults."""
        env = dict(os.environ if env is None else env)
        values = {
            "model": env.get("FASTVLLM_MODEL"),
            "vllm_args": shlex.split(env.get("FASTVLLM_VLLM_ARGS", "")),
            "port": env.get("FASTVLLM_PORT"),
            "host": env.get("FASTVLLM_HOST"),
            "snapshot_root": env.get("FASTVLLM_SNAPSHOT_DIR"),
            "snapshot_on_miss": env.get("FASTVLLM_SNAPSHOT_ON_MISS"),
            "level": env.get("FASTVLLM_LEVEL"),
        }
        values.update({k: v for k, v in given.items() if v not in (None, [], "")})
        if not values["model"]:
            raise FastvllmError("no model given", fix="set FASTVLLM_MODEL or pass the model as the first argument")
        try:
            port = int(values["port"] or server.DEFAULT_PORT)
            level = None if values["level"] in (None, "") else int(values["level"])
        except ValueError:
            raise FastvllmError(f"FASTVLLM_PORT / FASTVLLM_LEVEL must be integers (got {values['port']!r}, "
                                f"{values['level']!r})", fix="e.g. FASTVLLM_PORT=8000 FASTVLLM_LEVEL=0") from None
        on_miss = values["snapshot_on_miss"]
        if isinstance(on_miss, str):
            on_miss = on_miss.strip().lower() in ("1", "true", "yes", "on")
        vllm_args, key = keys.resolve(given.get("api_key"), list(values["vllm_args"]), env)
        cfg = cls(model=values["model"], vllm_args=vllm_args, port=port,
                  host=values["host"] or "0.0.0.0", snapshot_root=Path(values["snapshot_root"] or "/snapshots"),
                  snapshot_on_miss=bool(on_miss), level=level, api_key=key)
        cfg.check()
        return cfg

    @property
    def snapshot_level(self) -> int:
        if self.level is not None:
            return self.level
        from .defaults import snapshot_level

        return snapshot_level()

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise FastvllmError(f"port {self.port} is out of range", fix="use 1-65535")
        if self.snapshot_level not in (0, 1, 2):
            raise FastvllmError(f"FASTVLLM_LEVEL={self.level} is not supported", fix="use 0, 1 or 2")
        for flag in ("--host", "--port", "--model"):
            if flag in self.vllm_args or any(a.startswith(flag + "=") for a in self.vllm_args):
                raise FastvllmError(f"{flag} belongs to fastvllm, not to the vLLM args",
                                    fix=f"set FASTVLLM_{flag[2:].upper()} (or the entrypoint option) instead")

    def server_args(self) -> list[str]:
        """vLLM args for a snapshot: the user's (the address is given at bind time)."""
        return list(self.vllm_args)


# ---------------------------------------------------------------------------------------
# which snapshot


def snapshot_identity(cfg: Config, model: str, criu_version: str) -> dict:
    """Everything a restored server depends on; its digest names the snapshot directory."""
    versions = {k: v for k, v in manifest.host_versions(criu_version).items() if k != "kernel"}
    return {
        "model": model,
        "model_files": _model_fingerprint(model),
        "vllm_args": cfg.vllm_args,
        "level": cfg.snapshot_level,
        "vllm_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_") and k != keys.ENV},
        "versions": versions,
        "fastvllm_source": _source_digest(),
    }


def snapshot_path(cfg: Config, model: str, criu_version: str) -> Path:
    identity = json.dumps(snapshot_identity(cfg, model, criu_version), sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name or "model").strip("-.") or "model"
    return cfg.snapshot_root.absolute() / f"{name}-{digest}"


def _model_fingerprint(model: str) -> list:
    """Names and sizes of the model's files, with contents hashed for the small ones
    (config, tokenizer); weights by size (level 2 restores check their sha256 anyway)."""
    root = Path(model)
    if not root.is_dir():
        return []  # a hub id: its revision is whatever the local cache holds
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if size <= _HASHED_FILE_MAX else None
        out.append([str(path.relative_to(root)), size, digest])
    return out


def _source_digest() -> str:
    """fastvllm's own code is part of the restored memory: any change means a new snapshot."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def check_matches(meta: dict, cfg: Config, model: str) -> None:
    """A snapshot at the right path must also say it is of this server (defence against a
    directory copied or renamed by hand)."""
    srv = meta.get("server", {})
    wanted = cfg.server_args()
    problems = []
    if meta.get("model") != model:
        problems.append(f"model {meta.get('model')!r}, not {model!r}")
    if meta.get("level", 0) != cfg.snapshot_level:
        problems.append(f"level {meta.get('level', 0)}, not {cfg.snapshot_level}")
    if list(srv.get("extra_args", []))[: len(wanted)] != wanted:
        problems.append(f"vLLM args {srv.get('extra_args')}, not {wanted}")
    if problems:
        raise SnapshotInvalid("it was taken with " + "; ".join(problems), fix="")


# ---------------------------------------------------------------------------------------
# run


def run(cfg: Config) -> int:
    """Restore or cold-start, then serve in the foreground; returns the server's exit status."""
    t0 = time.monotonic()
    progress = Progress(t0=t0)
    ready_file().unlink(missing_ok=True)
    _become_subreaper()
    _exit_on_signals()  # until a server runs: a stop request unwinds and cleans up
    from .criu_ops import find_criu
    from .snapshot import resolve_model

    model = resolve_model(cfg.model)
    try:
        criu = find_criu()
    except FastvllmError as exc:
        _say(f"CRIU unusable ({exc}); cold-starting without snapshots")
        return _cold_start(cfg, model, progress)
    path = snapshot_path(cfg, model, criu.version_str)
    follower = LogFollower()
    follower.start()

    if path.exists():
        served = _try_restore(path, cfg, model, progress, follower)
        if served:
            return _foreground(served, follower, "restored from " + str(path))
        return _cold_start(cfg, model, progress, follower)
    if not cfg.snapshot_on_miss:
        _say(f"no snapshot at {path}; cold-starting (FASTVLLM_SNAPSHOT_ON_MISS=1 would create it)")
        return _cold_start(cfg, model, progress, follower)

    _say(f"no snapshot at {path}; cold-starting to create it (level {cfg.snapshot_level})")
    from .snapshot import take_snapshot

    _reserve_low_pids()
    try:
        taken = take_snapshot(model, path, cfg.port, cfg.server_args(), progress, level=cfg.snapshot_level,
                              host=cfg.host, api_key=cfg.api_key)
    except (FastvllmError, OSError) as exc:
        _say(f"snapshot not created ({exc}); cold-starting")
        return _cold_start(cfg, model, progress, follower)
    _say(f"snapshot created at {path}; cold start's first token after {taken['timings']['first_token_s']:.2f} s")
    served = _try_restore(path, cfg, model, progress, follower)
    if served:
        return _foreground(served, follower, "restored from the snapshot just taken")
    return _cold_start(cfg, model, progress, follower)


def _try_restore(path: Path, cfg: Config, model: str, progress: Progress, follower: "LogFollower") -> int | None:
    """Restore ``path`` and return the root PID, or log one line and return None."""
    from .restore import restore_snapshot

    try:
        meta = manifest.load(path)
        check_matches(meta, cfg, model)
        for item in meta["external_files"]:  # the dump-time log is the other container's past
            if item.get("path") == meta.get("log"):
                follower.skip_to(item["path"], int(item.get("size", 0)))
        result = restore_snapshot(path, progress, prefetch_mode="overlap", measure_residency=False,
                                  host=cfg.host, port=cfg.port, api_key=cfg.api_key)
    except (FastvllmError, OSError) as exc:
        reason = exc.message if isinstance(exc, FastvllmError) else f"{exc.__class__.__name__}: {exc}"
        _say(f"snapshot {path} not used: {reason}; cold-starting (the snapshot is left as it is)")
        return None
    _say(f"restored: canary matches; first token after {result['timings']['first_token_s']:.2f} s "
         f"(since the entrypoint started)")
    return result["pids"][0]


def _cold_start(cfg: Config, model: str, progress: Progress, follower: "LogFollower | None" = None) -> int:
    """Start the server as at ``fastvllm serve`` (bound to ``cfg.host``), wait for its first
    token, then serve in the foreground."""
    import secrets

    if follower is None:
        follower = LogFollower()
        follower.start()
    spec = server.ServerSpec(model=model, port=cfg.port, host=cfg.host, extra_args=list(cfg.vllm_args),
                             api_key=cfg.api_key)
    log_path = logs_dir() / f"serve-{secrets.token_hex(6)}.log"
    with progress.step(f"cold-starting vLLM for {model} on {cfg.host}:{cfg.port}"):
        started = server.start_and_probe(spec, log_path, "serve", progress.elapsed)
    _say(f"cold start: first token after {started.first_token_s:.2f} s (since the entrypoint started)")
    return _foreground(started.proc.pid, follower, "cold-started")


# ---------------------------------------------------------------------------------------
# the foreground


def _foreground(root_pid: int, follower: "LogFollower", how: str) -> int:
    """Forward signals to the server's root, reap every child, return the root's status."""
    _say(f"serving ({how}); root pid {root_pid}")
    forward_signals(root_pid)  # before anyone can see us ready (and so send a stop)
    # For a startup probe: /health alone also answers from the server a snapshot is about
    # to stop, this file only once the server that stays is up.
    ready_file().write_text(f"{root_pid} {how}\n")
    code = _wait_for(root_pid)
    ready_file().unlink(missing_ok=True)
    follower.stop()
    _say(f"server exited with status {code}")
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


def _exit_on_signals() -> None:
    """PID 1 ignores signals it has no handler for: make a stop during start-up unwind."""

    def bail(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, bail)


def _become_subreaper() -> None:
    """Orphans (a restored tree, once CRIU is done) come to us even when we are not PID 1."""
    PR_SET_CHILD_SUBREAPER = 36
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reserve_low_pids(floor: int = PID_FLOOR) -> None:
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


def _say(message: str) -> None:
    print(f"fastvllm entrypoint: {message}", file=sys.stderr, flush=True)


class LogFollower(threading.Thread):
    """Copies what server logs in the run dir gain to stdout (the container's log).

    Offsets are per path, so a log that CRIU's restore puts back (a new file with the
    dump-time content) continues where it left off instead of being printed twice.
    """

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True, name="fastvllm-log-follower")
        self.dir = logs_dir()
        self.interval = interval
        self.offsets = {str(p): p.stat().st_size for p in self.dir.glob("*.log")}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def skip_to(self, path: str, offset: int) -> None:
        with self.lock:
            self.offsets[path] = max(self.offsets.get(path, 0), offset)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.pump()

    def stop(self) -> None:
        self.done.set()
        self.pump()

    def pump(self) -> None:
        with self.lock:
            for path in sorted(self.dir.glob("*.log")):
                key = str(path)
                try:
                    with open(path, "rb") as fh:
                        size = os.fstat(fh.fileno()).st_size
                        offset = min(self.offsets.get(key, 0), size)
                        fh.seek(offset)
                        data = fh.read(size - offset)
                except OSError:
                    continue
                self.offsets[key] = offset + len(data)
                if data:
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
