"""The weights reader's device path: safetensors bytes -> pinned pieces -> device tensors.

Why a path of its own, apart from the CPU one in :mod:`fastvllm.weights`: on CPU the
reader yields *views* into its buffers, so a chunk must hold whole groups and every buffer
is as large as the largest group (the 3B embedding alone is 788 MB, so two buffers were
~1.6 GB of pinned memory, which ``pin_memory`` rounds up to 2 GiB). A device tensor owns its
bytes as soon as its copy is issued, so here each file is cut into fixed-size **pieces**
whatever the tensor boundaries: a tensor larger than a piece arrives through several, and
the pinned memory is ``buffers x chunk_bytes`` (128 MiB at the defaults) for any model.

The rotation, piece ``p`` living in buffer ``p % k``:

* the reader threads ``preadv`` the slices of ``p`` into the buffer, each first waiting
  (on the host) for the event recorded after the last copy out of the buffer's previous
  piece ``p - k``, so a buffer is never refilled while the copy engine may still read it,
  and the consumer never blocks on that wait itself;
* the consumer walks the tensors in file order: it allocates each tensor on the side
  stream, waits until the slices under each part are read, issues the parts' copies
  ``non_blocking`` on the side stream, records an event and makes its *own* current stream
  wait on it before the tensor is yielded. The tensor is marked used on the consumer's
  stream (``record_stream``), so the caching allocator does not hand its memory to a later
  side-stream allocation before the consumer's work on it has finished;
* right after the last copy out of piece ``p`` it records the buffer's event and hands
  ``p + k`` to the threads, before the tensor is even yielded.

Pinned buffers belong to the engine (one per device and process, see
:func:`fastvllm.weights.copy_engine_for`) and are reused by every later reload: pinning
memory costs page faults plus a driver call, and a reload runs on the restore's critical
path. An engine lends a set of buffers to one pass at a time; a second pass running at the
same time gets its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from . import weights
from .weights import ReadStats, TensorEntry, WeightPlan

# Each reader thread moves page cache -> pinned memory at about one core's memcpy speed
# (~5-10 GB/s), and a PCIe 5 x16 host-to-device link takes ~50 GB/s: two threads (the CPU
# default, tuned on a 2-core VM) could not keep the link busy. Not yet measured on a GPU:
# `python -m fastvllm.bench.weights_gpu` sweeps threads, chunk size and buffers.
DEFAULT_DEVICE_THREADS = max(1, min(8, os.cpu_count() or 1))
MIN_PIECE_BYTES = 4096  # a chunk_bytes of 1 would otherwise mean one read per byte


@dataclass(frozen=True)
class Piece:
    """``[offset, offset + nbytes)`` of ``file``, read into one pinned buffer as a unit."""

    file: Path
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def plan_pieces(plan: WeightPlan, piece_bytes: int) -> list[Piece]:
    """Cover every tensor's bytes with pieces of at most ``piece_bytes``, in file order.

    Tensors that touch (or are a few alignment bytes apart) form one span, cut every
    ``piece_bytes``; a larger gap starts a new span, so no gap is ever read."""
    piece_bytes = max(piece_bytes, MIN_PIECE_BYTES)
    pieces: list[Piece] = []
    spans: list[list] = []  # [file, start, end]
    for e in plan.entries:
        if e.nbytes == 0:
            continue
        if spans and spans[-1][0] == e.file and e.offset <= spans[-1][2] + weights.CHUNK_ALIGN:
            spans[-1][2] = max(spans[-1][2], e.offset + e.nbytes)
        else:
            spans.append([e.file, e.offset, e.offset + e.nbytes])
    for file, start, end in spans:
        for lo in range(start, end, piece_bytes):
            pieces.append(Piece(file, lo, min(piece_bytes, end - lo)))
    return pieces


@dataclass
class PinnedBuffer:
    """A page-locked host buffer and the event after which nothing reads it any more."""

    tensor: torch.Tensor  # uint8, pinned
    free_after: Any = None  # engine event; None: no copy out of it is pending

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()


class DeviceCopyEngine(Protocol):
    """What the device path needs from an accelerator (see :class:`CudaCopyEngine`).

    ``copy`` is asynchronous: it may read its source at any time until an event recorded
    after it has completed. ``publish`` makes the consumer's work wait for an event;
    ``wait`` blocks the calling (reader) thread until it has completed.
    """

    independent: bool  # True: yielded tensors never alias the pinned buffers

    def acquire(self, count: int, nbytes: int) -> tuple[list[PinnedBuffer], float]: ...
    def release(self, buffers: list[PinnedBuffer]) -> None: ...
    def empty(self, entry: TensorEntry) -> torch.Tensor: ...
    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None: ...
    def record(self) -> Any: ...
    def publish(self, event: Any) -> None: ...
    def wait(self, event: Any) -> None: ...


class CudaCopyEngine:
    """Pinned pieces copied to one CUDA device on a side stream, so the host-to-device copy
    of one piece overlaps the disk / page-cache reads of the next ones. Holds its pinned
    buffers between reloads (:meth:`free_pinned` gives them back)."""

    independent = True

    def __init__(self, device: str | torch.device):
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device(dev.type, torch.cuda.current_device())
        self.device = dev
        self.stream = torch.cuda.Stream(dev)
        self._free: list[PinnedBuffer] = []
        self._lock = threading.Lock()
        self.pinned_bytes = 0  # all pinned buffers this engine holds, lent or not

    def acquire(self, count: int, nbytes: int) -> tuple[list[PinnedBuffer], float]:
        """``count`` buffers of at least ``nbytes``: cached ones first (smallest that fit),
        new ones for the rest. Returns them and the seconds spent pinning new memory."""
        with self._lock:
            fitting = sorted((b for b in self._free if b.nbytes >= nbytes), key=lambda b: b.nbytes)[:count]
            for b in fitting:
                self._free.remove(b)
        t0 = time.perf_counter()
        while len(fitting) < count:
            fitting.append(PinnedBuffer(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)))
            with self._lock:
                self.pinned_bytes += nbytes
        return fitting, time.perf_counter() - t0

    def release(self, buffers: list[PinnedBuffer]) -> None:
        with self._lock:
            self._free.extend(buffers)

    def free_pinned(self) -> int:
        """Drop the idle pinned buffers (after their last copies) and return their bytes;
        torch's pinned-memory cache may keep the pages for its own next allocation."""
        with self._lock:
            idle, self._free = self._free, []
        for b in idle:
            if b.free_after is not None:
                b.free_after.synchronize()
        freed = sum(b.nbytes for b in idle)
        with self._lock:
            self.pinned_bytes -= freed
        return freed

    def empty(self, entry: TensorEntry) -> torch.Tensor:
        # Allocated on the side stream, where its copies are ordered after any earlier use
        # of that memory; used next on the consumer's stream: record_stream keeps the
        # allocator from reusing it until the consumer's work queued so far is done.
        with torch.cuda.stream(self.stream):
            out = torch.empty(entry.shape, dtype=entry.torch_dtype, device=self.device)
        out.record_stream(torch.cuda.current_stream(self.device))
        return out

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def record(self) -> torch.cuda.Event:
        # blocking=True: reader threads wait on these to reuse a buffer; a spinning wait
        # would take a core from the reads it is waiting to start.
        event = torch.cuda.Event(blocking=True)
        event.record(self.stream)
        return event

    def publish(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def wait(self, event: torch.cuda.Event) -> None:
        event.synchronize()  # releases the GIL while it waits


class _PinnedSource:
    """Piece ``p`` is read into buffer ``p % k``, after that buffer's pending copies."""

    def __init__(self, pieces: list[Piece], engine: DeviceCopyEngine, buffers: list[PinnedBuffer]):
        self.pieces, self.engine, self.buffers = pieces, engine, buffers
        self.views = [memoryview(b.tensor.numpy()) for b in buffers]
        self.after: dict[int, Any] = {p: b.free_after for p, b in enumerate(buffers) if b.free_after is not None}
        self.fds: dict[Path, int] = {}
        for path in dict.fromkeys(p.file for p in pieces):
            self.fds[path] = weights._open(path)

    def fill(self, p: int, lo: int, hi: int) -> None:
        event = self.after.get(p)
        if event is not None:
            self.engine.wait(event)
        piece = self.pieces[p]
        weights._read_into(self.fds[piece.file], self.views[p % len(self.views)][lo:hi], piece.offset + lo, piece.file)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def stream_to_device(plan: WeightPlan, threads: int, buffers: int, engine: DeviceCopyEngine,
                     stats: ReadStats | dict | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, device tensor)`` for every tensor of ``plan`` in file order (see the
    module docstring for the rotation). ``plan.chunk_bytes`` is the piece size."""
    st = stats if isinstance(stats, ReadStats) else ReadStats(threads=threads, chunk_bytes=plan.chunk_bytes,
                                                              buffers=buffers)
    st.extra["io"] = "pread"
    start = time.perf_counter()
    pieces = plan_pieces(plan, plan.chunk_bytes)
    k = min(buffers, len(pieces))
    lent: list[PinnedBuffer] = []
    source: _PinnedSource | None = None
    slices = None
    finished = 0  # pieces before this one have had all their copies issued
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastvllm-weights")

    def finish_through(p: int) -> None:
        """Pieces up to ``p`` are done with: record their buffers' event, start refills."""
        nonlocal finished
        while finished <= p:
            event = engine.record()
            lent[finished % k].free_after = event
            if finished + k < len(pieces):
                source.after[finished + k] = event
                slices.submit(finished + k)
            st.bytes_read += pieces[finished].nbytes
            st.chunks += 1
            finished += 1

    try:
        if k:
            lent, st.extra["pinned_alloc_s"] = engine.acquire(k, max(p.nbytes for p in pieces))
            st.extra["pinned_bytes"] = sum(b.nbytes for b in lent)
        source = _PinnedSource(pieces, engine, lent)
        slices = weights._Slices([p.nbytes for p in pieces], pool, source.fill, k)
        p = 0
        for e in plan.entries:
            out = engine.empty(e)
            raw = out.reshape(-1).view(torch.uint8) if e.nbytes else None
            pos, end = e.offset, e.offset + e.nbytes
            while pos < end:
                while not (pieces[p].file == e.file and pieces[p].offset <= pos < pieces[p].end):
                    p += 1
                piece = pieces[p]
                finish_through(p - 1)
                hi = min(end, piece.end)
                t0 = time.perf_counter()
                slices.wait_for(p, hi - piece.offset)
                st.wait_seconds += time.perf_counter() - t0
                buf = lent[p % k].tensor
                engine.copy(raw[pos - e.offset:hi - e.offset], buf[pos - piece.offset:hi - piece.offset])
                if hi == piece.end:
                    finish_through(p)
                pos = hi
            engine.publish(engine.record())
            st.tensors += 1
            yield e.name, out
            del out, raw
        finish_through(len(pieces) - 1)
    finally:
        weights.stop_reading(slices, pool, source)
        if lent:
            # Copies issued out of a piece that was not finished (the consumer stopped
            # early) have no buffer event yet: one event after everything issued covers all.
            # Without one (the device is gone, e.g. at interpreter exit) the buffers are
            # not safe to lend again and are dropped.
            try:
                last = engine.record()
            except Exception:
                last = None
            if last is not None:
                for b in lent:
                    b.free_after = last
                engine.release(lent)
        st.seconds = time.perf_counter() - start
        if isinstance(stats, dict):
            stats.update(st.as_dict(), io="pread", **{k_: v for k_, v in st.extra.items() if k_ != "io"})


__all__ = ["CudaCopyEngine", "DEFAULT_DEVICE_THREADS", "DeviceCopyEngine", "Piece", "PinnedBuffer",
           "plan_pieces", "stream_to_device"]
