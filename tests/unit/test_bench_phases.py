"""Phase breakdowns of one start-up, from real vLLM logs and real command output."""

import json
import time
from pathlib import Path

import pytest

from fastvllm.bench import phases

DATA = Path(__file__).resolve().parent.parent / "data"


def test_vllm_log_phases_from_real_logs():
    eager = phases.vllm_log_phases((DATA / "vllm-cold-eager.log").read_text())
    compiled = phases.vllm_log_phases((DATA / "vllm-cold-compiled.log").read_text())
    assert set(eager) == {"weights_load", "engine_init"}
    assert eager["engine_init"] < compiled["engine_init"]  # compiling happens inside engine init
    assert compiled["engine_init"] == pytest.approx(38.48)
    assert compiled["weights_load"] == pytest.approx(0.10)


def test_compilation_time_is_split_out_when_vllm_reports_it():
    line = ("(EngineCore pid=1) INFO 11-21 13:55:25 [core.py:402] init engine (profile, create kv cache, "
            "warmup model) took 40.00 s (compilation: 31.50 s)\n"
            "(Worker pid=2) INFO 11-21 13:54:45 [gpu_model_runner.py:1] Model loading took 1.2 GiB memory and 3.250000 seconds\n"
            "(Worker pid=2) INFO 11-21 13:54:45 [default_loader.py:501] Loading weights took 2.00 seconds\n")
    found = phases.vllm_log_phases(line)
    assert found == {"weights_load": 3.25, "engine_init": pytest.approx(8.5), "compile": 31.5}


def test_unrelated_log_gives_no_phases():
    assert phases.vllm_log_phases("nothing to see\n") == {}


def _serve_output(healthy=30.0, first=30.2, total=30.3):
    return {"timings": {"healthy_s": healthy, "first_token_s": first, "total_s": total}}


def test_cold_phases_sum_to_first_token_from_spawn():
    text = (DATA / "vllm-cold-compiled.log").read_text()
    # The real log's engine started 13:54:27 local time; spawn 10 s before that second.
    spawn = time.mktime(time.strptime(f"{time.localtime().tm_year}-11-21 13:54:17", "%Y-%m-%d %H:%M:%S"))
    out = _serve_output(healthy=81.036, first=81.144, total=81.19)
    got = phases.cold_phases(out, wall=81.75, log_text=text, spawn_epoch=spawn)
    assert list(got) == ["cli_startup", "api_startup", "engine_startup", "weights_load", "engine_init",
                         "server_other", "first_token"]
    assert sum(got.values()) == pytest.approx(phases.first_token_from_spawn(out, 81.75), abs=0.01)
    assert got["engine_init"] == pytest.approx(38.48)
    assert got["api_startup"] > 0 and got["engine_startup"] > 0


def test_cold_phases_without_log_put_everything_in_the_rest():
    out = _serve_output()
    got = phases.cold_phases(out, wall=31.0, log_text=None)
    assert got == {"cli_startup": 0.7, "server_other": 30.0, "first_token": 0.2}


def test_cold_phases_ignore_a_log_that_claims_more_than_the_run_took():
    text = (DATA / "vllm-cold-compiled.log").read_text()  # 38 s of engine init
    got = phases.cold_phases(_serve_output(healthy=10.0, first=10.1, total=10.2), wall=10.5, log_text=text)
    assert "engine_init" not in got and got["server_other"] == 10.0


def test_restore_phases_level2_and_ready():
    out = {"timeline": {"criu_restore": {"start": 0.08, "end": 1.2}},
           "timings": {"restore_s": 1.2, "healthy_s": 1.3, "weights_s": 1.75, "first_token_s": 1.8, "total_s": 2.0}}
    got = phases.restore_phases(out, wall=2.5)
    assert got == {"cli_startup": 0.5, "preflight": 0.08, "criu_restore": 1.12, "health": 0.1,
                   "weights_reload": 0.45, "first_token": 0.05}
    assert sum(got.values()) == pytest.approx(phases.first_token_from_spawn(out, 2.5))
    assert phases.ready_from_spawn(out, 2.5) == 2.25  # level 2 is ready when its weights are back


def test_restore_phases_from_a_real_run():
    run = next(json.loads(p.read_text()) for p in sorted((DATA / "ladder-tiny-eager" / "runs").glob("*criu-l0*")))
    got = phases.restore_phases(run["output"], run["wall_s"])
    assert "weights_reload" not in got  # level 0 keeps its weights
    assert sum(got.values()) == pytest.approx(run["first_token_s"], abs=0.01)


def test_restore_phases_level1_name_the_kv_cache_step():
    """Level 1 reports the end of its KV cache re-allocation as weights_s; it is no reload."""
    out = {"level": 1, "timeline": {"criu_restore": {"start": 0.05, "end": 0.9}},
           "timings": {"restore_s": 0.9, "healthy_s": 1.0, "weights_s": 1.2, "first_token_s": 1.25, "total_s": 1.3}}
    got = phases.restore_phases(out, wall=1.8)
    assert "weights_reload" not in got and got["kv_cache_realloc"] == 0.2
    assert sum(got.values()) == pytest.approx(phases.first_token_from_spawn(out, 1.8))
    assert phases.ready_from_spawn(out, 1.8) == 1.7
    assert "kv_cache_realloc" in phases.PHASES


def test_restore_phases_of_a_late_binding_restore():
    """The server binds after its weights and canary: /health comes last, nothing negative."""
    out = {"level": 2, "timeline": {"criu_restore": {"start": 0.08}},
           "timings": {"restore_s": 1.2, "weights_s": 1.7, "canary_s": 1.9, "healthy_s": 2.0, "first_token_s": 2.1,
                       "total_s": 2.2}}
    got = phases.restore_phases(out, wall=2.7)
    assert got == {"cli_startup": 0.5, "preflight": 0.08, "criu_restore": 1.12, "weights_reload": 0.5,
                   "canary_bind": 0.3, "first_token": 0.1}
    assert abs(sum(got.values()) - phases.first_token_from_spawn(out, 2.7)) < 1e-6
    assert phases.ready_from_spawn(out, 2.7) == 2.5
