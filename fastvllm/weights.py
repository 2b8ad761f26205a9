"""Model weights on disk: dump them to safetensors, check them, and stream them back fast.

A server is put to sleep (level 2, weights freed) before its CRIU dump, so the image
holds no weights; after restore the weights are streamed from safetensors files into
vLLM's in-place ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``.
That reload is on the critical path of every restore, so the reader here is built to
run at disk / page-cache speed:

* **Plan** (:func:`plan_weights`): parse the safetensors headers into tensor entries in
  file order and cut them into *chunks*: contiguous byte ranges of one file made of
  whole *groups* (``name.rsplit(".", 2)[0]``, e.g. all of ``model.layers.3.self_attn``).
* **Read** (:func:`iter_weights`): a thread pool works through the chunks ahead of
  the consumer, a tensor is yielded once its bytes are in. With ``io="pread"`` on CPU,
  ``buffers`` chunk buffers rotate: slices of the next chunks are ``preadv``-ed into
  them while the consumer walks the current one. Tensors are views into the buffers (no
  per-tensor allocation), so their lifetime is bounded; vLLM's layerwise reload keeps
  the tensors of a layer until the whole layer has arrived, which is why chunks never
  split a group. On CPU (``io="mmap"``, the default there) the files are mapped and the
  pool prefaults them; tensors are views of the mapping, which halves the memory
  traffic. On a GPU the files go through pinned fixed-size pieces and a side stream
  into fresh device tensors: :mod:`fastvllm.device_reader`.
* **Dump / reference / verify** (:func:`dump_weights`, :func:`reference_weights`,
  :func:`verify_weights`, :func:`check_against_model`): the files a snapshot depends
  on, with sizes and sha256, and checks that they still match.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import mmap
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from functools import cache
from typing import Any, Protocol

from fastvllm.errors import FastvllmError


class _LazyTorch:
    """torch, imported on first use. The restore command parses headers, sizes and
    checksums here without ever touching a tensor, and must not pay torch's ~0.6 s import
    on its critical path; the worker (which has torch loaded) uses the real module."""

    def __getattr__(self, name: str):
        import torch as real

        globals()["torch"] = real
        return getattr(real, name)


torch = _LazyTorch()

MiB, GiB = 1 << 20, 1 << 30

# Defaults from `experiments/bench_weights.py --sweep --repeats 5` (results in
# experiments/results/bench_weights-sweep-torch{1,2}.json): models/small (0.93 GB bf16,
# one shard), page cache warm, 2-core AMD EPYC VM, consumer copying each tensor into a
# preallocated destination, torch at 1 and at 2 intra-op threads. Both io modes have a
# plateau (run-to-run noise ~0.5-1 GB/s on this shared VM): mmap 10-11.8 GB/s for
# almost any setting; pread 7-9 GB/s for 2-8 threads with 16-64 MiB chunks and 2
# buffers, down to 3.5-5.3 with 1 thread or 256 MiB chunks x 3 buffers. 2 / 64 MiB / 2
# is in the top few of both modes at both torch settings (mmap 11.7 and 10.6 GB/s,
# pread 7.7 and 7.2 GB/s; the best worst-cases are 10.7 and 7.6). More threads only
# pay with more cores or a disk that wants more reads in flight (NVMe): pass threads=.
DEFAULT_THREADS = 2
DEFAULT_CHUNK_BYTES = 64 * MiB
DEFAULT_BUFFERS = 2

DEFAULT_SHARD_BYTES = 2 * GiB
SLICE_BYTES = 4 * MiB  # unit of one read/prefault, taken in file order; sweep: 1 MiB 10-30% slower, 16 MiB same within noise
MAX_IO_BYTES = 1 * GiB  # one preadv call; Linux returns at most ~2 GiB per call anyway
CHUNK_ALIGN = 64  # chunks start 64-byte aligned, so buffer offsets keep the file's alignment
HEADER_LIMIT = 100 * MiB  # same limit as the safetensors library: anything bigger is corrupt

# safetensors dtype names -> torch dtypes (only those this torch build has).
_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
# Bytes per element, by safetensors name: header checks need no torch.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
               "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


@cache
def _dtypes() -> dict[str, torch.dtype]:
    import torch as real

    return {k: getattr(real, v) for k, v in _DTYPE_NAMES.items() if hasattr(real, v)}


@cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {v: k for k, v in _dtypes().items()}


def __getattr__(name: str):
    """``weights.DTYPES`` / ``weights.DTYPE_NAMES``, built when first asked for."""
    if name == "DTYPES":
        return _dtypes()
    if name == "DTYPE_NAMES":
        return _dtype_names()
    raise AttributeError(name)


def group_of(name: str) -> str:
    """The unit vLLM's layerwise reload waits for: q/k/v of one attention block, etc."""
    return name.rsplit(".", 2)[0]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as stored on disk. ``offset`` is absolute in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    needs_copy: bool = False  # set by chunking: an earlier run of a group split across chunks
    chunk: int = -1

    @property
    def group(self) -> str:
        return group_of(self.name)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _dtypes()[self.dtype]

    @property
    def aligned(self) -> bool:
        """Whether a dtype view straight into the chunk buffer is possible."""
        return self.offset % DTYPE_SIZES[self.dtype] == 0


@dataclass(frozen=True)
class Chunk:
    """A contiguous byte range ``[offset, offset + nbytes)`` of one file, read as a unit."""

    file: Path
    offset: int
    nbytes: int
    entries: tuple[TensorEntry, ...]


@dataclass(frozen=True)
class WeightPlan:
    """Everything the reader needs, decided before a byte of tensor data is read."""

    files: tuple[Path, ...]
    entries: tuple[TensorEntry, ...]
    chunks: tuple[Chunk, ...]
    chunk_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def max_chunk_bytes(self) -> int:
        return max((c.nbytes for c in self.chunks), default=0)

    @property
    def copies(self) -> int:
        return sum(e.needs_copy for e in self.entries)

    def rechunk(self, chunk_bytes: int) -> WeightPlan:
        """The same tensors cut into chunks of a different size (headers are not re-read)."""
        return _make_plan(self.files, [replace(e, needs_copy=False, chunk=-1) for e in self.entries], chunk_bytes)


def resolve_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files behind ``source`` (a model dir, an index json, one or more shards),
    in load order, plus the index's weight map if there is one."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                return _files_from_index(index)
            if (path / "model.safetensors").is_file():
                return [path / "model.safetensors"], None
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise FastvllmError(f"no safetensors weights in {path}",
                                    fix="point at a directory with model.safetensors or model.safetensors.index.json")
            return found, None
        if path.name.endswith(".json") and path.is_file():
            return _files_from_index(path)
        return [path], None
    return [Path(p) for p in source], None


def _files_from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """HF sharded layout: shard names from ``weight_map``, sorted (they are numbered)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FastvllmError(f"weights index {index} is unreadable or corrupt ({_one_line(err)})") from None
    files = sorted(set(weight_map.values()))
    return [index.parent / f for f in files], weight_map


def read_header(path: Path) -> tuple[list[TensorEntry], int]:
    """Parse one safetensors header (8-byte little-endian length + JSON) into entries
    with absolute offsets, checking every tensor's bytes are inside the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FastvllmError(f"weights file {path} is truncated ({size} bytes, no safetensors header)",
                                    fix=_REFETCH)
            n = int.from_bytes(head, "little")
            if n > HEADER_LIMIT:
                raise FastvllmError(f"weights file {path} has a corrupt safetensors header (length {n})", fix=_REFETCH)
            if 8 + n > size:
                raise FastvllmError(f"weights file {path} is truncated: header needs {8 + n} bytes, file has {size}",
                                    fix=_REFETCH)
            raw = f.read(n)
    except FileNotFoundError:
        raise FastvllmError(f"weights file {path} is missing", fix=_REFETCH) from None
    except IsADirectoryError:
        raise FastvllmError(f"weights file {path} is a directory") from None
    except PermissionError:
        raise FastvllmError(f"weights file {path} is not readable (permission denied)") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries = [_entry(path, name, info, 8 + n) for name, info in header.items() if name != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        raise FastvllmError(f"weights file {path} has a corrupt safetensors header ({_one_line(err)})",
                            fix=_REFETCH) from None
    for e in entries:
        if e.offset + e.nbytes > size:
            raise FastvllmError(f"weights file {path} is truncated: tensor {e.name} ends at byte "
                                f"{e.offset + e.nbytes}, file has {size}", fix=_REFETCH)
    entries.sort(key=lambda e: e.offset)
    return entries, size


_REFETCH = "re-dump the weights or point at the original model directory"


def _entry(path: Path, name: str, info: dict, data_start: int) -> TensorEntry:
    """One header record, validated: known dtype, sane shape, size consistent with it."""
    dtype = info["dtype"]
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name}: unsupported dtype {dtype!r}")
    shape = tuple(int(d) for d in info["shape"])
    begin, end = (int(x) for x in info["data_offsets"])
    numel = math.prod(shape)
    if min(shape, default=0) < 0 or begin < 0 or end - begin != numel * DTYPE_SIZES[dtype]:
        raise ValueError(f"tensor {name}: shape {list(shape)} and data_offsets {[begin, end]} disagree")
    return TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def plan_weights(source: str | os.PathLike | Sequence[str | os.PathLike], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> WeightPlan:
    """Read the headers of ``source`` and cut its tensors into chunks of whole groups."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    files, weight_map = resolve_files(source)
    entries: list[TensorEntry] = []
    for path in files:
        file_entries, _ = read_header(path)
        entries += file_entries
    if weight_map is not None:
        where = {e.name: e.file.name for e in entries}
        for name, fname in weight_map.items():
            if where.get(name) != fname:
                raise FastvllmError(f"weights index in {files[0].parent} lists {name} in {fname}, "
                                    f"but that file does not contain it", fix=_REFETCH)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FastvllmError(f"tensor {dup} appears in more than one weights file under {files[0].parent}")
    return _make_plan(tuple(files), entries, chunk_bytes)


def _runs(entries: list[TensorEntry]) -> list[list[TensorEntry]]:
    """Maximal stretches of consecutive entries of one file and one group."""
    runs: list[list[TensorEntry]] = []
    for e in entries:
        if runs and runs[-1][-1].file == e.file and runs[-1][-1].group == e.group:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _make_plan(files: tuple[Path, ...], entries: list[TensorEntry], chunk_bytes: int) -> WeightPlan:
    """Pack runs into chunks (in file order, up to ``chunk_bytes``; a bigger run gets its
    own chunk), then mark ``needs_copy`` on tensors whose group continues in a later
    chunk: their buffer may be refilled before that group is complete."""
    order = {f: i for i, f in enumerate(files)}
    entries = sorted(entries, key=lambda e: (order[e.file], e.offset))
    chunk_runs: list[list[list[TensorEntry]]] = []
    for run in _runs(entries):
        cur = chunk_runs[-1] if chunk_runs else None
        if cur and cur[-1][-1].file == run[0].file and _span(cur[0][0], run[-1]) <= chunk_bytes:
            cur.append(run)
        else:
            chunk_runs.append([run])
    last_chunk: dict[str, int] = {}
    for ci, runs in enumerate(chunk_runs):
        for run in runs:
            last_chunk[run[0].group] = ci
    chunks, out = [], []
    for ci, runs in enumerate(chunk_runs):
        members = tuple(replace(e, chunk=ci, needs_copy=last_chunk[e.group] > ci) for run in runs for e in run)
        start = members[0].offset - members[0].offset % CHUNK_ALIGN
        end = max(e.offset + e.nbytes for e in members)
        chunks.append(Chunk(members[0].file, start, end - start, members))
        out += members
    return WeightPlan(files, tuple(out), tuple(chunks), chunk_bytes)


def _span(first: TensorEntry, last: TensorEntry) -> int:
    return last.offset + last.nbytes - first.offset


# --------------------------------------------------------------------------- copy engines


class CopyEngine(Protocol):
    """The CPU path's hooks: where tensors go after they are read, and how the reader knows
    a buffer is free (the device path has its own: :class:`fastvllm.device_reader.DeviceCopyEngine`).

    Per tensor the reader calls ``copy``, then ``record``, then ``publish`` with that
    event, then yields. Before a chunk's buffer is refilled it calls ``wait`` with the
    event of the chunk's last tensor (events complete in order).
    """

    independent: bool  # False: tensors may be views into the chunk buffers

    def alloc(self, nbytes: int) -> torch.Tensor: ...
    def copy(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def record(self) -> Any: ...
    def publish(self, event: Any) -> None: ...
    def wait(self, event: Any) -> None: ...


class CpuCopyEngine:
    """Tensors stay in the (pageable) chunk buffers; nothing is asynchronous."""

    independent = False

    def alloc(self, nbytes: int) -> torch.Tensor:
        """Anonymous memory asking for transparent huge pages: first touch of 2 x 60 MiB
        takes ~10 ms instead of ~47 ms with 4 KiB pages (THP in "madvise" mode here),
        a quarter of a warm-cache reload of a 1 GB model."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mem.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(mem, dtype=torch.uint8)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def record(self) -> None:
        return None

    def publish(self, event: None) -> None:
        pass

    def wait(self, event: None) -> None:
        pass


_device_engines: dict = {}
_device_engines_lock = threading.Lock()


def copy_engine_for(device: str | torch.device):
    """The engine for ``device``: a fresh CPU engine, or the process's one engine per CUDA
    device, which keeps its side stream and pinned buffers from one reload to the next."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return CpuCopyEngine()
    if dev.type == "cuda":
        from .device_reader import CudaCopyEngine

        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        with _device_engines_lock:
            if dev not in _device_engines:
                _device_engines[dev] = CudaCopyEngine(dev)
            return _device_engines[dev]
    raise ValueError(f"unsupported device for weight streaming: {dev}")


# --------------------------------------------------------------------------- reader


@dataclass
class ReadStats:
    """What one pass of :func:`iter_weights` did. ``wait_seconds``: time the consumer
    spent blocked on reads (0 means the reader kept ahead)."""

    bytes_read: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    chunks: int = 0
    tensors: int = 0
    copies: int = 0
    threads: int = 0
    chunk_bytes: int = 0
    buffers: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "extra"}, "gb_per_s": round(self.gb_per_s, 3)}


def iter_weights(source: WeightPlan | str | os.PathLike | Sequence[str | os.PathLike], *,
                 threads: int | None = None, chunk_bytes: int | None = None,
                 buffers: int = DEFAULT_BUFFERS, device: str | torch.device = "cpu",
                 stats: ReadStats | dict | None = None, io: str = "auto",
                 engine: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of ``source``, in file order.

    The plan is made (headers parsed, files checked) at call time, so a missing or
    corrupt file raises :class:`FastvllmError` here; reading starts at the first ``next``.
    Chunks are processed in slices of ``SLICE_BYTES`` by ``threads`` threads, up to
    ``buffers - 1`` chunks ahead of the one the consumer is in; a tensor is yielded as
    soon as the slices under it are done, not when its whole chunk is.

    ``io="pread"`` (CUDA's default): chunk ``c`` is ``preadv``-ed into buffer
    ``c % buffers``. Lifetime contract on CPU: a yielded tensor is a view into that
    buffer and stays valid until the consumer asks for the tensor that follows the last
    tensor of its chunk (that request releases the buffer for refilling), i.e. while the
    consumer receives every other tensor of its chunk. Chunks hold whole groups
    (``name.rsplit(".", 2)[0]``), so when a group's last tensor arrives, all of the
    group's tensors are still valid; the parts of a group that is not contiguous in the
    file and lie in an earlier chunk are yielded as clones (``needs_copy``). Anything
    kept longer than its group must be cloned by the consumer.

    On CUDA (always ``pread``): yielded tensors are fresh device tensors, owned by the
    consumer; the files go through ``buffers`` pinned pieces of ``chunk_bytes`` (tensor
    boundaries do not matter there) and a side stream, and the consumer's current stream
    waits for each tensor's copies before it is yielded (:mod:`fastvllm.device_reader`).
    ``threads`` defaults to ``DEFAULT_THREADS`` on CPU and to
    ``device_reader.DEFAULT_DEVICE_THREADS`` on a device.

    ``io="mmap"`` (CPU's default): files are mapped privately and the threads prefault
    the slices (``MADV_POPULATE_READ``); tensors are views of the mapping, valid for as
    long as they are referenced (writes to them stay private). Half the memory traffic
    of ``pread``, so about twice as fast from a warm page cache. Caveat: a file
    truncated *while* it is being read gives SIGBUS instead of an error.

    Iterate to the end or ``close()`` the iterator: that stops and joins the threads.
    """
    if io not in ("auto", "mmap", "pread"):
        raise ValueError(f"io must be auto, mmap or pread, not {io!r}")
    engine = engine or copy_engine_for(device)
    if engine.independent:
        from . import device_reader

        threads = device_reader.DEFAULT_DEVICE_THREADS if threads is None else threads
        if io == "mmap":
            raise ValueError("io='mmap' is CPU only: a device copy needs pinned buffers (io='pread')")
        io = "pread"
    else:
        threads = DEFAULT_THREADS if threads is None else threads
    if threads < 1 or buffers < 2:
        raise ValueError("need threads >= 1 and buffers >= 2")
    if io == "auto":  # a custom in-memory engine (tests) allocates the buffers: pread
        io = "mmap" if isinstance(engine, CpuCopyEngine) else "pread"
    if isinstance(source, WeightPlan):
        plan = source if chunk_bytes in (None, source.chunk_bytes) else source.rechunk(chunk_bytes)
    else:
        plan = plan_weights(source, chunk_bytes or DEFAULT_CHUNK_BYTES)
    if isinstance(stats, ReadStats):
        stats.threads, stats.chunk_bytes, stats.buffers = threads, plan.chunk_bytes, buffers
    if engine.independent:
        return device_reader.stream_to_device(plan, threads, buffers, engine, stats)
    return _stream(plan, threads, buffers, engine, io, stats)


class _Slices:
    """The I/O of one pass: every chunk (of ``sizes`` bytes each) cut into slices of
    ``SLICE_BYTES``, handed to ``fill(chunk, lo, hi)`` on the pool a chunk at a time (when
    the chunk's buffer is free), and waited for in file order."""

    def __init__(self, sizes: Sequence[int], pool: ThreadPoolExecutor, fill, ahead: int):
        self.sizes, self.pool, self.fill = list(sizes), pool, fill
        self.first: list[int] = []  # global index of each chunk's first slice
        count = 0
        for size in self.sizes:
            self.first.append(count)
            count += -(-size // SLICE_BYTES)
        self.futures: dict[int, Future] = {}
        self.done = 0  # slices before this one are known to be complete
        for c in range(min(ahead, len(self.sizes))):
            self.submit(c)

    def submit(self, c: int) -> None:
        for i, lo in enumerate(range(0, self.sizes[c], SLICE_BYTES)):
            hi = min(lo + SLICE_BYTES, self.sizes[c])
            self.futures[self.first[c] + i] = self.pool.submit(self.fill, c, lo, hi)

    def wait_for(self, c: int, hi: int) -> None:
        """Block until the first ``hi`` bytes of chunk ``c`` (and all before) are done."""
        last = self.first[c] + (hi - 1) // SLICE_BYTES if hi > 0 else self.first[c] - 1
        while self.done <= last:
            self.futures.pop(self.done).result()
            self.done += 1

    def cancel(self) -> None:
        for fut in self.futures.values():
            fut.cancel()


class _BufferSource:
    """``io="pread"``: chunk ``c`` is read with ``preadv`` into buffer ``c % k``; tensors
    are views into the buffers, so they are recycled (see the lifetime contract)."""

    recycles = True

    def __init__(self, plan: WeightPlan, engine: CopyEngine, k: int):
        self.plan, self.fds = plan, {}
        self.bufs = [engine.alloc(plan.max_chunk_bytes) for _ in range(k)]
        self.views = [memoryview(b.numpy()) for b in self.bufs]
        for path in plan.files:
            self.fds[path] = _open(path)

    def fill(self, c: int, lo: int, hi: int) -> None:
        chunk = self.plan.chunks[c]
        _read_into(self.fds[chunk.file], self.views[c % len(self.views)][lo:hi], chunk.offset + lo, chunk.file)

    def raw(self, c: int, e: TensorEntry) -> torch.Tensor:
        lo = e.offset - self.plan.chunks[c].offset
        return self.bufs[c % len(self.bufs)][lo:lo + e.nbytes]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


class _MappedSource:
    """``io="mmap"``: each file is mapped (private, so writes never reach it) and slices
    are prefaulted by the pool with ``MADV_POPULATE_READ``, which reads them from disk
    if needed and maps them, so the consumer's copy takes no page faults. Tensors are
    views of the mapping and stay valid for as long as they are referenced.

    Why: with a copying consumer this moves each byte once (page cache -> destination)
    instead of twice (page cache -> buffer -> destination): ~12 GB/s vs ~6-7 GB/s warm
    on the 2-core benchmark VM, and as fast as the buffers cold.
    """

    recycles = False

    def __init__(self, plan: WeightPlan):
        self.plan, self.maps, self.base = plan, {}, {}
        need: dict[Path, int] = {}
        for e in plan.entries:
            need[e.file] = max(need.get(e.file, 0), e.offset + e.nbytes)
        for path in plan.files:
            fd = _open(path)
            try:
                size = os.fstat(fd).st_size
                if size < need.get(path, 0):
                    raise FastvllmError(f"weights file {path} is truncated: {size} bytes, tensors need "
                                        f"{need[path]}", fix=_REFETCH)
                if size:
                    self.maps[path] = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    self.base[path] = torch.frombuffer(self.maps[path], dtype=torch.uint8)
            finally:
                os.close(fd)

    def fill(self, c: int, lo: int, hi: int) -> None:
        chunk = self.plan.chunks[c]
        start = chunk.offset + lo
        start -= start % mmap.PAGESIZE
        _populate(self.base[chunk.file].data_ptr() + start, chunk.offset + hi - start, chunk.file, start)

    def raw(self, c: int, e: TensorEntry) -> torch.Tensor:
        return self.base[e.file][e.offset:e.offset + e.nbytes]

    def close(self) -> None:
        self.base.clear()  # the mappings live on in the tensors handed out, and close with them
        self.maps.clear()


_MADV_POPULATE_READ = 22  # Linux >= 5.14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _populate(addr: int, length: int, path: Path, offset: int) -> None:
    """Fault a mapped range in, through ctypes: ``mmap.madvise`` holds the GIL for the
    whole call, which would stall the consumer during disk reads."""
    if _libc.madvise(addr, length, _MADV_POPULATE_READ) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # older kernel: ask for readahead instead, the consumer faults
        _libc.madvise(addr, length, mmap.MADV_WILLNEED)
        return
    raise FastvllmError(f"weights file {path} could not be read at offset {offset} "
                        f"({'truncated' if err == errno.EFAULT else os.strerror(err)})", fix=_REFETCH)


def _stream(plan: WeightPlan, threads: int, buffers: int, engine: CopyEngine, io: str,
            stats: ReadStats | dict | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The rotation: chunk c's slices go to the pool only once chunk c - k is released,
    i.e. once the consumer asked for the tensor following chunk c - k's last one and
    the engine's event for that tensor has completed."""
    st = stats if isinstance(stats, ReadStats) else ReadStats(threads=threads, chunk_bytes=plan.chunk_bytes,
                                                              buffers=buffers)
    st.extra["io"] = io
    start = time.perf_counter()
    k = min(buffers, len(plan.chunks))
    source: _BufferSource | _MappedSource | None = None
    slices = None
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastvllm-weights")
    try:
        source = _MappedSource(plan) if io == "mmap" else _BufferSource(plan, engine, k)
        slices = _Slices([c.nbytes for c in plan.chunks], pool, source.fill, k)
        for c, chunk in enumerate(plan.chunks):
            for e in chunk.entries:
                t0 = time.perf_counter()
                slices.wait_for(c, e.offset + e.nbytes - chunk.offset)
                st.wait_seconds += time.perf_counter() - t0
                owned = e.needs_copy and source.recycles and not engine.independent
                tensor = engine.copy(_as_tensor(source.raw(c, e), e, owned, st))
                event = engine.record()
                engine.publish(event)
                st.tensors += 1
                yield e.name, tensor
                del tensor
            st.bytes_read += chunk.nbytes
            st.chunks += 1
            # The consumer has asked for the next tensor: chunk c is done with, and its
            # last event orders after all of its copies (one stream).
            engine.wait(event)
            if c + k < len(plan.chunks):
                slices.submit(c + k)
    finally:
        stop_reading(slices, pool, source)
        st.seconds = time.perf_counter() - start
        if isinstance(stats, dict):
            stats.update(st.as_dict(), io=io)


def stop_reading(slices, pool, source) -> None:
    """What every reader's ``finally`` does: cancel the slice reads not yet started, wait
    for the pool's running ones (they write into buffers about to be reused), then close
    the file."""
    if slices is not None:
        slices.cancel()
    pool.shutdown(wait=True, cancel_futures=True)
    if source is not None:
        source.close()


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FastvllmError(f"weights file {path} is missing", fix=_REFETCH) from None
    except OSError as err:
        raise FastvllmError(f"weights file {path} cannot be opened ({_one_line(err)})") from None
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    return fd


def _read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset``, looping over short reads."""
    done, want = 0, len(view)
    while done < want:
        got = os.preadv(fd, [view[done:min(want, done + MAX_IO_BYTES)]], offset + done)
        if got == 0:
            raise FastvllmError(f"weights file {path} is truncated: expected {want - done} more bytes at "
                                f"offset {offset + done}", fix=_REFETCH)
        done += got


def _as_tensor(raw: torch.Tensor, e: TensorEntry, owned: bool, st: ReadStats) -> torch.Tensor:
    """``raw`` (the tensor's bytes) as a tensor of its dtype and shape: a view, or a copy
    when it must outlive a recycled buffer (``owned``) or is misaligned for its dtype."""
    if owned or not e.aligned:
        t = torch.empty(e.shape, dtype=e.torch_dtype)
        t.reshape(-1).view(torch.uint8).copy_(raw)
        st.copies += 1
        return t
    return raw.view(e.torch_dtype).reshape(e.shape)


# --------------------------------------------------------------------------- dump / manifest


def dump_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write tensors as HF-style sharded safetensors plus ``model.safetensors.index.json``.

    Tensors are reordered so each group is contiguous (groups in first-seen order),
    and a group never spans two shards, so the reader needs no copies. Not
    ``safetensors.torch.save_file``: it sorts tensors by dtype then name, which splits
    groups (``model.layers.3.input_layernorm`` lands between ``mlp`` and ``self_attn``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("model*.safetensors*")):
        raise FastvllmError(f"{out_dir} already contains weights", fix="dump into an empty directory")
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name} given twice")
        if tensor.dtype not in _dtype_names():
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        seen.add(name)
        groups.setdefault(group_of(name), []).append((name, tensor))
    shards = _pack_shards([sorted(g, key=lambda nt: -nt[1].element_size()) for g in groups.values()], shard_bytes)
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        files.append(_write_safetensors(path, shard))
        for name, t in shard:
            weight_map[name] = path.name
            total += t.numel() * t.element_size()
    index = out_dir / "model.safetensors.index.json"
    _atomic_write(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode())
    files.append(_file_record(index))
    return {"mode": "copied", "dir": str(out_dir.resolve()), "total_size": total, "files": files}


def _pack_shards(groups: list[list[tuple[str, torch.Tensor]]], shard_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Whole groups, in order, up to ``shard_bytes`` per shard (a bigger group alone)."""
    shards: list[list[tuple[str, torch.Tensor]]] = []
    size = 0
    for g in groups:
        g_bytes = sum(t.numel() * t.element_size() for _, t in g)
        if not shards or (size + g_bytes > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1] += g
        size += g_bytes
    return shards or [[]]


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> dict:
    """The safetensors format, in the given tensor order; returns the file's record."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _dtype_names()[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    sha = hashlib.sha256()
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        for block in [len(raw).to_bytes(8, "little"), raw]:
            f.write(block)
            sha.update(block)
        for _, t in tensors:
            data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            sha.update(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": sha.hexdigest()}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _file_record(path: Path) -> dict:
    return {"path": str(Path(path).resolve()), "size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path, block: int = 16 * MiB) -> str:
    sha = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()


def reference_weights(model_dir: Path) -> dict:
    """The manifest of a model dir's own safetensors (and index), instead of a copy."""
    model_dir = Path(model_dir)
    plan = plan_weights(model_dir)
    paths = list(plan.files)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        paths.append(index)
    return {"mode": "referenced", "dir": str(model_dir.resolve()), "total_size": plan.total_bytes,
            "files": [_file_record(p) for p in paths]}


def verify_weights(manifest: dict, *, check_sha: bool = False) -> None:
    """Raise if a file of ``manifest`` is missing, has another size, or (``check_sha``)
    other contents than when the manifest was made."""
    for rec in manifest["files"]:
        path = Path(rec["path"])
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FastvllmError(f"weights file {path} is missing", fix=_REFETCH) from None
        if size != rec["size"]:
            raise FastvllmError(f"weights file {path} has changed: {size} bytes, expected {rec['size']}", fix=_REFETCH)
        if check_sha and rec.get("sha256") and sha256_file(path) != rec["sha256"]:
            raise FastvllmError(f"weights file {path} has changed: sha256 differs", fix=_REFETCH)


def check_against_model(plan: WeightPlan, expected: dict[str, tuple[Sequence[int], torch.dtype | str]], *,
                        allow_extra: bool = True) -> None:
    """Raise on the first tensor the model expects that the plan lacks or has with
    another shape or dtype (and, unless ``allow_extra``, on tensors it does not expect)."""
    have = {e.name: e for e in plan.entries}
    for name, (shape, dtype) in expected.items():
        e = have.get(name)
        # Compared by safetensors name (torch-free); a torch.dtype is turned into its name.
        want_dtype = dtype if isinstance(dtype, str) else _dtype_names().get(dtype, str(dtype))
        if e is None:
            raise FastvllmError(f"weights do not match the model: tensor {name} is missing")
        if tuple(e.shape) != tuple(shape):
            raise FastvllmError(f"weights do not match the model: {name} has shape {list(e.shape)}, "
                                f"model expects {list(shape)}")
        if e.dtype != want_dtype:
            raise FastvllmError(f"weights do not match the model: {name} is {e.dtype}, model expects {want_dtype}")
    if not allow_extra:
        extra = next((n for n in have if n not in expected), None)
        if extra is not None:
            raise FastvllmError(f"weights do not match the model: unexpected tensor {extra}")
