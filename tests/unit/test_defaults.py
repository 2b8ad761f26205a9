"""What a user gets without flags: the level per platform and the engine ``auto`` picks."""

from __future__ import annotations

from fastvllm import defaults


def test_level_1_on_cpu_level_2_on_gpu():
    assert defaults.snapshot_level("cpu") == 1
    assert defaults.snapshot_level("cuda") == 2


def test_auto_prefers_mmap_then_copy():
    every = {name: None for name in defaults.ENGINES}
    assert defaults.memory_engine(every) == ("mmap", [])
    no_mmap = dict(every, mmap="unpatched CRIU")
    assert defaults.memory_engine(no_mmap) == ("copy", ["mmap: unpatched CRIU"])


def test_auto_never_picks_hugepage_or_lazy():
    only_those = {"copy": "x", "mmap": "y", "hugepage": None, "lazy": None}
    engine, skipped = defaults.memory_engine(only_those)
    assert engine == "copy" and len(skipped) == 2
