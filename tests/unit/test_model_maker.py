"""The model maker must give vLLM a complete, loadable, reproducible model directory,
and must never leave a half-written one or clobber an existing one."""

from pathlib import Path

import pytest

from fastvllm import model_maker
from fastvllm.model_maker import VOCAB_SIZE, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


def _partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def test_tiny_files_and_size(tiny):
    path = Path(tiny["path"])
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    assert 10e6 <= tiny["weight_bytes"] <= 20e6
    assert tiny["weight_bytes"] == (path / "model.safetensors").stat().st_size
    assert tiny["size"] == "tiny" and tiny["vocab_size"] == VOCAB_SIZE
    assert 5e6 < tiny["params"] < 10e6
    assert not _partials(path.parent)


def test_config_matches_preset(tiny):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny["path"])
    assert cfg.model_type == "llama" and cfg.vocab_size == VOCAB_SIZE
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.head_dim == 64 and cfg.max_position_embeddings == 2048
    assert cfg.tie_word_embeddings is False


def test_tokenizer_round_trips(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["path"])
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<s>", "</s>", "<unk>", "<pad>")
    text = "The quiet teacher crossed 42 bridges near Zanzibar, didn't she? Ünïcode ✓"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def _greedy_16(path) -> list[int]:
    """16 greedy token ids from the model at ``path`` (loaded in bf16) for a fixed prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    inputs = tok("Every old teacher watched the ship", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_loads_and_greedy_output_varies(tiny):
    new = _greedy_16(tiny["path"])
    assert len(new) == 16
    assert len(set(new)) > 1, new


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = make_model(tmp_path / "again", "tiny", seed=0)
    other = make_model(tmp_path / "other", "tiny", seed=1)
    weights = lambda r: (Path(r["path"]) / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(again) == weights(tiny)
    assert weights(other) != weights(tiny)
    assert (Path(again["path"]) / "tokenizer.json").read_bytes() == \
        (Path(tiny["path"]) / "tokenizer.json").read_bytes()


def test_refuses_non_empty_dir_and_leaves_it_alone(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        make_model(out, "tiny")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not _partials(tmp_path)


def test_refuses_existing_file(tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    with pytest.raises(FileExistsError):
        make_model(out, "tiny")
    assert out.read_text() == "x"


def test_empty_existing_dir_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    info = make_model(out, "tiny")
    assert (Path(info["path"]) / "model.safetensors").is_file()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(size, seed):
        # The tokenizer has already been written to the partial dir by now.
        assert _partials(tmp_path) and any(_partials(tmp_path)[0].iterdir())
        raise RuntimeError("boom")

    monkeypatch.setattr(model_maker, "_build_model", boom)
    with pytest.raises(RuntimeError, match="boom"):
        make_model(tmp_path / "m", "tiny")
    assert not (tmp_path / "m").exists()
    assert not _partials(tmp_path)


def test_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        make_model(tmp_path / "m", "huge")
    assert list(tmp_path.iterdir()) == []


# --- "like" presets: a real checkpoint's shapes, written directly as safetensors shards ---

# A scaled-down Llama 3 (same fields as the presets) that runs through the same writer path
# as llama-3.2-3b in a second: GQA, tied embeddings, llama3 rope scaling, 3 shards.
SMALL_LIKE = dict(model_maker.LIKE["llama-3.2-3b"], hidden_size=128, intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  vocab_size=1280, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def small_like(tmp_path_factory) -> dict:
    # Shards of ~150 kB, so the index and multi-shard paths are exercised.
    return make_model(tmp_path_factory.mktemp("models") / "like", like=SMALL_LIKE, shard_bytes=150_000)


def test_llama_3_2_3b_shapes_and_param_count():
    cfg = model_maker.like_config("llama-3.2-3b")
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (3072, 8192, 28)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (24, 8, 128)
    assert cfg["vocab_size"] == 128256 and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 500000
    assert cfg["max_position_embeddings"] == 131072
    assert cfg["rope_scaling"] == {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    table = dict(model_maker.tensor_table(cfg))
    assert len(table) == 1 + 28 * 9 + 1 and "lm_head.weight" not in table
    assert table["model.embed_tokens.weight"] == (128256, 3072)
    assert table["model.norm.weight"] == (3072,)
    for i in (0, 27):
        p = f"model.layers.{i}."
        assert table[p + "self_attn.q_proj.weight"] == (3072, 3072)
        assert table[p + "self_attn.k_proj.weight"] == (1024, 3072)
        assert table[p + "self_attn.v_proj.weight"] == (1024, 3072)
        assert table[p + "self_attn.o_proj.weight"] == (3072, 3072)
        assert table[p + "mlp.gate_proj.weight"] == (8192, 3072)
        assert table[p + "mlp.up_proj.weight"] == (8192, 3072)
        assert table[p + "mlp.down_proj.weight"] == (3072, 8192)
        assert table[p + "input_layernorm.weight"] == table[p + "post_attention_layernorm.weight"] == (3072,)
    params = model_maker.param_count(cfg)
    assert abs(params - 3.21e9) / 3.21e9 < 0.01, params
    shards = model_maker.shard_plan(model_maker.tensor_table(cfg), model_maker.LIKE_SHARD_BYTES)
    assert 2 <= len(shards) <= 5  # a few GB each: bounded memory while writing
    assert sum(len(s) for s in shards) == len(table)


@pytest.mark.parametrize("name, params", [("llama-3.2-1b", 1.24e9), ("llama-3.1-8b", 8.03e9)])
def test_other_presets_param_counts(name, params):
    cfg = model_maker.like_config(name)
    assert abs(model_maker.param_count(cfg) - params) / params < 0.01
    assert ("lm_head.weight" in dict(model_maker.tensor_table(cfg))) == (not cfg["tie_word_embeddings"])


def test_unknown_like_and_both_options(tmp_path):
    from fastvllm.errors import FastvllmError

    with pytest.raises(FastvllmError, match="no --like preset named 'gpt-5'.*llama-3.2-3b"):
        make_model(tmp_path / "m", like="gpt-5")
    with pytest.raises(FastvllmError, match="exclusive"):
        make_model(tmp_path / "m", size="tiny", like="llama-3.2-3b")
    assert list(tmp_path.iterdir()) == []


def test_like_files_index_and_headers(small_like):
    import json

    from safetensors import safe_open

    path = Path(small_like["path"])
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["transformers_version"]
    assert {k: v for k, v in config.items() if k != "transformers_version"} == model_maker.like_config(SMALL_LIKE)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) == small_like["shards"] >= 3
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    expected = dict(model_maker.tensor_table(model_maker.like_config(SMALL_LIKE)))
    assert set(index["weight_map"]) == set(expected)
    seen, total = {}, 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                t = f.get_tensor(name)
                assert index["weight_map"][name] == shard.name
                seen[name] = tuple(t.shape)
                total += t.numel() * t.element_size()
                assert str(t.dtype) == "torch.bfloat16"
                if name.endswith("norm.weight"):
                    assert bool((t == 1).all()), name
    assert seen == expected
    assert index["metadata"]["total_size"] == total
    assert small_like["params"] == model_maker.param_count(model_maker.like_config(SMALL_LIKE))
    assert small_like["weight_bytes"] == sum(s.stat().st_size for s in shards)
    assert small_like["like"] == "custom" and small_like["vocab_size"] == 1280


def test_like_tokenizer_fills_vocab_in_llama3_layout(small_like):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_like["path"])
    assert len(tok) == 1280
    assert tok.convert_ids_to_tokens(1280 - 256) == "<|begin_of_text|>" == tok.bos_token
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 1280 - 256 + 9 == tok.eos_token_id
    text = "The quiet teacher crossed 42 bridges near Zanzibar, didn't she? Ünïcode ✓"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and max(ids) < 1280
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_like_loads_in_transformers_and_greedy_output_varies(small_like):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(small_like["path"])
    assert cfg.tie_word_embeddings is True and cfg.num_key_value_heads == 2
    new = _greedy_16(small_like["path"])
    assert len(new) == 16 and len(set(new)) > 1, new


def test_like_same_seed_same_bytes_any_sharding(small_like, tmp_path):
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        out = {}
        for shard in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(shard)))
        return out

    again = make_model(tmp_path / "again", like=SMALL_LIKE, shard_bytes=150_000)
    one_shard = make_model(tmp_path / "one", like=SMALL_LIKE)
    other = make_model(tmp_path / "other", like=SMALL_LIKE, seed=1)
    first = Path(small_like["path"])
    for a, b in zip(sorted(first.glob("*.safetensors")), sorted(Path(again["path"]).glob("*.safetensors"))):
        assert a.read_bytes() == b.read_bytes()
    assert one_shard["shards"] == 1 and (Path(one_shard["path"]) / "model.safetensors").is_file()
    base, single, seeded = tensors(first), tensors(Path(one_shard["path"])), tensors(Path(other["path"]))
    assert all(base[n].equal(single[n]) for n in base)
    assert not base["model.embed_tokens.weight"].equal(seeded["model.embed_tokens.weight"])
    assert (Path(again["path"]) / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_like_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def boom(name, shape, seed):
        calls.append(name)
        if len(calls) > 20:  # after the first shard has been written
            raise RuntimeError("boom")
        return real(name, shape, seed)

    real = model_maker._random_tensor
    monkeypatch.setattr(model_maker, "_random_tensor", boom)
    with pytest.raises(RuntimeError, match="boom"):
        make_model(tmp_path / "m", like=SMALL_LIKE, shard_bytes=150_000)
    assert not (tmp_path / "m").exists()
    assert not _partials(tmp_path)


def test_cli_make_model_exclusive_and_unknown(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fastvllm.cli", "make-model", str(tmp_path / "m"), *args],
                              capture_output=True, text=True, timeout=120)

    both = run("--size", "tiny", "--like", "llama-3.2-3b")
    assert both.returncode == 1 and both.stderr.strip().count("\n") == 0
    assert "--size and --like are exclusive" in both.stderr
    unknown = run("--like", "gpt-5")
    assert unknown.returncode == 1 and "choose one of" in unknown.stderr and unknown.stderr.count("\n") == 1
    assert not (tmp_path / "m").exists()
