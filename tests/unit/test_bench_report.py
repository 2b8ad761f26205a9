"""Aggregation, CSV, table and plot of a ladder run: real runs from a small real run
(tests/data/ladder-tiny-eager: tiny model, eager, methods 1, 3, 5, warm and evicted),
plus hand-made runs for what a real run rarely shows (failures, several repeats)."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from fastvllm.bench import report

DATA = Path(__file__).resolve().parent.parent / "data" / "ladder-tiny-eager"


def _run(method_id, first, mode="eager", cache="warm", ok=True, repeat=1, phases=None, error=None,
         decode=None, text="same", memory=None):
    rec = {"method_id": method_id, "method": f"m{method_id}", "label": f"method {method_id}", "mode": mode,
           "cache": cache, "repeat": repeat, "ok": ok, "error": error}
    if ok:
        rec.update(first_token_s=first, ready_s=first - 0.1, phases=phases or {"cli_startup": 0.5, "first_token": first - 0.5})
        if decode is not None:
            rec.update(decode_tok_s=decode, decode={"tok_s": decode, "tokens": 64, "text": text})
        if memory is not None:
            rec["memory"] = memory
    return rec


def test_aggregate_medians_failures_and_speedup():
    runs = [_run(1, 30.0), _run(1, 34.0, repeat=2), _run(1, 32.0, repeat=3),
            _run(5, 2.0), _run(5, 4.0, repeat=2), _run(5, 0, ok=False, repeat=3, error="boom"),
            _run(3, 0, ok=False, error="snapshot failed: x")]
    rows = report.aggregate(runs)
    assert [r["method_id"] for r in rows] == [1, 3, 5]
    one, three, five = rows
    assert one["first_token"] == {"median": 32.0, "min": 30.0, "max": 34.0} and one["speedup"] == 1.0
    assert five["first_token"]["median"] == 3.0 and five["failures"] == 1 and five["errors"] == ["boom"]
    assert five["speedup"] == pytest.approx(32.0 / 3.0, abs=0.01)
    assert three["first_token"] is None and three["speedup"] is None and three["runs"] == 1


def test_speedup_is_against_method_one_of_the_same_mode_and_cache():
    runs = [_run(1, 40.0, cache="evicted"), _run(5, 4.0, cache="evicted"), _run(1, 20.0), _run(5, 4.0)]
    rows = {(r["cache"], r["method_id"]): r for r in report.aggregate(runs)}
    assert rows[("evicted", 5)]["speedup"] == 10.0 and rows[("warm", 5)]["speedup"] == 5.0


def test_real_run_aggregates_every_group(tmp_path):
    meta, runs = report.load(DATA)
    rows = report.aggregate(runs)
    assert len(rows) == len({(r["mode"], r["cache"], r["method_id"]) for r in runs}) == 6
    for row in rows:
        assert row["failures"] == 0
        # the stacked phases of a single run add up to its time to first token
        assert sum(row["phases"].values()) == pytest.approx(row["first_token"]["median"], abs=0.02)
    warm = {r["method_id"]: r for r in rows if r["cache"] == "warm"}
    assert warm[1]["first_token"]["median"] > warm[5]["first_token"]["median"]


def test_csv_round_trip(tmp_path):
    _, runs = report.load(DATA)
    rows = report.aggregate(runs)
    path = tmp_path / "summary.csv"
    report.write_csv(rows, path)
    with path.open() as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == len(rows)
    assert float(got[0]["first_token_median_s"]) == rows[0]["first_token"]["median"]
    assert {"ready_min_s", "ready_max_s", "first_token_max_s", "speedup_vs_method_1",
            "phase_criu_restore_median_s"} <= set(got[0])


def test_markdown_table_has_every_row_machine_and_unavailable_steps():
    meta, runs = report.load(DATA)
    rows = report.aggregate(runs)
    text = report.markdown(meta, rows, "ladder.png")
    table = [ln for ln in text.splitlines() if ln.startswith("| eager")]
    assert len(table) == len(rows)
    assert "cores" in text and "CPU only" in text and "not available" in text and "![" in text


def test_markdown_shows_failures_as_failures():
    rows = report.aggregate([_run(1, 30.0), _run(5, 0, ok=False, error="fastvllm: error: PID 42 in use")])
    text = report.markdown({"model": "/m/tiny", "config": {"repeats": 1}}, rows)
    assert "failed: fastvllm: error: PID 42 in use" in text and "0/1" in text


def test_plot_draws_each_phase_median(tmp_path):
    _, runs = report.load(DATA)
    rows = report.aggregate(runs)
    path = tmp_path / "ladder.png"
    fig = report.plot(rows, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = fig.axes
    assert [ax.get_title() for ax in panels] == ["eager, page cache warm", "eager, page cache evicted"]
    widths = sorted(round(p.get_width(), 3) for ax in panels for p in ax.patches)
    expected = sorted(round(v, 3) for r in rows for v in r["phases"].values() if v > 0)
    assert widths == expected


def test_plot_marks_failed_methods(tmp_path):
    rows = report.aggregate([_run(1, 30.0), _run(5, 0, ok=False, error="x")])
    fig = report.plot(rows, tmp_path / "p.png")
    assert any(t.get_text().strip() == "failed" for t in fig.axes[0].texts)


def test_write_all_from_a_copy_of_a_real_run(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(DATA, run_dir)
    paths = report.write_all(run_dir)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def test_decode_medians_and_ratio_to_the_cold_start_of_the_same_column():
    runs = [_run(1, 30.0, decode=20.0), _run(1, 31.0, repeat=2, decode=22.0), _run(9, 2.0, decode=10.5),
            _run(9, 2.1, repeat=2, decode=10.5), _run(9, 0, ok=False, repeat=3, error="x"),
            _run(1, 40.0, cache="evicted", decode=10.0), _run(9, 3.0, cache="evicted", decode=12.0)]
    rows = {(r["cache"], r["method_id"]): r for r in report.aggregate(runs)}
    assert rows[("warm", 1)]["decode"] == {"median": 21.0, "min": 20.0, "max": 22.0}
    assert rows[("warm", 1)]["decode_vs_cold"] == 1.0
    assert rows[("warm", 9)]["decode_vs_cold"] == 0.5 and rows[("evicted", 9)]["decode_vs_cold"] == 1.2


def test_decode_baseline_falls_back_to_method_two_and_is_absent_without_a_cold_start():
    rows = {r["method_id"]: r for r in report.aggregate([_run(2, 25.0, decode=20.0), _run(3, 3.0, decode=30.0)])}
    assert rows[3]["decode_vs_cold"] == 1.5 and rows[3]["speedup"] is None  # 'vs 1' stays method 1's
    rows = report.aggregate([_run(3, 3.0, decode=30.0)])
    assert rows[0]["decode"]["median"] == 30.0 and rows[0]["decode_vs_cold"] is None
    rows = {r["method_id"]: r for r in report.aggregate([_run(1, 30, decode=20.0), _run(2, 25, decode=10.0),
                                                        _run(3, 3, decode=20.0)])}
    assert rows[3]["decode_vs_cold"] == 1.0  # method 1 wins over 2


def test_runs_before_the_decode_probe_have_no_decode_figures():
    _, runs = report.load(DATA)
    rows = report.aggregate(runs)
    assert all(r["decode"] is None and r["decode_vs_cold"] is None for r in rows)
    assert "| - | - |" in report.markdown(report.load(DATA)[0], rows)


def test_restored_output_is_compared_with_the_cold_starts_of_the_same_mode():
    runs = [_run(1, 30, decode=20.0, text="abc"), _run(8, 2, decode=20.0, text="abc", cache="evicted"),
            _run(9, 2, decode=20.0, text="abd"), _run(1, 60, mode="compiled", decode=20.0, text="xyz"),
            _run(9, 2, mode="compiled", decode=20.0, text="xyz")]
    got = {(r["mode"], r["method_id"]): r["same_output_as_cold"] for r in report.aggregate(runs)}
    assert got == {("eager", 1): True, ("eager", 8): True, ("eager", 9): False, ("compiled", 1): True,
                   ("compiled", 9): True}
    text = report.markdown({"model": "/m/tiny", "config": {"repeats": 1}}, report.aggregate(runs))
    assert "Decode output differs from the cold start's" in text and "eager / warm / 9" in text


def test_memory_engine_used_and_fallbacks_show_in_table_and_csv(tmp_path):
    asked_copy = {"requested": "copy", "engine": "copy", "fallback": None}
    fell_back = {"requested": "hugepage", "engine": "copy", "fallback": "hugepage: the kernel would compact memory"}
    runs = [_run(1, 30, decode=20.0), _run(8, 2, decode=20.0, memory=asked_copy),
            _run(10, 2, decode=19.0, memory=fell_back)]
    rows = report.aggregate(runs)
    text = report.markdown({"model": "/m/tiny", "config": {"repeats": 1}, "decode_probe": {"tokens": 64}}, rows)
    assert "same prompt (64 tokens)" in text
    line = {int(ln.split("|")[3]): ln for ln in text.splitlines() if ln.startswith("| eager")}
    assert "| copy |" in line[8] and "| copy* |" in line[10] and "| - |" in line[1]
    assert "| 0.95x |" in line[10] and "| 19.0 (19.0-19.0) |" in line[10]
    assert "- eager / warm / 10: hugepage: the kernel would compact memory" in text
    report.write_csv(rows, tmp_path / "s.csv")
    with (tmp_path / "s.csv").open() as fh:
        got = {r["method_id"]: r for r in csv.DictReader(fh)}
    assert got["10"]["decode_tok_s_median"] == "19.0" and got["10"]["decode_vs_cold"] == "0.95"
    assert got["10"]["memory_engines"] == "copy" and got["10"]["memory_fallbacks"].startswith("hugepage")
    assert got["1"]["memory_engines"] == "" and got["1"]["same_output_as_cold"] == "True"


def test_rows_are_json_serialisable():
    """fastvllm bench --json prints the rows as they are."""
    rows = report.aggregate([_run(1, 30, decode=20.0, text="a"), _run(9, 2, decode=20.0, text="a")])
    assert json.loads(json.dumps(rows))[1]["decode_texts"] == ["a"]


def test_write_all_when_every_restore_failed(tmp_path):
    """A run whose restores all failed still gets its table and plot (no restores-only plot)."""
    run_dir = tmp_path / "run"
    (run_dir / "runs").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"model": "/m/tiny", "config": {"repeats": 1}}))
    for i, rec in enumerate([_run(1, 30.0, decode=20.0), _run(3, 0, ok=False, error="KeyError: 'choices'")]):
        (run_dir / "runs" / f"{i:03d}.json").write_text(json.dumps(rec))
    paths = report.write_all(run_dir)
    assert set(paths) == {"csv", "png", "table"} and "failed: KeyError" in paths["table"].read_text()
    fig = report.plot(report.aggregate([_run(3, 0, ok=False, error="x")]), tmp_path / "none.png")
    assert not fig.legends
