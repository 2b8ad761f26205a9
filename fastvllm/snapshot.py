"""Take a snapshot: start the server, warm it, record the canary, dump the whole tree.

Nothing partial survives a failure: the server tree is stopped, its /dev/shm objects
are removed, and the temporary snapshot directory is deleted. A directory the user named
is never written to until the snapshot is complete (see :mod:`fastvllm.manifest`).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from . import criu_ops, external_files, manifest, registry, server
from .errors import FastvllmError
from .paths import logs_dir
from .progress import Progress

HEALTH_TIMEOUT_S = float(os.environ.get("FASTVLLM_HEALTH_TIMEOUT", "900"))


def default_out(model: str) -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path("fastvllm-snapshots") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_model(model: str) -> str:
    """A local directory becomes an absolute path; anything else is a hub id, passed on."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FastvllmError(f"{path} has no config.json: not a model directory",
                                fix="pass a Hugging Face model directory (or make one: fastvllm make-model DIR)")
        return str(path.resolve())
    if model.startswith(("/", ".", "~")):
        raise FastvllmError(f"model directory {model} does not exist", fix="check the path")
    return model


def take_snapshot(model: str, out: Path | None = None, port: int = server.DEFAULT_PORT,
                  extra_args: list[str] | None = None, progress: Progress | None = None) -> dict:
    """Snapshot a freshly started, warmed server of ``model`` into ``out``; returns the result."""
    progress = progress or Progress()
    model = resolve_model(model)
    out = (out or default_out(model)).absolute()
    criu = criu_ops.find_criu()
    spec = server.ServerSpec(model=model, port=port, extra_args=list(extra_args or []))
    server.ensure_port_free(spec.host, spec.port)
    tmp = manifest.prepare_target(out)
    log_path = logs_dir() / f"server-{secrets.token_hex(6)}.log"
    proc = None
    pids: list[int] = []
    shm: set[str] = set()
    try:
        with progress.step(f"starting vLLM server for {model} on port {port}"):
            proc = server.launch(spec, log_path)
            registry.add(registry.ServerRecord(root_pid=proc.pid, pids=[proc.pid], endpoint=spec.endpoint,
                                               model=model, how="snapshot", log=str(log_path)))
            server.wait_healthy(spec.endpoint, proc.pid, HEALTH_TIMEOUT_S, log_path)
        healthy_s = progress.elapsed()
        name = server.served_model(spec.endpoint)
        with progress.step("warming up with one request"):
            server.complete(spec.endpoint, name, server.WARMUP_PROMPT)
        first_token_s = progress.elapsed()
        _, canary = server.complete(spec.endpoint, name, server.CANARY_PROMPT)
        progress.note(f"canary completion: {canary!r}")

        pids = server.tree_pids(proc.pid)
        shm = external_files.shm_paths_of(pids)
        remaps_before = external_files.link_remaps_in_shm()
        t_dump = time.monotonic()
        with progress.step(f"dumping {len(pids)} processes with CRIU {criu.version_str}"):
            criu_ops.dump_tree(criu, proc.pid, tmp / manifest.CRIU_DIR)
            proc.wait(timeout=30)  # CRIU killed the tree after dumping it
            still = criu_ops.wait_pids_free(pids, timeout=10)
            if still:
                raise FastvllmError(f"processes {sorted(still)} survived the dump", fix="report this with the CRIU log")
            shm |= external_files.link_remaps_in_shm() - remaps_before
            saved = external_files.save(shm | {str(log_path)}, tmp / manifest.EXTERNAL_DIR)
        dump_s = time.monotonic() - t_dump

        with progress.step("writing manifest"):
            manifest.commit(tmp, out, {
                "format": manifest.FORMAT,
                "format_version": manifest.FORMAT_VERSION,
                "created_at": manifest.now_iso(),
                "level": 0,
                "model": model,
                "served_model_name": name,
                "server": {"host": spec.host, "port": spec.port, "endpoint": spec.endpoint,
                           "extra_args": spec.extra_args, "command": spec.command(),
                           "kv_cache_gib": spec.environment()["VLLM_CPU_KVCACHE_SPACE"]},
                "versions": manifest.host_versions(criu.version_str),
                "canary": {"prompt": server.CANARY_PROMPT, "max_tokens": server.CANARY_TOKENS,
                           "temperature": 0.0, "completion": canary},
                "tree": {"root_pid": proc.pid, "pids": pids},
                "log": str(log_path),
                "external_files": [item.to_json() for item in saved],
                "timings": {"healthy_s": healthy_s, "first_token_s": first_token_s, "dump_s": dump_s},
            })
        external_files.remove(shm)
        registry.remove(proc.pid)
        result = manifest.load(out)
        return {"snapshot": str(out), "image_bytes": result["image_bytes"],
                "timings": {"healthy_s": round(healthy_s, 3), "first_token_s": round(first_token_s, 3),
                            "dump_s": round(dump_s, 3), "total_s": round(progress.elapsed(), 3)}}
    except BaseException:
        manifest.discard(tmp)
        if proc is not None:
            server.stop_tree(proc.pid, pids or None, timeout=20)
            registry.remove(proc.pid)
            # A tree killed by CRIU (or SIGKILL) cannot clean its own /dev/shm objects.
            external_files.remove(shm | (external_files.link_remaps_in_shm() - (remaps_before if pids else set())))
        raise
