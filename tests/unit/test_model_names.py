"""Well-known names and hub ids resolve to the local Hugging Face cache, or fail in one
line that says how to get the model here; directories keep resolving as they always did."""

import json
from pathlib import Path

import pytest

from fastvllm import model_names
from fastvllm.errors import FastvllmError
from fastvllm.snapshot import resolve_model, weights_source

REV = "0cb88a4f764b7a12671c53f0838cd831a0843b95"


def _cache_model(cache: Path, repo: str, rev: str = REV, files=("config.json", "model.safetensors")) -> Path:
    """A model laid out as huggingface_hub lays it out: blobs, a snapshot of symlinks, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, name in enumerate(files):
        blob = root / "blobs" / f"{i:040x}"
        blob.write_text(json.dumps({"model_type": "llama"}) if name.endswith(".json") else "x")
        (snap / name).symlink_to(Path("../..") / "blobs" / blob.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_well_known_name_resolves_to_cached_snapshot(hub_cache):
    snap = _cache_model(hub_cache, "meta-llama/Llama-3.2-3B-Instruct")
    assert resolve_model("llama-3.2-3b") == str(snap)
    assert resolve_model("Llama-3.2-3B") == str(snap)  # names ignore case
    assert (Path(resolve_model("llama-3.2-3b")) / "config.json").is_file()


def test_hub_id_resolves_to_cached_snapshot(hub_cache):
    snap = _cache_model(hub_cache, "someorg/some-model.v2")
    assert resolve_model("someorg/some-model.v2") == str(snap)
    assert weights_source(resolve_model("someorg/some-model.v2")) == snap
    assert weights_source("someorg/some-model.v2") == snap  # unresolved ids too


def test_hf_home_is_respected(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    snap = _cache_model(tmp_path / "hfhome" / "hub", "Qwen/Qwen2.5-0.5B-Instruct")
    assert model_names.hub_cache_dir() == tmp_path / "hfhome" / "hub"
    assert resolve_model("qwen2.5-0.5b") == str(snap)


def test_uncached_well_known_name_one_line_with_fix(hub_cache):
    with pytest.raises(FastvllmError) as err:
        resolve_model("llama-3.2-3b")
    msg = str(err.value)
    assert "\n" not in msg
    assert "meta-llama/Llama-3.2-3B-Instruct is not in the local Hugging Face cache" in msg
    assert str(hub_cache) in msg
    assert "hf download meta-llama/Llama-3.2-3B-Instruct" in msg and "HF_HUB_OFFLINE" in msg
    assert "make-model DIR --like llama-3.2-3b" in msg  # a preset exists for this name


def test_uncached_hub_id_one_line(hub_cache):
    _cache_model(hub_cache, "other/model")
    with pytest.raises(FastvllmError) as err:
        resolve_model("someorg/absent")
    msg = str(err.value)
    assert "\n" not in msg and "someorg/absent is not in the local Hugging Face cache" in msg
    assert "--like" not in msg
    with pytest.raises(FastvllmError, match="level 2 needs the weights of someorg/absent"):
        weights_source("someorg/absent")


def test_unknown_name_not_a_hub_id_one_line(hub_cache):
    for bad in ("llama-9", "a/b/c", "org--x/y"):
        with pytest.raises(FastvllmError) as err:
            resolve_model(bad)
        msg = str(err.value)
        assert "\n" not in msg and "not a model directory, a well-known name or a hub id" in msg
        assert "llama-3.2-3b" in msg


def test_snapshot_without_config_is_not_a_model(hub_cache):
    _cache_model(hub_cache, "org/no-config", files=("model.safetensors",))
    with pytest.raises(FastvllmError, match="not in the local Hugging Face cache"):
        resolve_model("org/no-config")


def test_directories_resolve_as_before(tmp_path, hub_cache, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert resolve_model(str(model)) == str(model.resolve())
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m") == str(model.resolve())  # a relative dir wins over any name
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastvllmError, match="no config.json"):
        resolve_model("empty")
    with pytest.raises(FastvllmError, match="does not exist"):
        resolve_model("./absent")


def test_table_is_well_formed():
    from fastvllm import model_maker

    for name, repo in model_names.WELL_KNOWN.items():
        assert name == name.lower() and model_names.hub_id(name) == repo
        assert model_names.hub_id(repo) == repo
    assert set(model_maker.LIKE) <= set(model_names.WELL_KNOWN)  # every preset has its real id
