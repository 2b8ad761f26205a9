"""The start-up methods of the ladder, each one step further than the one before it.

Every restore method names its CRIU memory engine (``--memory``) and page-cache prefetch
explicitly rather than taking ``fastvllm restore``'s defaults, so that a default changing
later does not silently change what an id measures; only method 13 takes the default engine
on purpose (``auto``), to show what a user gets. The ids:

====  ========================  =====  ==========  ==================================
 id   key                       level  memory      what else
====  ========================  =====  ==========  ==================================
  1   cold-naive                cold   -           compile caches cleared
  2   cold-cached               cold   -           compile caches kept
  3   criu-l0                   0      copy        prefetch overlap
  4   criu-l2-vllm              2      copy        vLLM reload_weights, prefetch off
  5   criu-l2-fast              2      copy        fast reloader, prefetch off
  6   criu-l2-fast-prefetch     2      copy        fast reloader, prefetch overlap
  7   criu-l0-mmap              0      mmap        prefetch overlap
  8   criu-l1                   1      copy        prefetch overlap
  9   criu-l1-mmap              1      mmap        prefetch overlap
 10   criu-l1-hugepage          1      hugepage    prefetch overlap
 11   criu-l1-lazy              1      lazy        prefetch overlap
 12   criu-l2-fast-mmap         2      mmap        fast reloader, prefetch off
 13   criu-l1-auto              1      auto        prefetch overlap (all defaults)
 14   criu-l0-hugepage          0      hugepage    prefetch overlap
 15   criu-l0-lazy              0      lazy        prefetch overlap
 16   criu-l2-fast-hugepage     2      hugepage    fast reloader, prefetch off
 17   criu-l2-fast-lazy         2      lazy        fast reloader, prefetch off
 18   criu-l1-hugepage-forced   1      hugepage    as 10, readiness check off (env)
====  ========================  =====  ==========  ==================================

1-6 keep the meaning they had before the memory engines existed (3 took the then-default
overlapped prefetch, so the level-0/1 methods all do: 7-11 and 13 differ from 3 or 8 only in
what the id says). 12 is 5 with the mmap engine, the fastest-looking combination. 14-17 fill
the rest of the level x engine matrix (levels 0 and 2 with hugepage and lazy), so that one
``--methods 3,5,7-17`` run covers every level with every engine. 18 is 10 with the huge-page
readiness check turned off (``FASTVLLM_HUGEPAGE_CHECK=off``): on VMs with free page reporting
10 falls back to copy, and 18 measures what huge pages would do to restore and decode speed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    """One way to bring a server up. ``level`` None means a cold start (``fastvllm serve``);
    otherwise a restore of a snapshot at that level with ``restore_args``."""

    id: int
    key: str
    label: str
    level: int | None = None
    restore_args: tuple[str, ...] = ()
    fresh_compile_cache: bool = False
    env: tuple[tuple[str, str], ...] = ()  # extra environment for the command

    @property
    def is_restore(self) -> bool:
        return self.level is not None

    @property
    def memory(self) -> str | None:
        """The ``--memory`` engine this method asks for (None for cold starts)."""
        args = self.restore_args
        return next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--memory"), None)


def _restore(level: int, memory: str, *extra: str) -> dict:
    return {"level": level, "restore_args": ("--memory", memory, *extra)}


_OVERLAP = ("--prefetch", "overlap")
_FAST_OFF = ("--loader", "fast", "--prefetch", "off")

LADDER: tuple[Method, ...] = (
    Method(1, "cold-naive", "cold start, compile caches cleared", fresh_compile_cache=True),
    Method(2, "cold-cached", "cold start, compile caches kept"),
    Method(3, "criu-l0", "CRIU level 0 (whole process), copy", **_restore(0, "copy", *_OVERLAP)),
    Method(4, "criu-l2-vllm", "CRIU level 2 + vLLM reload_weights, copy",
           **_restore(2, "copy", "--loader", "vllm", "--prefetch", "off")),
    Method(5, "criu-l2-fast", "CRIU level 2 + fast reloader, copy", **_restore(2, "copy", *_FAST_OFF)),
    Method(6, "criu-l2-fast-prefetch", "CRIU level 2 + fast reloader + overlapped prefetch, copy",
           **_restore(2, "copy", "--loader", "fast", *_OVERLAP)),
    Method(7, "criu-l0-mmap", "CRIU level 0 (whole process), mmap", **_restore(0, "mmap", *_OVERLAP)),
    Method(8, "criu-l1", "CRIU level 1 (KV cache released), copy", **_restore(1, "copy", *_OVERLAP)),
    Method(9, "criu-l1-mmap", "CRIU level 1, mmap (zero-copy)", **_restore(1, "mmap", *_OVERLAP)),
    Method(10, "criu-l1-hugepage", "CRIU level 1, hugepage", **_restore(1, "hugepage", *_OVERLAP)),
    Method(11, "criu-l1-lazy", "CRIU level 1, lazy pages", **_restore(1, "lazy", *_OVERLAP)),
    Method(12, "criu-l2-fast-mmap", "CRIU level 2 + fast reloader, mmap", **_restore(2, "mmap", *_FAST_OFF)),
    Method(13, "criu-l1-auto", "CRIU level 1, auto engine (restore's default)", **_restore(1, "auto", *_OVERLAP)),
    Method(14, "criu-l0-hugepage", "CRIU level 0 (whole process), hugepage", **_restore(0, "hugepage", *_OVERLAP)),
    Method(15, "criu-l0-lazy", "CRIU level 0 (whole process), lazy pages", **_restore(0, "lazy", *_OVERLAP)),
    Method(16, "criu-l2-fast-hugepage", "CRIU level 2 + fast reloader, hugepage",
           **_restore(2, "hugepage", *_FAST_OFF)),
    Method(17, "criu-l2-fast-lazy", "CRIU level 2 + fast reloader, lazy pages", **_restore(2, "lazy", *_FAST_OFF)),
    Method(18, "criu-l1-hugepage-forced", "CRIU level 1, hugepage, readiness check off",
           env=(("FASTVLLM_HUGEPAGE_CHECK", "off"),), **_restore(1, "hugepage", *_OVERLAP)),
)
BY_ID = {m.id: m for m in LADDER}
COLD_BASELINES = (1, 2)  # the cold starts a restore's decode speed is compared with, first found wins


@dataclass(frozen=True)
class Unavailable:
    """A further engine the ladder would run, and why it cannot run on this machine."""

    id: int
    key: str
    label: str
    reason: str
    details: dict = field(default_factory=dict)


def unavailable_methods() -> list[Unavailable]:
    """The step after the ladder: vLLM's own ``vllm snapshot``, the reference to beat. It
    needs an NVIDIA GPU with cuda-checkpoint and a hub model pinned by revision, so it is
    listed with the reason instead of run."""
    next_id = max(BY_ID) + 1
    label = "vLLM's own `vllm snapshot` (CRIU + cuda-checkpoint)"
    missing = [tool for tool in ("nvidia-smi", "cuda-checkpoint") if not shutil.which(tool)]
    if missing:
        reason = f"needs an NVIDIA GPU ({', '.join(missing)} not found)"
    else:
        reason = ("not wired into the ladder yet: it needs a hub model pinned by a 40-character "
                  "--revision, not a local directory")
    return [Unavailable(next_id, "vllm-snapshot", label, reason)]


def parse_ids(text: str) -> list[int]:
    """'1-18', '1,3,5', '4-6,1' or 'all' -> sorted method ids; unknown ids are an error."""
    if text.strip().lower() == "all":
        return sorted(BY_ID)
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad method list {text!r}: use ids like 1-{max(BY_ID)}, 1,3,5 or all") from None
        ids.update(range(first, last + 1))
    unknown = sorted(i for i in ids if i not in BY_ID)
    if unknown or not ids:
        raise ValueError(f"unknown method id(s) {unknown or text!r}: the ladder has 1-{max(BY_ID)}")
    return sorted(ids)
