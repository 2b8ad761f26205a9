"""The weights reader must yield exactly what safetensors holds, keep every tensor of a
group valid until the group is complete, fail with one clear line naming the file, and
never leave threads behind; dumps must round-trip and manifests must catch changes."""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvllm import weights
from fastvllm.errors import FastvllmError
from fastvllm.weights import (ReadStats, check_against_model, dump_weights, group_of, iter_weights, plan_weights,
                              reference_weights, verify_weights)
from tests.safetensors_files import write_ordered


def llama_like(layers: int = 3, hidden: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF Llama names (so safetensors' alphabetical order splits the layer-level groups),
    random data (so a recycled buffer cannot go unnoticed), mixed dtypes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    t = {"model.embed_tokens.weight": r(64, hidden), "lm_head.weight": r(64, hidden),
         "model.norm.weight": r(hidden, dt=torch.float32)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = r(hidden, dt=torch.float32)
        t[f"{p}.post_attention_layernorm.weight"] = r(hidden, dt=torch.float16)
        for n in ("q", "k", "v", "o"):
            t[f"{p}.self_attn.{n}_proj.weight"] = r(hidden, hidden)
        for n in ("gate", "up"):
            t[f"{p}.mlp.{n}_proj.weight"] = r(2 * hidden, hidden)
        t[f"{p}.mlp.down_proj.weight"] = r(hidden, 2 * hidden)
        t[f"{p}.mlp.scale"] = torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g)
        t[f"{p}.mlp.mask"] = torch.rand(5, generator=g) > 0.5
        t[f"{p}.mlp.ids"] = torch.randint(0, 1 << 40, (3,), generator=g)
        t[f"{p}.mlp.fp8"] = r(4, 4).to(torch.float8_e4m3fn)
    return t


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(llama_like(), path)
    return path


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: list[tuple[str, torch.Tensor]], ref: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bytes: exact even for NaNs and float8)."""
    assert sorted(n for n, _ in got) == sorted(ref)
    for name, t in got:
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape, name
        assert torch.equal(as_bytes(t), as_bytes(ref[name])), name


def owned(it) -> list[tuple[str, torch.Tensor]]:
    return [(n, t.clone()) for n, t in it]


# --------------------------------------------------------------------------- plan


def test_plan_orders_by_file_offset_and_never_splits_a_group(shard):
    plan = plan_weights(shard, chunk_bytes=6000)
    offsets = [e.offset for e in plan.entries]
    assert offsets == sorted(offsets) and len(plan.entries) == len(llama_like())
    assert [e for c in plan.chunks for e in c.entries] == list(plan.entries)
    for ci, chunk in enumerate(plan.chunks):
        for e in chunk.entries:
            assert e.chunk == ci and chunk.offset <= e.offset and e.offset + e.nbytes <= chunk.offset + chunk.nbytes
    assert len(plan.chunks) > 3
    # Each group's final run is in one chunk; earlier runs (split groups) are copies.
    for name in {e.group for e in plan.entries}:
        members = [e for e in plan.entries if e.group == name]
        last = members[-1].chunk
        assert all(e.chunk == last or e.needs_copy for e in members), name
        assert not any(e.needs_copy for e in members if e.chunk == last), name


def test_oversize_group_gets_its_own_chunk(tmp_path):
    big = [(f"m.big.w{i}.weight", torch.zeros(250, dtype=torch.float32)) for i in range(3)]  # 3000 bytes
    items = [("m.a.x.weight", torch.ones(10)), *big, ("m.b.x.weight", torch.ones(10))]
    plan = plan_weights(write_ordered(tmp_path / "m.safetensors", items), chunk_bytes=1500)
    groups = [[group_of(e.name) for e in c.entries] for c in plan.chunks]
    assert groups == [["m.a"], ["m.big"] * 3, ["m.b"]]
    assert plan.chunks[1].nbytes >= 3000 and plan.max_chunk_bytes == plan.chunks[1].nbytes
    assert plan.copies == 0


def test_small_groups_share_a_chunk(tmp_path):
    items = [(f"m.g{i}.w.weight", torch.ones(16)) for i in range(10)]  # 64 bytes each
    plan = plan_weights(write_ordered(tmp_path / "m.safetensors", items), chunk_bytes=200)
    assert [len(c.entries) for c in plan.chunks] == [3, 3, 3, 1]
    assert all(c.nbytes <= 200 + weights.CHUNK_ALIGN for c in plan.chunks)


def test_noncontiguous_group_needs_copy_only_when_split_across_chunks(tmp_path):
    items = [("m.l0.norm1.weight", torch.ones(64)), ("m.l0.mlp.up.weight", torch.ones(64)),
             ("m.l0.norm2.weight", torch.ones(64))]
    path = write_ordered(tmp_path / "m.safetensors", items)
    tiny = plan_weights(path, chunk_bytes=1)
    assert [e.needs_copy for e in tiny.entries] == [True, False, False] and tiny.copies == 1
    assert len(tiny.chunks) == 3
    assert plan_weights(path, chunk_bytes=1 << 30).copies == 0
    assert tiny.rechunk(1 << 30).copies == 0


# --------------------------------------------------------------------------- reader


@pytest.fixture
def small_slices(monkeypatch):
    """Slices much smaller than the test chunks, so chunks are read piecewise by
    several threads and tensors straddle slice boundaries."""
    monkeypatch.setattr(weights, "SLICE_BYTES", 1000)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 40])
@pytest.mark.parametrize("buffers", [2, 3])
@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_reader_yields_what_load_file_gives(shard, small_slices, threads, chunk_bytes, buffers, io):
    stats = ReadStats()
    got = owned(iter_weights(shard, threads=threads, chunk_bytes=chunk_bytes, buffers=buffers, stats=stats, io=io))
    ref = load_file(shard)
    assert [n for n, _ in got] == [e.name for e in plan_weights(shard).entries]
    assert_same(got, ref)
    assert stats.tensors == len(ref) and stats.bytes_read >= sum(t.nbytes for t in ref.values())
    assert stats.chunks == len(plan_weights(shard, chunk_bytes).chunks) and stats.seconds > 0


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_reader_with_default_slices(tmp_path, io):
    tensors = {f"m.l{i}.w.weight": torch.randn(3000, 1000) for i in range(3)}  # 12 MB each: 3 slices
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same(owned(iter_weights(tmp_path, threads=4, chunk_bytes=20_000_000, io=io)), tensors)
    assert_same(owned(iter_weights(tmp_path, threads=2, io=io)), tensors)


def test_reader_accepts_a_plan_and_fills_a_stats_dict(shard):
    plan = plan_weights(shard, chunk_bytes=4000)
    stats: dict = {}
    assert_same(owned(iter_weights(plan, stats=stats, io="pread")), load_file(shard))
    assert stats["chunks"] == len(plan.chunks) and stats["copies"] == plan.copies > 0 and stats["io"] == "pread"
    assert stats["gb_per_s"] > 0 and stats["bytes_read"] > 0
    stats.clear()
    assert_same(owned(iter_weights(plan, stats=stats)), load_file(shard))
    assert stats["io"] == "mmap" and stats["copies"] == 0  # mapped views never need copies


def test_multi_shard_index(tmp_path):
    tensors = llama_like(layers=4)
    names = sorted(tensors)
    shards = [names[:10], names[10:25], names[25:]]  # cuts through groups on purpose
    weight_map = {}
    for i, part in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in part}, tmp_path / fname)
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    plan = plan_weights(tmp_path, chunk_bytes=5000)
    assert [p.name for p in plan.files] == sorted(set(weight_map.values()))
    assert_same(owned(iter_weights(plan, threads=2)), tensors)
    held = list(iter_weights(tmp_path, chunk_bytes=1 << 40))  # one chunk per file, 2 buffers
    assert len(held) == len(tensors)


def test_index_naming_a_tensor_its_file_lacks(tmp_path, shard):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.ghost.weight": "model.safetensors"}}))
    with pytest.raises(FastvllmError, match="model.ghost.weight"):
        plan_weights(tmp_path)


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_every_yielded_tensor_is_valid_until_its_group_completes(shard, small_slices, io):
    """The vLLM layerwise-reload pattern: keep a group's tensors, check at group end."""
    ref = load_file(shard)
    remaining: dict[str, int] = {}
    for name in ref:
        remaining[group_of(name)] = remaining.get(group_of(name), 0) + 1
    for chunk_bytes in (1, 2500, 9000):
        held: dict[str, list[tuple[str, torch.Tensor]]] = {}
        left = dict(remaining)
        for name, t in iter_weights(shard, threads=2, chunk_bytes=chunk_bytes, buffers=2, io=io):
            g = group_of(name)
            held.setdefault(g, []).append((name, t))
            left[g] -= 1
            if left[g] == 0:
                for n, kept in held.pop(g):
                    assert torch.equal(as_bytes(kept), as_bytes(ref[n])), (chunk_bytes, n)
        assert not held


def test_views_are_recycled_after_their_chunk(tmp_path):
    """No per-tensor allocation: a tensor kept past the next chunk reads the buffer's new
    contents (the reason for the lifetime contract)."""
    tensors = {f"m.l{i}.w.weight": torch.full((256,), float(i)) for i in range(6)}
    save_file(tensors, tmp_path / "model.safetensors")
    it = iter_weights(tmp_path, chunk_bytes=1024, buffers=2, threads=1, io="pread")
    first = next(it)[1]
    next(it)
    third = next(it)[1]
    assert third.data_ptr() == first.data_ptr()  # chunk 2 went into chunk 0's buffer
    assert torch.equal(first, torch.full((256,), 2.0))
    it.close()


@pytest.mark.parametrize("dtype", sorted({d for d in weights.DTYPES.values()
                                          if d not in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e8m0fnu)},
                                         key=str))
@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_every_safetensors_dtype(tmp_path, dtype, io):
    t = (torch.randn(5, 3) * 4).to(dtype)
    # A 3-byte tensor first: every wider dtype after it is misaligned (taken as a copy).
    write_ordered(tmp_path / "model.safetensors", [("a.b.odd", torch.ones(3, dtype=torch.int8)), ("a.b.x", t)])
    got = dict(iter_weights(tmp_path, io=io))
    assert got["a.b.x"].dtype == dtype and torch.equal(as_bytes(got["a.b.x"]), as_bytes(t))


# --------------------------------------------------------------------------- failures


def test_truncated_shard_names_the_file(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(FastvllmError, match=f"{shard}.*truncated"):
        plan_weights(shard)
    shard.write_bytes(data[:5])
    with pytest.raises(FastvllmError, match=f"{shard}.*truncated"):
        iter_weights(shard)


def test_truncated_after_planning_raises_from_the_reader_thread(shard, small_slices):
    baseline = threading.active_count()
    plan = plan_weights(shard, chunk_bytes=2000)
    with open(shard, "r+b") as f:
        f.truncate(plan.chunks[-3].offset + 10)
    with pytest.raises(FastvllmError, match=f"{shard} is truncated") as err:
        for _ in iter_weights(plan, threads=2, io="pread"):
            pass
    assert "\n" not in str(err.value)
    assert threading.active_count() == baseline


@pytest.mark.parametrize("raw", [b"{not json", b'["a list"]', b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
                                 b'{"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}', b'{"x": {}}'])
def test_corrupt_header(tmp_path, raw):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
    with pytest.raises(FastvllmError, match=f"{path} has a corrupt safetensors header") as err:
        iter_weights(path)
    assert "\n" not in str(err.value)


def test_absurd_header_length(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    with pytest.raises(FastvllmError, match="corrupt"):
        plan_weights(path)


def test_missing_file(tmp_path, shard):
    with pytest.raises(FastvllmError, match="nope.safetensors is missing"):
        iter_weights(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastvllmError, match="no safetensors weights"):
        plan_weights(tmp_path / "empty")
    plan = plan_weights(shard)
    shard.unlink()
    with pytest.raises(FastvllmError, match=f"{shard} is missing"):
        next(iter_weights(plan))


@pytest.mark.parametrize("io, io_function", [("pread", "_read_into"), ("mmap", "_populate")])
def test_reader_thread_exception_propagates_and_no_threads_remain(shard, monkeypatch, small_slices, io, io_function):
    baseline = threading.active_count()
    calls = []
    real = getattr(weights, io_function)

    def flaky(*args):
        calls.append(args)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        real(*args)

    monkeypatch.setattr(weights, io_function, flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        for _ in iter_weights(shard, threads=4, chunk_bytes=1500, buffers=3, io=io):
            pass
    assert threading.active_count() == baseline


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_abandoned_iterator_stops_its_threads(shard, small_slices, io):
    baseline = threading.active_count()
    it = iter_weights(shard, threads=4, chunk_bytes=1000, buffers=3, io=io)
    next(it)
    assert threading.active_count() > baseline
    it.close()
    assert threading.active_count() == baseline


def test_mmap_truncated_before_reading(shard):
    plan = plan_weights(shard)
    with open(shard, "r+b") as f:
        f.truncate(plan.entries[-1].offset)
    with pytest.raises(FastvllmError, match=f"{shard} is truncated"):
        next(iter_weights(plan, io="mmap"))


def test_mmap_populate_error_names_the_file(shard):
    """Truncated after mapping, before prefaulting: MADV_POPULATE_READ fails with EFAULT
    (rather than the consumer getting SIGBUS), reported as a one-line error."""
    plan = plan_weights(shard, chunk_bytes=2000)
    source = weights._MappedSource(plan)
    with open(shard, "r+b") as f:
        f.truncate(4096)
    last = len(plan.chunks) - 1
    with pytest.raises(FastvllmError, match=f"{shard} could not be read at offset .* \\(truncated\\)"):
        source.fill(last, 0, plan.chunks[last].nbytes)
    source.close()


def test_mmap_views_outlive_the_iterator_and_writes_stay_private(shard):
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    got = list(iter_weights(shard, chunk_bytes=2000))  # no clones
    gc.collect()
    assert_same(got, load_file(shard))
    for _, t in got:
        t.zero_()
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest


def test_mmap_prefetch_stays_within_the_buffers_ahead(shard, monkeypatch, small_slices):
    """Prefaulting follows the same schedule as the buffers: chunk c only after the
    consumer is done with chunk c - k."""
    plan = plan_weights(shard, chunk_bytes=2500)
    log: list = []
    real = weights._MappedSource.fill

    def logged(self, c, lo, hi):
        log.append(("fill", c))
        real(self, c, lo, hi)

    monkeypatch.setattr(weights._MappedSource, "fill", logged)
    for name, _ in iter_weights(plan, threads=2, buffers=2, io="mmap"):
        log.append(("got", name))
    got_at = {e[1]: i for i, e in enumerate(log) if e[0] == "got"}
    for i, (kind, c) in enumerate(log):
        if kind == "fill" and c >= 2:
            assert got_at[plan.chunks[c - 2].entries[-1].name] < i


def test_bad_arguments(shard):
    with pytest.raises(ValueError):
        iter_weights(shard, buffers=1)
    with pytest.raises(ValueError):
        iter_weights(shard, threads=0)
    with pytest.raises(ValueError):
        iter_weights(shard, io="aio")


# --------------------------------------------------------------------------- copy engine rotation


class RecordingEngine:
    """A fake asynchronous copy engine: logs every call so the test can check that a
    buffer is refilled only after its chunk's last event was waited on."""

    independent = False

    def __init__(self, log: list):
        self.log, self.buffers, self.events = log, [], 0

    def alloc(self, nbytes):
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.buffers.append(buf)
        return buf

    def copy(self, tensor):
        self.log.append(("copy", self.events))
        return tensor

    def record(self):
        self.events += 1
        self.log.append(("record", self.events - 1))
        return self.events - 1  # event id == index of the tensor just copied

    def publish(self, event):
        self.log.append(("publish", event))

    def wait(self, event):
        self.log.append(("wait", event))


@pytest.mark.parametrize("buffers", [2, 3])
def test_rotation_waits_for_events_and_consumer(shard, monkeypatch, small_slices, buffers):
    log: list = []
    engine = RecordingEngine(log)
    plan = plan_weights(shard, chunk_bytes=2500)
    real = weights._read_into

    def logged(fd, view, offset, path):
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        buf = next(i for i, b in enumerate(engine.buffers) if b.data_ptr() <= addr < b.data_ptr() + b.numel())
        # Chunks start 64-byte aligned, so neighbours may overlap by a few bytes: a
        # slice belongs to the last chunk that starts at or before it.
        chunk = max(i for i, c in enumerate(plan.chunks) if c.offset <= offset)
        log.append(("fill", chunk, buf))
        real(fd, view, offset, path)

    monkeypatch.setattr(weights, "_read_into", logged)
    for name, _ in iter_weights(plan, threads=2, buffers=buffers, engine=engine):
        log.append(("got", name))

    k, n = buffers, len(plan.chunks)
    assert n > 2 * k and any(len(c.entries) > 1 for c in plan.chunks)
    index = {e.name: i for i, e in enumerate(plan.entries)}
    last_event = {c: index[plan.chunks[c].entries[-1].name] for c in range(n)}
    pos = {entry: i for i, entry in enumerate(log) if entry[0] in ("copy", "record", "wait", "publish", "got")}
    fills = [(i, entry) for i, entry in enumerate(log) if entry[0] == "fill"]
    assert {c for _, (_, c, _) in fills} == set(range(n))
    for i, (_, c, buf) in fills:
        assert buf == c % k, "chunk read into the wrong buffer"
        if c >= k:
            prev = c - k
            assert pos[("wait", last_event[prev])] < i, f"buffer {buf} refilled before chunk {prev}'s event was waited on"
            assert pos[("got", plan.chunks[prev].entries[-1].name)] < i, f"buffer {buf} refilled while chunk {prev} was in use"
    for e in plan.entries:
        j = index[e.name]
        assert pos[("copy", j)] < pos[("record", j)] < pos[("publish", j)] < pos[("got", e.name)]
    assert [e[1] for e in log if e[0] == "wait"] == [last_event[c] for c in range(n)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: exercises the pinned-buffer H2D path")
def test_cuda_copy_engine_matches_load_file(shard):
    from fastvllm.device_reader import CudaCopyEngine

    stats = ReadStats()
    got = [(n, t) for n, t in iter_weights(shard, device="cuda", chunk_bytes=2500, buffers=2, stats=stats)]
    assert all(t.device.type == "cuda" for _, t in got)
    assert stats.copies == 0  # device tensors are independent of the buffers: no clones
    assert_same([(n, t.cpu()) for n, t in got], load_file(shard))
    assert isinstance(weights.copy_engine_for("cuda"), CudaCopyEngine)


# --------------------------------------------------------------------------- dump / manifests


def test_dump_round_trip(tmp_path):
    tensors = llama_like(layers=4)
    given = list(tensors.items())  # groups interleaved: layernorms between attn and mlp
    manifest = dump_weights(given, tmp_path / "out", shard_bytes=12_000)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values()) == manifest["total_size"]
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for path in shards:
        part = load_file(path)
        assert all(index["weight_map"][n] == path.name for n in part)
        loaded.update(part)
    assert_same(list(loaded.items()), tensors)
    assert manifest["mode"] == "copied"
    assert {Path(f["path"]).name for f in manifest["files"]} == {p.name for p in shards} | {"model.safetensors.index.json"}
    for f in manifest["files"]:
        assert f["size"] == Path(f["path"]).stat().st_size
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
    # Groups are contiguous, never span shards, and come in first-seen order.
    plan = plan_weights(out, chunk_bytes=1)
    assert plan.copies == 0
    order = list(dict.fromkeys(group_of(n) for n, _ in given))
    assert list(dict.fromkeys(e.group for e in plan.entries)) == order
    assert_same(owned(iter_weights(out, chunk_bytes=3000)), tensors)
    verify_weights(manifest, check_sha=True)


def test_dump_refuses_a_dir_with_weights(tmp_path):
    dump_weights([("a.b.c", torch.ones(2))], tmp_path)
    with pytest.raises(FastvllmError, match="already contains weights"):
        dump_weights([("a.b.c", torch.ones(2))], tmp_path)


def test_reference_weights(shard):
    manifest = reference_weights(shard.parent)
    assert manifest["mode"] == "referenced" and manifest["total_size"] == sum(t.nbytes for t in load_file(shard).values())
    [rec] = manifest["files"]
    assert rec == {"path": str(shard.resolve()), "size": shard.stat().st_size,
                   "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    verify_weights(manifest, check_sha=True)


def test_verify_weights_detects_changes(shard):
    manifest = reference_weights(shard.parent)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(data)
    verify_weights(manifest)  # same size: only the hash can tell
    with pytest.raises(FastvllmError, match="sha256 differs"):
        verify_weights(manifest, check_sha=True)
    shard.write_bytes(bytes(data) + b"x")
    with pytest.raises(FastvllmError, match="bytes, expected"):
        verify_weights(manifest)
    shard.unlink()
    with pytest.raises(FastvllmError, match="is missing"):
        verify_weights(manifest)


def test_check_against_model(shard):
    plan = plan_weights(shard)
    expected = {e.name: (e.shape, e.torch_dtype) for e in plan.entries}
    check_against_model(plan, expected)
    check_against_model(plan, {"lm_head.weight": ([64, 32], "BF16")})
    with pytest.raises(FastvllmError, match="model.extra.weight is missing"):
        check_against_model(plan, {**expected, "model.extra.weight": ((1,), torch.float32)})
    with pytest.raises(FastvllmError, match=r"lm_head.weight has shape \[64, 32\], model expects \[64, 33\]"):
        check_against_model(plan, {**expected, "lm_head.weight": ((64, 33), torch.bfloat16)})
    with pytest.raises(FastvllmError, match="lm_head.weight is BF16, model expects F16"):
        check_against_model(plan, {**expected, "lm_head.weight": ((64, 32), torch.float16)})
    with pytest.raises(FastvllmError, match="unexpected tensor"):
        check_against_model(plan, {"lm_head.weight": ((64, 32), torch.bfloat16)}, allow_extra=False)
