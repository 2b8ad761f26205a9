"""The GPU weight-path benchmark: its checkpoint has the 3B model's names and shapes (or a
scaled copy), its checks catch a wrong byte, its ratios and summary say what was measured
and what was not, it runs end to end on CPU with the no-GPU line, and it imports nothing a
GPU machine without vLLM, CRIU, xxhash or pyseccomp lacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastvllm import model_maker
from fastvllm.bench import weights_gpu as wg
from fastvllm.weights import plan_weights

TINY_GIB = 0.005  # ~7 MB: all 254 tensors of the 3B layout, tiny sizes


def test_full_config_is_make_models_3b_and_scaled_keeps_every_name():
    full = wg.bench_config(None)
    assert full == model_maker.like_config("llama-3.2-3b")
    names = [n for n, _ in model_maker.tensor_table(full)]
    assert len(names) == 254  # tied embeddings: no lm_head
    for gib in (0.05, 0.2, 1.0):
        cfg = wg.bench_config(gib)
        assert [n for n, _ in model_maker.tensor_table(cfg)] == names
        size = 2 * model_maker.param_count(cfg) / 2**30
        assert 0.6 * gib < size < 1.4 * gib, (gib, size)
        assert cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
    assert wg.bench_config(100.0) == full


def test_checkpoint_loads_with_safetensors_and_is_reused(tmp_path):
    cfg = wg.bench_config(TINY_GIB)
    info = wg.write_checkpoint(tmp_path / "ck", cfg, seed=3, gen_device="cpu")
    assert not info["reused"] and info["tensors"] == 254
    table = dict(model_maker.tensor_table(cfg))
    loaded = {}
    for f in info["files"]:
        loaded.update(load_file(tmp_path / "ck" / f))
    assert {n: tuple(t.shape) for n, t in loaded.items()} == table
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    norm = loaded["model.layers.0.input_layernorm.weight"]
    assert len(set(norm.tolist())) > 1  # random, not ones: a misplaced norm would show
    mtime = (tmp_path / "ck" / info["files"][0]).stat().st_mtime_ns
    again = wg.write_checkpoint(tmp_path / "ck", cfg, seed=3, gen_device="cpu")
    assert again["reused"] and (tmp_path / "ck" / info["files"][0]).stat().st_mtime_ns == mtime
    assert not wg.write_checkpoint(tmp_path / "ck", cfg, seed=4, gen_device="cpu")["reused"]


def test_destination_check_finds_one_wrong_byte(tmp_path):
    wg.write_checkpoint(tmp_path / "ck", wg.bench_config(TINY_GIB), seed=0, gen_device="cpu")
    plan = plan_weights(tmp_path / "ck")
    ref = wg.load_reference(plan, "cpu")
    dest = wg.Destination(plan, "cpu")
    dest.poison()
    assert len(dest.mismatches(ref)) == len(ref)
    for name, t in ref.items():
        dest.tensors[name].copy_(t)
    assert dest.mismatches(ref) == []
    name = "model.layers.7.mlp.up_proj.weight"
    wg._bytes(dest.tensors[name])[123] ^= 1
    assert dest.mismatches(ref) == [name]


def row(gbps: float, **extra) -> dict:
    return {"gb_per_s_median": gbps, "seconds_median": 1.0 / gbps, "runs_s": [1.0 / gbps] * 3, "label": "x", **extra}


def test_ratios_take_the_better_limit_and_the_better_library():
    r = wg.ratios({"a_one": row(50.0), "a_chunked": row(40.0), "b_load_file": row(5.0), "c_safe_open": row(8.0),
                   "d_defaults": row(41.0), "d_best_sweep": row(45.0)})
    assert r["limit_gb_per_s"] == 50.0 and r["best_library_gb_per_s"] == 8.0
    assert r["d_defaults"] == {"vs_limit": 0.82, "vs_best_library": 5.125, "meets_vs_limit": True,
                               "meets_vs_library": True}
    slow = wg.ratios({"a_one": row(50.0), "b_load_file": row(30.0), "d_defaults": row(35.0)})
    assert not slow["d_defaults"]["meets_vs_limit"] and not slow["d_defaults"]["meets_vs_library"]


def test_summary_says_no_gpu_and_flags_mismatches():
    warm = {"a_one": row(10.0, label="(a) one"), "d_defaults": row(5.0, label="(d) defaults",
                                                                    verified={"runs": 3, "tensors": 254,
                                                                              "runs_with_mismatches": 1,
                                                                              "mismatched": ["m.w"]})}
    result = {"gpu_measured": False, "device": "cpu", "device_note": "test", "results": {"warm": warm},
              "ratios": {"warm": wg.ratios(warm)}, "checkpoint": {"tensors": 254, "tensor_bytes": 6e9, "files": ["a"]},
              "skipped": ["cold page cache: --evict none"]}
    lines = wg.summary_lines(result)
    assert lines[0].startswith(wg.NO_GPU)
    assert any("MISMATCH in 1 of 3 runs" in line for line in lines)
    assert any("[CPU analogue, not a GPU figure]" in line for line in lines)
    assert lines[-1] == "skipped: cold page cache: --evict none"
    assert not wg.summary_lines(dict(result, gpu_measured=True))[0].startswith(wg.NO_GPU)


def test_sweep_grid_stays_within_the_cores_and_uses_pread_on_cpu(monkeypatch):
    monkeypatch.setattr(wg.os, "cpu_count", lambda: 2)
    grid = wg.sweep_grid("cuda:0", quick=False)
    assert {g["threads"] for g in grid} == {2, 4} and len(grid) == 2 * 3 * 2
    monkeypatch.setattr(wg.os, "cpu_count", lambda: 16)
    assert len(wg.sweep_grid("cuda:0", quick=False)) == 4 * 3 * 2
    assert all("io" not in g for g in grid)
    assert all(g["io"] == "pread" for g in wg.sweep_grid("cpu", quick=True))


def test_runs_on_cpu_end_to_end_through_the_cli(tmp_path, cli):
    # One repeat keeps this a unit test; the runs users make take medians of 3.
    proc = cli("bench-weights-gpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--device",
               "cpu", "--gib", str(TINY_GIB), "--quick", "--repeats", "1", "--evict", "files", timeout=300)
    assert proc.stdout.startswith(wg.NO_GPU)
    result = json.loads((tmp_path / "out" / "bench_weights_gpu-cpu.json").read_text())
    assert not result["gpu_measured"] and result["summary"][0].startswith(wg.NO_GPU)
    warm = result["results"]["warm"]
    assert {"a_one", "a_chunked", "b_load_file", "c_safe_open", "d_defaults", "d_best_sweep"} <= set(warm)
    checked = [r["verified"] for cache in result["results"].values() for r in cache.values() if "verified" in r]
    checked += [r["verified"] for r in result["sweep"]]
    assert len(checked) >= 3 + 3 + 3 and all(c["runs_with_mismatches"] == 0 and c["tensors"] == 254 for c in checked)
    assert len(result["sweep"]) == 3 and "cold" in result["results"]
    assert any("fewer than 3" in n for n in result["notes"])
    assert result["machine"]["cores"] and result["machine"]["torch"] and result["machine"]["cuda"] is None
    assert (tmp_path / "out" / "bench_weights_gpu-cpu.txt").read_text().splitlines() == result["summary"]
    assert not (tmp_path / "work" / "checkpoint").exists()  # removed without --keep


BLOCKED = ["vllm", "xxhash", "pyseccomp", "pycriu", "transformers", "tokenizers", "matplotlib",
           "runai_model_streamer", "pytest", "docker", "yaml", "jsonschema"]


@pytest.mark.parametrize("code, ok", [
    ("import sys, fastvllm.device_reader, fastvllm.weights; from fastvllm.bench import weights_gpu; "
     "sys.argv[1:] = ['--help']; weights_gpu.main()", True),
    ("import xxhash", False),  # the guard itself works
])
def test_imports_nothing_a_bare_gpu_machine_lacks(code, ok):
    """As on the GPU machine: these modules missing must not matter."""
    guard = ("import sys\n"
             "class Block:\n"
             f"    names = {BLOCKED!r}\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in self.names:\n"
             "            raise ImportError(f'{name} is not on the GPU machine')\n"
             "sys.meta_path.insert(0, Block())\n")
    proc = subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) == ok, proc.stderr[-2000:]
