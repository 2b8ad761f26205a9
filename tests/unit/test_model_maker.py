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


def test_loads_and_greedy_output_varies(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["path"])
    model = AutoModelForCausalLM.from_pretrained(tiny["path"])
    assert model.dtype == torch.bfloat16
    inputs = tok("Every old teacher watched the ship", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
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
