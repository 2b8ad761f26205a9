"""Take a snapshot: start the server, warm it, record the canary, rehearse the wake path,
release, dump the whole tree.

The server never listens on a port here: warm-up, canary, release and the rehearsal run
in-process, driven over its control channel (:mod:`fastvllm.inside_vllm.api_entry`), and
the tree is dumped unbound, so every restore binds the address it is asked for.

Nothing partial survives a failure: the server tree is stopped, its /dev/shm objects
are removed, and the temporary snapshot directory is deleted. A directory the user named
is never written to until the snapshot is complete (see :mod:`fastvllm.manifest`).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from . import api_key as keys
from . import canary, criu_ops, defaults, engine, external_files, gc, host_compat, integrity, locks, manifest
from . import model_identity, registry, server
from .errors import FastvllmError
from .inside_vllm.control import remove_dir
from .orphan_guard import OrphanGuard
from .paths import logs_dir
from .progress import Progress

LEVELS = (0, 1, 2)


def default_out(model: str) -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path("fastvllm-snapshots") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_model(model: str) -> str:
    """The absolute local directory of ``model``: a directory as given, or a well-known
    name (``llama-3.2-3b``) or hub id found in the local Hugging Face cache.

    Cached models are resolved to their snapshot directory rather than passed on as hub
    ids: vLLM then loads them by path, offline, exactly as a local directory (this machine
    has no hub to ask), and level 2 finds their safetensors at that same path. A name or id
    that is not cached fails here, in one line saying how to get it, instead of inside vLLM.
    """
    from . import model_names

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FastvllmError(f"{path} has no config.json: not a model directory",
                                fix="pass a Hugging Face model directory (or make one: fastvllm make-model DIR)")
        return str(path.resolve())
    if model.startswith(("/", ".", "~")):
        raise FastvllmError(f"model directory {model} does not exist", fix="check the path")
    return str(model_names.resolve(model))


def weights_source(model: str) -> Path:
    """The directory holding the model's safetensors (a local dir, or the hub cache)."""
    from . import model_names

    path = Path(model)
    if not path.is_dir():
        repo = model_names.hub_id(model)
        path = model_names.cached_snapshot(repo) if repo else None
        if path is None:
            raise FastvllmError(f"level 2 needs the weights of {model} on local disk as safetensors",
                                fix="pass a local model directory, or use --level 0")
    if not list(path.glob("*.safetensors")):
        raise FastvllmError(f"{path} holds no .safetensors files, which level 2 reloads from",
                            fix="convert the checkpoint to safetensors, or use --level 0")
    return path


def take_snapshot(model: str, out: Path | None = None, port: int = server.DEFAULT_PORT,
                  extra_args: list[str] | None = None, progress: Progress | None = None,
                  level: int | None = None, copy_weights: bool = False, host: str = server.LOOPBACK,
                  api_key: str | None = None) -> dict:
    """Snapshot a freshly started, warmed server of ``model`` into ``out``; returns the result.

    Level 2 releases weights and KV cache before the dump, so the image holds neither; the
    weights are referenced (or, with ``copy_weights``, copied) as safetensors for restore.
    Level 1 releases the KV cache only: the weights stay in the image as the engine packed
    them. Level 0 dumps the whole process. ``None`` takes :func:`defaults.snapshot_level`
    (level 2 with ``copy_weights``). At levels 1 and 2 the wake path is rehearsed first
    (release, wake, the canary must match, release again), so a reload bug fails here and
    not in a restore. ``host``/``port`` are where restores listen by default; ``api_key``
    (or one among the vLLM args, or ``$VLLM_API_KEY``) only marks the snapshot as
    protected: the server never listens before the dump, and no key is stored.
    """
    if level is None:  # --copy-weights only means something at level 2: it asks for it
        level = 2 if copy_weights else defaults.snapshot_level()
    if level not in LEVELS:
        raise FastvllmError(f"--level {level} is not supported",
                            fix="use --level 1 (KV cache released), 2 (weights too) or 0 (whole process)")
    if copy_weights and level != 2:
        raise FastvllmError("--copy-weights only applies to level 2 (the other levels keep the weights in the image)",
                            fix="drop --copy-weights, or use --level 2")
    if not 0 < port < 65536:
        raise FastvllmError(f"port {port} is out of range", fix="use 1-65535")
    progress = progress or Progress()
    model = resolve_model(model)
    out = (out or default_out(model)).absolute()
    manifest.check_target(out)
    criu = criu_ops.find_criu()
    args, key = keys.resolve(api_key, list(extra_args or []))
    weight_dir = None
    if level == 2:
        weight_dir = weights_source(model)
    if level in engine.SLEEP_LEVELS:
        args += [a for a in engine.sleep_server_options() if a not in args]
    spec = server.ServerSpec(model=model, port=port, host=host, extra_args=args, api_key=key)
    tmp = manifest.prepare_target(out)
    gc.register_partial(tmp)  # the backstop: `fastvllm gc` removes it once we are dead
    sweep = gc.collect_in_background("snapshot")  # others' debris, while our server starts
    # SIGKILL runs no clean-up here: the watcher kills the server we start and removes the
    # partial directory if this process dies before the end (orphan_guard.py).
    guard = OrphanGuard().start()
    guard.remove_paths([tmp])
    log_path = logs_dir() / f"server-{secrets.token_hex(6)}.log"
    proc = None
    pids: list[int] = []
    shm: set[str] = set()
    try:
        with progress.step(f"starting vLLM server for {model} (unbound) and warming it up"):
            ready = server.start_unbound(spec, log_path, "snapshot", progress.elapsed)
        proc, channel = ready.proc, ready.channel
        recorded = {k: ready.info["canary"][k] for k in ("token_ids", "logprobs", "text")}
        progress.note(f"canary completion: {recorded['text']!r}")
        weight_record, released, rehearsal_s = None, None, None
        if level == 2:
            with progress.step("recording weights" + (" (copying)" if copy_weights else "")):
                weight_record = _record_weights(weight_dir, tmp, copy_weights)
        if level in engine.SLEEP_LEVELS:
            what = "weights and KV cache" if level == 2 else "the KV cache"
            with progress.step(f"rehearsing the wake path (release {what}, wake, canary)"):
                start = time.monotonic()
                engine.release(channel, level=level)
                files = manifest.weight_files(weight_record, tmp) if level == 2 else []
                engine.wake(channel, files, model_dir=model)
                try:
                    engine.canary(channel, expect=recorded)
                except FastvllmError as exc:
                    raise FastvllmError(f"the wake path does not give the server back: {exc.message}",
                                        fix="report this with the server log; --level 0 avoids the wake path") from None
                rehearsal_s = time.monotonic() - start
            with progress.step(f"sleep level {level}: releasing {what}"):
                released = engine.release(channel, level=level)

        pids = server.tree_pids(proc.pid)
        anon_huge_kib = server.tree_anon_huge_kib(pids)
        listen_ports = server.tree_listen_ports(pids)
        shm = external_files.shm_paths_of(pids)
        guard.remove_paths(sorted(shm))
        kernels = external_files.compile_cache_paths_of(pids, external_files.compile_cache_roots(spec.environment()))
        model_id = model_identity.identity(Path(model)) if Path(model).is_dir() else None
        t_dump = time.monotonic()
        with progress.step(f"dumping {len(pids)} processes with CRIU {criu.version_str}"), \
                locks.criu_names_lock(what="snapshot (CRIU dump)"):
            # One dump per host: CRIU names the link_remap files it makes in /dev/shm
            # link_remap.N, and the files new since here are taken as this tree's own.
            remaps_before = external_files.link_remaps_in_shm()
            try:
                criu_ops.dump_tree(criu, proc.pid, tmp / manifest.CRIU_DIR)
            except BaseException:
                # The remap links this failed dump made are ours only while the lock is held:
                # a moment later another tree's restore may put back a file of the same name.
                external_files.remove(external_files.link_remaps_in_shm() - remaps_before)
                raise
            try:
                proc.wait(timeout=30)  # CRIU killed the tree after dumping it
                still = criu_ops.wait_pids_free(pids, timeout=10)
                if still:
                    raise FastvllmError(f"processes {sorted(still)} survived the dump",
                                        fix="report this with the CRIU log")
                remaps = external_files.link_remaps_in_shm() - remaps_before
                saved = external_files.save(shm | remaps | {str(log_path)} | kernels, tmp / manifest.EXTERNAL_DIR,
                                            keep_existing=kernels)
            finally:
                # The tree is gone (its objects saved, or the snapshot failing): remove them
                # while the lock is held, so the next dump or restore on this host finds
                # CRIU's names free and never loses a file of the same name to us.
                external_files.remove(shm | (external_files.link_remaps_in_shm() - remaps_before))
        dump_s = time.monotonic() - t_dump
        with progress.step("sealing the CRIU images (digests, read-only)"):
            sealed = integrity.seal(tmp / manifest.CRIU_DIR)

        timings = {"healthy_s": ready.healthy_s, "first_token_s": ready.first_token_s, "dump_s": dump_s}
        if rehearsal_s is not None:
            timings["rehearsal_s"] = rehearsal_s
        with progress.step("writing manifest"):
            written = manifest.commit(tmp, out, {
                "format": manifest.FORMAT,
                "format_version": manifest.FORMAT_VERSION,
                "created_at": manifest.now_iso(),
                "level": level,
                "weights": weight_record,
                "released": released,
                "model": model,
                "served_model_name": ready.info.get("served_model_name") or model,
                "server": {"host": spec.host, "port": spec.port, "endpoint": spec.endpoint,
                           "extra_args": keys.redact(spec.extra_args), "command": keys.redact(spec.command()),
                           "env": {k: v for k, v in spec.env.items() if k != keys.ENV},
                           "platform": ready.info.get("platform") or engine.platform(),
                           "kv_cache_gib": spec.environment()["VLLM_CPU_KVCACHE_SPACE"],
                           "control_dir": spec.control_dir, "api_key_required": bool(key)},
                "versions": manifest.host_versions(criu.version_str),
                "host": host_compat.host_facts(criu.version_str),
                "model_identity": model_id,
                "canary": {**canary.request(), "completion": recorded["text"],
                           "token_ids": recorded["token_ids"], "logprobs": recorded["logprobs"]},
                "tree": {"root_pid": proc.pid, "pids": pids, "anon_huge_kib": anon_huge_kib,
                         "listen_ports": listen_ports},
                "log": str(log_path),
                "external_files": [item.to_json() for item in saved],
                "images": sealed,
                "timings": timings,
            })
        gc.unregister_partial(tmp)
        registry.remove(proc.pid)
        remove_dir(Path(spec.control_dir))  # every restore re-creates it, empty
        return {"snapshot": str(out), "image_bytes": written["image_bytes"], "level": level,
                "endpoint": spec.endpoint, "api_key_required": bool(key),
                "timings": {**{k: round(v, 3) for k, v in timings.items()}, "total_s": round(progress.elapsed(), 3)}}
    except BaseException:
        manifest.discard(tmp)
        gc.unregister_partial(tmp)
        if proc is not None:
            server.stop_tree(proc.pid, pids or None, timeout=20)
            registry.remove(proc.pid)
            # A tree killed by CRIU (or SIGKILL) cannot clean its own /dev/shm objects. CRIU's
            # remap links are removed under the lock, above: outside it, a link_remap.N that
            # is new since the dump may be another tree's restore's (seen in a ladder run).
            external_files.remove(shm)
        raise
    finally:
        guard.release()
        if sweep is not None:
            sweep.join(timeout=30)


def _record_weights(model_dir: Path, tmp: Path, copy: bool) -> dict:
    """Reference the model's safetensors (or copy them into the snapshot), with sizes,
    checksums and the tensor table that restore checks the files against."""
    from . import weights

    if copy:
        # Re-written rather than copied byte for byte: dump_weights makes every layer group
        # contiguous, in the order the reader takes them, so the reload needs no copies.
        # (mmap reading: the tensors stay valid for as long as dump_weights holds them.)
        dest = tmp / manifest.WEIGHTS_DIR
        dest.mkdir(mode=0o700)
        record = weights.dump_weights(weights.iter_weights(model_dir, io="mmap"), dest)
        for path in dest.iterdir():
            os.chmod(path, 0o600)
        record["dir"] = manifest.WEIGHTS_DIR
        for item in record["files"]:
            item["path"] = f"{manifest.WEIGHTS_DIR}/{Path(item['path']).name}"
    else:
        record = weights.reference_weights(model_dir)
    plan = weights.plan_weights([f for f in manifest.weight_files(record, tmp) if f.endswith(".safetensors")])
    record["tensors"] = {e.name: [list(e.shape), e.dtype] for e in plan.entries}
    record["weight_bytes"] = plan.total_bytes
    return record

