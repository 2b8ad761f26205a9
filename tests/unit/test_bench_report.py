"""Aggregation, CSV, table and plot of a ladder run: real runs from a small real run
(tests/data/ladder-tiny-eager: tiny model, eager, methods 1, 3, 5, warm and evicted),
plus hand-made runs for what a real run rarely shows (failures, several repeats)."""

import csv
import shutil
from pathlib import Path

import pytest

from fastvllm.bench import report

DATA = Path(__file__).resolve().parent.parent / "data" / "ladder-tiny-eager"


def _run(method_id, first, mode="eager", cache="warm", ok=True, repeat=1, phases=None, error=None):
    rec = {"method_id": method_id, "method": f"m{method_id}", "label": f"method {method_id}", "mode": mode,
           "cache": cache, "repeat": repeat, "ok": ok, "error": error}
    if ok:
        rec.update(first_token_s=first, ready_s=first - 0.1, phases=phases or {"cli_startup": 0.5, "first_token": first - 0.5})
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
