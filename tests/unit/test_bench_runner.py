"""The runner's pure parts: the decode-speed arithmetic over a server-sent event stream (as
vLLM's /v1/completions streams it), the error line of a failed command, the memory record."""

import json

import pytest

from fastvllm.bench import runner
from fastvllm.bench.methods import BY_ID


def _chunk(text, usage=None, choices=True):
    body = {"id": "cmpl-1", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": None}] if choices else []}
    if usage is not None:
        body["usage"] = {"prompt_tokens": 12, "completion_tokens": usage, "total_tokens": 12 + usage}
    return "data: " + json.dumps(body)


def test_decode_rate_excludes_the_first_token():
    # first token at 0.50 s (prefill), then one token every 0.01 s: 100 tok/s after the first
    lines = [(0.5 + 0.01 * i, _chunk(f"t{i}", usage=i + 1)) for i in range(64)]
    lines += [(1.14, ""), (1.141, _chunk("", usage=64, choices=False)), (1.142, "data: [DONE]")]
    got = runner.decode_rate(runner.stream_events(lines))
    assert got["tok_s"] == pytest.approx(100.0, rel=1e-3)
    assert got["tokens"] == 64 and got["tokens_timed"] == 63 and got["chunks"] == 64
    assert got["first_chunk_s"] == 0.5 and got["text"] == "".join(f"t{i}" for i in range(64))


def test_chunks_carrying_several_tokens_are_counted_by_usage():
    lines = [(1.0, _chunk("a", usage=1)), (1.1, _chunk("bc", usage=3)), (1.2, _chunk("def", usage=6))]
    got = runner.decode_rate(runner.stream_events(lines))
    assert got["tokens"] == 6 and got["tok_s"] == pytest.approx(5 / 0.2)


def test_without_usage_each_chunk_is_one_token_and_the_final_usage_corrects_the_count():
    lines = [(1.0, _chunk("a")), (1.5, _chunk("b")), (2.0, _chunk("c"))]
    assert runner.decode_rate(runner.stream_events(lines))["tok_s"] == pytest.approx(2 / 1.0)
    lines.append((2.01, _chunk("", usage=5, choices=False)))  # the server's closing usage-only chunk
    events = runner.stream_events(lines)
    assert [n for _, n, _ in events] == [1, 2, 5] and events[-1][0] == 2.0  # time of the last token, not usage
    assert runner.decode_rate(events)["tokens"] == 5


@pytest.mark.parametrize("lines", [[], [(1.0, _chunk("a", usage=1))],
                                   [(1.0, _chunk("a", usage=1)), (1.0, _chunk("b", usage=2))]])
def test_decode_rate_needs_two_chunks_at_two_times(lines):
    with pytest.raises(ValueError):
        runner.decode_rate(runner.stream_events(lines))


def test_error_line_reads_through_typers_box():
    stderr = ("Usage: python -m fastvllm.cli restore [OPTIONS] SNAPSHOT\n"
              "Try 'python -m fastvllm.cli restore --help' for help.\n"
              "╭─ Error ─────────────────────────────────────────╮\n"
              "│ No such option: --memory                        │\n"
              "╰─────────────────────────────────────────────────╯\n")
    assert runner.error_line(stderr) == "No such option: --memory"
    assert runner.error_line("fastvllm: error: PID 42 in use\n\n") == "fastvllm: error: PID 42 in use"
    assert runner.error_line("\n ─── \n") is None


def test_memory_record_keeps_the_restores_own_and_what_the_method_asked():
    out = {"memory": {"requested": "hugepage", "engine": "copy", "fallback": "hugepage: would compact",
                      "stats": {"pages": 10}}}
    assert runner._memory_record(BY_ID[10], out) == out["memory"]
    assert runner._memory_record(BY_ID[8], {}) == {"requested": "copy", "engine": None, "fallback": None}


METRICS = """# HELP vllm:request_decode_time_seconds Histogram of time spent in DECODE phase of request.
# TYPE vllm:request_decode_time_seconds histogram
vllm:request_decode_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 2.0
vllm:request_decode_time_seconds_count{engine="0",model_name="m"} 3.0
vllm:request_decode_time_seconds_sum{engine="0",model_name="m"} 0.75
vllm:request_decode_time_seconds_sum{engine="1",model_name="m"} 0.25
vllm:request_decode_time_seconds_count{engine="1",model_name="m"} 1.0
vllm:request_decode_time_seconds_created{engine="0",model_name="m"} 1.7e9
vllm:request_decode_time_seconds_summary_sum 99
"""


def test_decode_totals_add_every_engine_and_ignore_other_series():
    assert runner.decode_totals(METRICS) == (1.0, 4.0)


@pytest.mark.parametrize("text", ["", "vllm:request_decode_time_seconds_sum 1.0\n", "# nothing\n"])
def test_decode_totals_need_both_sum_and_count(text):
    assert runner.decode_totals(text) is None


@pytest.mark.parametrize("bad", [{"repeats": 0}, {"decode_tokens": 1}, {"modes": ["turbo"]}])
def test_ladder_config_refuses_bad_settings_with_a_fix(bad):
    from fastvllm.bench.runner import LadderConfig
    from fastvllm.errors import FastvllmError

    with pytest.raises(FastvllmError) as err:
        LadderConfig(model="m", **bad).check()
    assert err.value.fix
