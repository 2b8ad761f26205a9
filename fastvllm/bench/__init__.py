"""Benchmarks users run: the cold-start ladder, and the weight path to a device.

:func:`run_ladder` runs the matrix (method x server mode x page-cache state x repeat) as a
user would, through the ``fastvllm`` command line, and times each server's decode speed once
it is up; :mod:`.report` turns the raw runs of that one run into the CSV, Markdown table and
PNG. :mod:`.weights_gpu` times the weight path (safetensors -> device tensors) alone.

The ladder's names are imported on first use, not here: ``python -m
fastvllm.bench.weights_gpu`` must start on a GPU machine that has torch and safetensors but
none of what the ladder drives (vLLM, CRIU, xxhash, pyseccomp).
"""

from __future__ import annotations

_LAZY = {"LADDER": ".methods", "Method": ".methods", "unavailable_methods": ".methods",
         "LadderConfig": ".runner", "run_ladder": ".runner"}

__all__ = ["LADDER", "Method", "LadderConfig", "run_ladder", "unavailable_methods"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
