"""A container's main process (``fastvllm entrypoint``): restore the snapshot that matches this model, server args
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

import time
from pathlib import Path

from .. import manifest, server
from ..errors import FastvllmError
from ..paths import logs_dir
from ..progress import Progress
from .config import Config
from .identity import check_matches, snapshot_path
from .logs import LogFollower, say
from .supervisor import become_subreaper, exit_on_signals, foreground, ready_file, reserve_low_pids


def run(cfg: Config) -> int:
    """Restore or cold-start, then serve in the foreground; returns the server's exit status."""
    t0 = time.monotonic()
    progress = Progress(t0=t0)
    ready_file().unlink(missing_ok=True)
    become_subreaper()
    exit_on_signals()  # until a server runs: a stop request unwinds and cleans up
    from ..criu_ops import find_criu
    from ..snapshot import resolve_model

    from ..gc import collect_in_background

    model = resolve_model(cfg.model)
    collect_in_background("entrypoint")  # debris of a previous container killed mid-restore
    try:
        criu = find_criu()
    except FastvllmError as exc:
        say(f"CRIU unusable ({exc}); cold-starting without snapshots")
        return _cold_start(cfg, model, progress)
    path = snapshot_path(cfg, model, criu.version_str)
    follower = LogFollower()
    follower.start()

    if path.exists():
        served = _try_restore(path, cfg, model, progress, follower)
        if served:
            return foreground(served, follower, "restored from " + str(path))
        return _cold_start(cfg, model, progress, follower)
    if not cfg.snapshot_on_miss:
        say(f"no snapshot at {path}; cold-starting (FASTVLLM_SNAPSHOT_ON_MISS=1 would create it)")
        return _cold_start(cfg, model, progress, follower)

    say(f"no snapshot at {path}; cold-starting to create it (level {cfg.snapshot_level})")
    from ..snapshot import take_snapshot

    reserve_low_pids()
    try:
        taken = take_snapshot(model, path, cfg.port, cfg.server_args(), progress, level=cfg.snapshot_level,
                              host=cfg.host, api_key=cfg.api_key)
    except Exception as exc:  # noqa: BLE001 - PID 1 always serves: any failure means a cold start
        say(f"snapshot not created ({_reason(exc)}); cold-starting")
        return _cold_start(cfg, model, progress, follower)
    say(f"snapshot created at {path}; cold start's first token after {taken['timings']['first_token_s']:.2f} s")
    served = _try_restore(path, cfg, model, progress, follower)
    if served:
        return foreground(served, follower, "restored from the snapshot just taken")
    return _cold_start(cfg, model, progress, follower)


def _try_restore(path: Path, cfg: Config, model: str, progress: Progress, follower: "LogFollower") -> int | None:
    """Restore ``path`` and return the root PID, or log one line and return None."""
    from ..restore import restore_snapshot

    try:
        meta = manifest.load(path)
        check_matches(meta, cfg, model)
        for item in meta["external_files"]:  # the dump-time log is the other container's past
            if item.get("path") == meta.get("log"):
                follower.skip_to(item["path"], int(item.get("size", 0)))
        result = restore_snapshot(path, progress, prefetch_mode="overlap", measure_residency=False,
                                  host=cfg.host, port=cfg.port, api_key=cfg.api_key)
    except Exception as exc:  # noqa: BLE001 - PID 1 always serves: any refusal or failure means a cold start
        say(f"snapshot {path} not used: {_reason(exc)}; cold-starting (the snapshot is left as it is)")
        return None
    say(f"restored: canary matches; first token after {result['timings']['first_token_s']:.2f} s "
         f"(since the entrypoint started)")
    return result["pids"][0]


def _reason(exc: Exception) -> str:
    """One line for the log: a FastvllmError's own message, else the exception's type and text
    (a malformed manifest field, an HTTP error from the restored server)."""
    if isinstance(exc, FastvllmError):
        return exc.message
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"


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
    say(f"cold start: first token after {started.first_token_s:.2f} s (since the entrypoint started)")
    return foreground(started.proc.pid, follower, "cold-started")
