"""The device path's rotation, on CPU: pieces cover every byte once, a pinned buffer is
refilled only after the copies out of it have run, a tensor is handed over only after its
own copies, pinned memory stays at ``buffers x chunk_bytes`` and is reused by later passes.

The copy engine here is a fake of the asynchrony only (the logic under test is the
reader's): it queues every copy and runs it as *late* as a real copy engine may, when an
event recorded after it is waited on or published. A buffer refilled too early, or a
tensor yielded before its copies were published, therefore shows up as wrong bytes.
The same properties on a real GPU: tests/gpu/test_weights_cuda.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvllm import device_reader, weights
from fastvllm.device_reader import PinnedBuffer, plan_pieces
from fastvllm.errors import FastvllmError
from fastvllm.weights import ReadStats, iter_weights, plan_weights
from tests.safetensors_files import write_ordered

POISON = 0xA5


class DeferredEngine:
    """Copies run only when an event after them completes (see the module docstring)."""

    independent = True

    def __init__(self):
        self.lock = threading.RLock()
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.events = 0
        self.free: list[PinnedBuffer] = []
        self.allocated = 0
        self.waited: list[int] = []

    def acquire(self, count, nbytes):
        with self.lock:
            got = sorted((b for b in self.free if b.nbytes >= nbytes), key=lambda b: b.nbytes)[:count]
            for b in got:
                self.free.remove(b)
            while len(got) < count:
                got.append(PinnedBuffer(torch.empty(nbytes, dtype=torch.uint8)))
                self.allocated += 1
        return got, 0.0

    def release(self, buffers):
        with self.lock:
            self.free.extend(buffers)

    def empty(self, entry):
        out = torch.empty(entry.shape, dtype=entry.torch_dtype)
        if out.numel():
            out.reshape(-1).view(torch.uint8).fill_(POISON)
        return out

    def copy(self, dst, src):
        with self.lock:
            self.pending.append((self.events, dst, src))  # completes with the next recorded event

    def record(self):
        with self.lock:
            self.events += 1
            return self.events - 1

    def _complete(self, event):
        with self.lock:
            due = [p for p in self.pending if p[0] <= event]
            self.pending = [p for p in self.pending if p[0] > event]
            for _, dst, src in due:
                dst.copy_(src)

    def publish(self, event):
        self._complete(event)

    def wait(self, event):
        with self.lock:
            self.waited.append(event)
        self._complete(event)


def mixed(seed: int = 0, small: int = 150) -> list[tuple[str, torch.Tensor]]:
    """Many small tensors of odd sizes (pieces end mid-tensor everywhere), a few larger
    than several pieces, every dtype width, a 0-d and an empty tensor; random bytes."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int8, torch.int64, torch.bool, torch.float8_e4m3fn]
    items = [("model.embed_tokens.weight", torch.randn(97, 130, generator=g).to(torch.bfloat16))]
    for i in range(small):
        n = int(torch.randint(1, 700, (1,), generator=g))
        dt = dtypes[i % len(dtypes)]
        t = (torch.rand(n, generator=g) > 0.5) if dt == torch.bool else torch.randn(n, generator=g).mul(50).to(dt)
        items.append((f"model.layers.{i // 10}.part{i % 10}.weight", t))
    items += [("model.layers.99.mlp.down_proj.weight", torch.randn(61, 333, generator=g).to(torch.float32)),
              ("model.scalar", torch.tensor(3.5)), ("model.empty", torch.empty(0, 4)),
              ("lm_head.weight", torch.randn(129, 77, generator=g).to(torch.bfloat16))]
    return items


@pytest.fixture
def shard(tmp_path) -> Path:
    return write_ordered(tmp_path / "model.safetensors", mixed())


@pytest.fixture
def small_slices(monkeypatch):
    """Slices smaller than the pieces: each piece is read by several threads at once."""
    monkeypatch.setattr(weights, "SLICE_BYTES", 1000)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(got: list[tuple[str, torch.Tensor]], path: Path) -> None:
    ref = load_file(path)
    assert [n for n, _ in got] == [e.name for e in plan_weights(path).entries]  # file order
    for name, t in got:
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape, name
        assert torch.equal(as_bytes(t), as_bytes(ref[name])), name


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("piece_bytes", [1, 4096, 5000, 1 << 20])
def test_pieces_cover_every_tensor_byte_once_and_nothing_else(shard, piece_bytes):
    plan = plan_weights(shard)
    pieces = plan_pieces(plan, piece_bytes)
    size = max(piece_bytes, device_reader.MIN_PIECE_BYTES)
    assert all(0 < p.nbytes <= size for p in pieces)
    assert all(a.end <= b.offset for a, b in zip(pieces, pieces[1:]))  # ordered, disjoint
    covered = sum(p.nbytes for p in pieces)
    tensors = [e for e in plan.entries if e.nbytes]
    assert covered == tensors[-1].offset + tensors[-1].nbytes - tensors[0].offset  # contiguous file: no gap
    for e in tensors:
        assert any(p.offset <= e.offset < p.end for p in pieces) and any(p.offset < e.offset + e.nbytes <= p.end for p in pieces)


def test_pieces_skip_a_large_gap_and_split_per_file(tmp_path):
    a = write_ordered(tmp_path / "a.safetensors", [("x.a", torch.ones(3000)), ("x.b", torch.ones(10))])
    b = write_ordered(tmp_path / "b.safetensors", [("y.a", torch.ones(10))])
    plan = plan_weights([a, b])
    gappy = weights.replace(plan.entries[1], offset=plan.entries[1].offset + 100_000)
    pieces = plan_pieces(weights.WeightPlan(plan.files, (plan.entries[0], gappy, plan.entries[2]), (), 4096), 4096)
    assert [(p.file.name, p.nbytes) for p in pieces] == [("a.safetensors", 4096), ("a.safetensors", 4096),
                                                          ("a.safetensors", 12000 - 8192), ("a.safetensors", 40),
                                                          ("b.safetensors", 40)]


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("chunk_bytes", [4096, 5000, 1 << 20])
@pytest.mark.parametrize("buffers", [2, 3])
def test_deferred_copies_deliver_exact_bytes(shard, small_slices, threads, chunk_bytes, buffers):
    engine = DeferredEngine()
    stats = ReadStats()
    got = list(iter_weights(shard, threads=threads, chunk_bytes=chunk_bytes, buffers=buffers, engine=engine,
                            stats=stats))
    assert_identical(got, shard)
    pieces = plan_pieces(plan_weights(shard), chunk_bytes)
    k = min(buffers, len(pieces))
    assert stats.chunks == len(pieces) and stats.bytes_read == sum(p.nbytes for p in pieces)
    assert stats.copies == 0 and stats.extra["io"] == "pread"
    # Every refill waited for the event after the buffer's previous piece, no other.
    assert sorted(set(engine.waited)) == sorted(set(engine.waited))[:len(pieces) - k] and len(set(engine.waited)) == len(pieces) - k
    assert engine.allocated == k and len(engine.free) == k and not engine.pending


def test_pinned_memory_is_buffers_times_chunk_even_for_a_bigger_tensor(tmp_path, small_slices):
    path = write_ordered(tmp_path / "m.safetensors", [("big.w", torch.randn(50_000)), ("small.w", torch.randn(7))])
    engine, stats = DeferredEngine(), ReadStats()
    got = list(iter_weights(path, chunk_bytes=8192, buffers=3, engine=engine, stats=stats))
    assert_identical(got, path)
    assert stats.extra["pinned_bytes"] == 3 * 8192 and all(b.nbytes == 8192 for b in engine.free)


def test_buffers_are_reused_by_the_next_pass_and_wait_for_its_copies(shard, small_slices):
    engine = DeferredEngine()
    assert_identical(list(iter_weights(shard, chunk_bytes=4096, buffers=2, engine=engine)), shard)
    events_after_first = engine.events
    assert_identical(list(iter_weights(shard, chunk_bytes=4096, buffers=2, engine=engine)), shard)
    assert engine.allocated == 2
    assert events_after_first - 1 in engine.waited  # the second pass's first fills waited for the first's last event


def test_interleaved_passes_get_their_own_buffers(shard, small_slices):
    engine = DeferredEngine()
    a = iter_weights(shard, chunk_bytes=4096, buffers=2, engine=engine)
    b = iter_weights(shard, chunk_bytes=4096, buffers=2, engine=engine, threads=1)
    got_a, got_b = [], []
    for x, y in zip(a, b):
        got_a.append(x)
        got_b.append(y)
    assert_identical(got_a, shard)
    assert_identical(got_b, shard)
    assert engine.allocated == 4


def test_closed_early_then_a_full_pass(shard, small_slices):
    engine = DeferredEngine()
    it = iter_weights(shard, chunk_bytes=4096, buffers=2, engine=engine)
    for _ in range(40):
        next(it)
    it.close()
    assert len(engine.free) == 2 and not [t for t in threading.enumerate() if t.name.startswith("fastvllm-weights")]
    assert_identical(list(iter_weights(shard, chunk_bytes=4096, buffers=2, engine=engine)), shard)
    assert engine.allocated == 2


def test_truncated_while_reading_names_the_file_and_releases_buffers(shard, small_slices):
    plan = plan_weights(shard)
    with open(shard, "r+b") as f:
        f.truncate(plan.entries[len(plan.entries) // 2].offset)
    engine = DeferredEngine()
    with pytest.raises(FastvllmError, match="truncated") as err:
        list(iter_weights(plan, chunk_bytes=4096, engine=engine))
    assert str(shard) in str(err.value) and len(engine.free) == 2


def test_device_path_defaults_and_arguments(shard):
    stats = ReadStats()
    list(iter_weights(shard, engine=DeferredEngine(), stats=stats))
    assert stats.threads == device_reader.DEFAULT_DEVICE_THREADS and stats.buffers == weights.DEFAULT_BUFFERS
    assert stats.extra["pinned_bytes"] <= weights.DEFAULT_BUFFERS * weights.DEFAULT_CHUNK_BYTES
    with pytest.raises(ValueError, match="CPU only"):
        iter_weights(shard, engine=DeferredEngine(), io="mmap")
    with pytest.raises(ValueError):
        iter_weights(shard, engine=DeferredEngine(), buffers=1)
    d: dict = {}
    list(iter_weights(shard, engine=DeferredEngine(), stats=d))
    assert d["io"] == "pread" and d["tensors"] == len(mixed()) and "pinned_alloc_s" in d
