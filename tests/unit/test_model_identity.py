"""Model identity on real safetensors files: same sizes and shapes but other bytes is a
different model; the inode cache makes a second look free, and any rewrite misses it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fastvllm import model_identity
from fastvllm.errors import FastvllmError


@pytest.fixture(autouse=True)
def own_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "run"))


def _write_model(d, seed: int):
    d.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"layers.0.weight": torch.randn(64, 32, generator=g), "embed": torch.randn(100, 32, generator=g)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (d / ".hidden").write_text("not read by vLLM")
    return d


def test_identity_has_headers_and_content_digests(tmp_path):
    model = _write_model(tmp_path / "m", 0)
    ident = model_identity.identity(model)
    assert set(ident["files"]) == {"model.safetensors", "config.json"}
    st = ident["files"]["model.safetensors"]
    assert st["tensors"] == 2 and len(st["xxh3_128"]) == 32 and len(st["header_xxh3_128"]) == 32
    assert st["size"] == (model / "model.safetensors").stat().st_size
    assert model_identity.changed(ident, model) == []


def test_same_size_same_shapes_other_bytes_is_detected(tmp_path):
    model = _write_model(tmp_path / "m", 0)
    before = model_identity.identity(model)
    size = (model / "model.safetensors").stat().st_size
    _write_model(model, 1)  # "retrained": same tensor table, other values
    assert (model / "model.safetensors").stat().st_size == size
    after = model_identity.identity(model)
    assert after["digest"] != before["digest"]
    assert after["files"]["model.safetensors"]["header_xxh3_128"] == before["files"]["model.safetensors"]["header_xxh3_128"]
    assert model_identity.changed(before, model) == ["model.safetensors: content differs (same size and tensor table)"]


def test_a_rewrite_that_puts_the_mtime_back_still_misses_the_cache(tmp_path):
    model = _write_model(tmp_path / "m", 0)
    before = model_identity.identity(model)
    path = model / "model.safetensors"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    with open(path, "r+b") as fh:  # in place: same inode, same size
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_ino == st.st_ino and path.stat().st_mtime_ns == st.st_mtime_ns
    stats = {}
    assert model_identity.changed(before, model) == ["model.safetensors: content differs (same size and tensor table)"]
    model_identity.identity(model, stats=stats)
    assert stats["hashed"] == 0  # the changed() call above cached the new digest


def test_shape_change_and_new_and_missing_files_are_named(tmp_path):
    model = _write_model(tmp_path / "m", 0)
    before = model_identity.identity(model)
    save_file({"layers.0.weight": torch.zeros(32, 64), "embed": torch.zeros(100, 32)}, str(model / "model.safetensors"))
    (model / "config.json").unlink()
    (model / "tokenizer.json").write_text("{}")
    assert model_identity.changed(before, model) == [
        "config.json: missing",
        "model.safetensors: tensor table differs (names, shapes or dtypes)",
        "tokenizer.json: new file",
    ]
    # a file gone is no newer model (restore's view: copied weights, snapshot-only nodes)
    assert model_identity.changed(before, model, missing_ok=True) == [
        "model.safetensors: tensor table differs (names, shapes or dtypes)",
        "tokenizer.json: new file",
    ]


def test_second_identity_is_served_from_the_cache(tmp_path, monkeypatch):
    model = _write_model(tmp_path / "m", 0)
    calls = []
    real = model_identity.hash_file
    monkeypatch.setattr(model_identity, "hash_file", lambda p: calls.append(p.name) or real(p))
    first_stats, second_stats = {}, {}
    first = model_identity.identity(model, stats=first_stats)
    assert sorted(calls) == ["config.json", "model.safetensors"] and first_stats == {"hashed": 2, "cached": 0}
    calls.clear()
    second = model_identity.identity(model, stats=second_stats)
    assert calls == [] and second_stats == {"hashed": 0, "cached": 2} and second == first
    cache_files = list(model_identity.cache_dir().iterdir())
    assert len(cache_files) == 2 and all(f.suffix == ".json" for f in cache_files)


def test_a_hub_cache_symlink_is_followed(tmp_path):
    blobs = _write_model(tmp_path / "blobs", 0)
    snap = tmp_path / "snap"
    snap.mkdir()
    for name in ("model.safetensors", "config.json"):
        (snap / name).symlink_to(blobs / name)
    assert model_identity.identity(snap)["digest"] == model_identity.identity(blobs)["digest"]


def test_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(FastvllmError, match="does not exist"):
        model_identity.identity(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FastvllmError, match="holds no model files"):
        model_identity.identity(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(FastvllmError, match="header of"):
        model_identity.identity(bad)
