"""The reader's CUDA path on a real GPU: bytes exact, buffers never refilled under a copy,
tensors never handed to the allocator under the consumer's work, pinned memory paid once.

Marked ``gpu`` and skipped without CUDA. scripts/gpu_check.sh runs this file on the GPU
machine under pytest where pytest is installed, else directly (``python
tests/gpu/test_weights_cuda.py``: every ``test_*`` with a fresh temporary directory), so the
tests take nothing but ``tmp_path`` and use no other pytest feature.

To turn races into wrong bytes, two tests slow one side down with ``torch.cuda._sleep``
(a spin kernel): copies that lag far behind the reads (a buffer refilled before its event
completed would be copied from too late), and a consumer whose stream lags behind the
reader (a tensor freed to the allocator without ``record_stream`` would be overwritten by
the next tensor's copy before the consumer read it).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import traceback
from pathlib import Path

if __name__ == "__main__":  # run directly: import fastvllm from this tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from fastvllm import weights  # noqa: E402
from fastvllm.device_reader import CudaCopyEngine  # noqa: E402
from fastvllm.errors import FastvllmError  # noqa: E402
from fastvllm.weights import ReadStats, iter_weights, plan_weights  # noqa: E402
from tests.safetensors_files import write_ordered  # noqa: E402

SKIP_REASON = "needs a CUDA GPU: exercises the reader's pinned-piece, side-stream H2D path"
HAS_CUDA = torch.cuda.is_available()

try:
    import pytest
except ImportError:  # the GPU machine may lack pytest: see the module docstring
    pytest = None
else:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=SKIP_REASON)]

DEV = "cuda:0"
POISON = 0xFF


# --------------------------------------------------------------------------- helpers


def checkpoint(path: Path, small: int = 400, big: int = 3, big_numel: int = 700_000, seed: int = 0) -> Path:
    """Random bytes in every dtype width: ``small`` tensors of 1..3000 bytes (pieces end
    inside tensors everywhere) and ``big`` tensors of several pieces, a 0-d and an empty one."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int8, torch.int64, torch.bool, torch.float8_e4m3fn]
    big_at = {k * small // big for k in range(big)}
    items = []
    for i in range(small):
        n = int(torch.randint(1, 1500, (1,), generator=g))
        dt = dtypes[i % len(dtypes)]
        t = (torch.rand(n, generator=g) > 0.5) if dt == torch.bool else torch.randn(n, generator=g).mul(40).to(dt)
        items.append((f"model.layers.{i // 9}.p{i % 9}.weight", t))
        if i in big_at:
            items.append((f"big.{i}.weight", torch.randn(big_numel, generator=g).to(torch.bfloat16).reshape(-1, 100)))
    items += [("model.scalar", torch.tensor(2.5)), ("model.empty", torch.empty(0, 3))]
    return write_ordered(path, items)


def reference(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=DEV)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class Dest:
    """Preallocated CUDA tensors, one per checkpoint tensor, as a reload's parameters."""

    def __init__(self, path: Path):
        self.plan = plan_weights(path)
        self.t = {e.name: torch.empty(e.shape, dtype=e.torch_dtype, device=DEV) for e in self.plan.entries}

    def poison(self) -> None:
        for t in self.t.values():
            if t.numel():
                as_bytes(t).fill_(POISON)

    def assert_equal(self, ref: dict[str, torch.Tensor]) -> None:
        torch.cuda.synchronize()
        bad = [n for n, t in self.t.items() if not torch.equal(as_bytes(t), as_bytes(ref[n]))]
        assert not bad, f"{len(bad)} tensors differ from the file, e.g. {bad[:5]}"


def load_into(dest: Dest, order: list[str] | None = None, after_yield=None, **kw) -> ReadStats:
    stats = ReadStats()
    for name, t in iter_weights(dest.plan, stats=stats, **kw):
        assert t.device.type == "cuda" and t.dtype == dest.t[name].dtype and t.shape == dest.t[name].shape, name
        if after_yield is not None:
            after_yield()
        dest.t[name].copy_(t)
        if order is not None:
            order.append(name)
    return stats


@contextlib.contextmanager
def slices(nbytes: int):
    """Read slices smaller than the pieces, so each piece is read by several threads."""
    old = weights.SLICE_BYTES
    weights.SLICE_BYTES = nbytes
    try:
        yield
    finally:
        weights.SLICE_BYTES = old


# --------------------------------------------------------------------------- tests


def test_reader_into_preallocated_cuda_tensors_is_bit_identical(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors")
    ref, dest = reference(path), Dest(path)
    settings = [dict(threads=1, chunk_bytes=4096, buffers=2), dict(threads=4, chunk_bytes=5000, buffers=3),
                dict(threads=8, chunk_bytes=64 << 10, buffers=2), dict(threads=2, chunk_bytes=1 << 20, buffers=4), {}]
    with slices(1500):
        for s in settings:
            dest.poison()
            order: list[str] = []
            stats = load_into(dest, order, engine=CudaCopyEngine(DEV), **s)
            dest.assert_equal(ref)
            assert order == [e.name for e in dest.plan.entries] and stats.copies == 0, s
    dest.poison()
    load_into(dest, device=DEV)  # the production entry: iter_weights(device=...), defaults
    dest.assert_equal(ref)


def test_many_small_tensors_and_tensors_larger_than_a_piece(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors", small=3000, big=4, big_numel=1_500_000)
    ref, dest = reference(path), Dest(path)
    assert max(e.nbytes for e in dest.plan.entries) > 40 * (64 << 10)
    with slices(16 << 10):
        for buffers in (2, 3):
            dest.poison()
            stats = load_into(dest, engine=CudaCopyEngine(DEV), threads=4, chunk_bytes=64 << 10, buffers=buffers)
            dest.assert_equal(ref)
            assert stats.extra["pinned_bytes"] == buffers * (64 << 10)


class SlowCopyEngine(CudaCopyEngine):
    """Every copy waits behind a spin kernel on the side stream: the copies lag the reads."""

    def copy(self, dst, src):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(200_000)
        super().copy(dst, src)


def test_slow_copies_never_read_a_refilled_buffer(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors", small=600, big=2)
    ref, dest = reference(path), Dest(path)
    with slices(4096):
        for buffers in (2, 3):
            dest.poison()
            load_into(dest, engine=SlowCopyEngine(DEV), threads=4, chunk_bytes=8192, buffers=buffers)
            dest.assert_equal(ref)


def test_slow_consumer_keeps_its_tensors_from_the_allocator(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors", small=600, big=2)
    ref, dest = reference(path), Dest(path)

    def lag():  # the consumer's stream is busy long after the reader moved on
        torch.cuda._sleep(300_000)

    with slices(4096):
        dest.poison()
        load_into(dest, after_yield=lag, engine=CudaCopyEngine(DEV), threads=4, chunk_bytes=8192, buffers=2)
        dest.assert_equal(ref)


def test_consumer_on_its_own_stream(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors")
    ref, dest = reference(path), Dest(path)
    side = torch.cuda.Stream(DEV)
    dest.poison()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        load_into(dest, engine=CudaCopyEngine(DEV), chunk_bytes=8192, after_yield=lambda: torch.cuda._sleep(50_000))
    side.synchronize()
    dest.assert_equal(ref)


def test_pinned_buffers_are_paid_once_and_bounded(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors", small=100, big=2, big_numel=2_000_000)
    ref, dest = reference(path), Dest(path)
    engine = CudaCopyEngine(DEV)
    first = load_into(dest, engine=engine, chunk_bytes=1 << 20, buffers=3)
    held = engine.pinned_bytes
    assert held == 3 * (1 << 20) == first.extra["pinned_bytes"]  # the 4 MB tensors go through 1 MiB pieces
    for _ in range(3):
        dest.poison()
        load_into(dest, engine=engine, chunk_bytes=1 << 20, buffers=3)
        dest.assert_equal(ref)
    assert engine.pinned_bytes == held and len(engine._free) == 3
    assert engine.free_pinned() == held and engine.pinned_bytes == 0
    assert weights.copy_engine_for("cuda") is weights.copy_engine_for(DEV)


def test_interleaved_passes_and_an_abandoned_one(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors")
    ref = reference(path)
    a, b = Dest(path), Dest(path)
    engine = CudaCopyEngine(DEV)
    it_a = iter_weights(a.plan, engine=engine, chunk_bytes=8192, threads=2)
    it_b = iter_weights(b.plan, engine=engine, chunk_bytes=8192, threads=3, buffers=3)
    for (na, ta), (nb, tb) in zip(it_a, it_b):
        a.t[na].copy_(ta)
        b.t[nb].copy_(tb)
    assert next(it_b, None) is None  # zip stopped at it_a's end: let it_b finish too
    a.assert_equal(ref)
    b.assert_equal(ref)
    abandoned = iter_weights(a.plan, engine=engine, chunk_bytes=8192)
    for _ in range(50):
        next(abandoned)
    abandoned.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("fastvllm-weights")]
    a.poison()
    load_into(a, engine=engine, chunk_bytes=8192)
    a.assert_equal(ref)


def test_truncated_file_names_the_file(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors")
    plan = plan_weights(path)
    with open(path, "r+b") as f:
        f.truncate(plan.entries[len(plan.entries) // 2].offset)
    raised = None
    try:
        for _ in iter_weights(plan, engine=CudaCopyEngine(DEV), chunk_bytes=8192):
            pass
    except FastvllmError as err:
        raised = str(err)
    assert raised and "truncated" in raised and str(path) in raised, raised


def test_bench_end_to_end_on_cuda(tmp_path):
    from fastvllm.bench import weights_gpu

    result = weights_gpu.run(weights_gpu.Config(out=tmp_path / "out", work=tmp_path / "work", device="cuda",
                                                gib=0.01, quick=True, evict="files", budget_s=120),
                             say=lambda s: None)
    assert result["gpu_measured"] and result["device"].startswith("cuda")
    checked = [r["verified"] for cache in result["results"].values() for r in cache.values() if r.get("verified")]
    assert checked and all(c["runs_with_mismatches"] == 0 for c in checked)
    assert (tmp_path / "out" / "bench_weights_gpu-cuda.json").is_file()


# --------------------------------------------------------------------------- without pytest


def _main() -> int:
    if not HAS_CUDA:
        print(f"SKIPPED all tests in {Path(__file__).name}: {SKIP_REASON}")
        return 0
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, fn in tests:
        with tempfile.TemporaryDirectory(prefix="fastvllm-gpu-test-") as tmp:
            try:
                fn(Path(tmp))
                print(f"PASSED {name}", flush=True)
            except Exception:
                failed += 1
                print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    print(f"{len(tests) - failed} passed, {failed} failed (run without pytest)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
