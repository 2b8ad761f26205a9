"""The start-up methods of the ladder, each one step further than the one before it."""

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

    @property
    def is_restore(self) -> bool:
        return self.level is not None


LADDER: tuple[Method, ...] = (
    Method(1, "cold-naive", "cold start, compile caches cleared", fresh_compile_cache=True),
    Method(2, "cold-cached", "cold start, compile caches kept"),
    Method(3, "criu-l0", "CRIU level 0 (whole process)", level=0),
    Method(4, "criu-l2-vllm", "CRIU level 2 + vLLM reload_weights", level=2,
           restore_args=("--loader", "vllm", "--prefetch", "off")),
    Method(5, "criu-l2-fast", "CRIU level 2 + fast reloader", level=2,
           restore_args=("--loader", "fast", "--prefetch", "off")),
    Method(6, "criu-l2-fast-prefetch", "CRIU level 2 + fast reloader + overlapped prefetch", level=2,
           restore_args=("--loader", "fast", "--prefetch", "overlap")),
)
BY_ID = {m.id: m for m in LADDER}


@dataclass(frozen=True)
class Unavailable:
    """A further engine the ladder would run, and why it cannot run on this machine."""

    id: int
    key: str
    label: str
    reason: str
    details: dict = field(default_factory=dict)


def unavailable_methods() -> list[Unavailable]:
    """Step 7: further restore engines. fastvllm offers none beyond 3-6 yet (no CRIU
    lazy-pages or zero-copy engine); vLLM's own ``vllm snapshot`` is the reference, and it
    needs an NVIDIA GPU with cuda-checkpoint and a hub model pinned by revision."""
    rows = [Unavailable(7, "lazy-pages", "CRIU lazy pages / zero-copy restore",
                        "not offered by fastvllm yet")]
    missing = [tool for tool in ("nvidia-smi", "cuda-checkpoint") if not shutil.which(tool)]
    if missing:
        rows.append(Unavailable(7, "vllm-snapshot", "vLLM's own `vllm snapshot` (CRIU + cuda-checkpoint)",
                                f"needs an NVIDIA GPU ({', '.join(missing)} not found)"))
    else:
        rows.append(Unavailable(7, "vllm-snapshot", "vLLM's own `vllm snapshot` (CRIU + cuda-checkpoint)",
                                "not wired into the ladder yet: it needs a hub model pinned by a 40-character "
                                "--revision, not a local directory"))
    return rows


def parse_ids(text: str) -> list[int]:
    """'1-6', '1,3,5' or '4-6,1' -> sorted method ids; unknown ids are an error."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad method list {text!r}: use ids like 1-6 or 1,3,5") from None
        ids.update(range(first, last + 1))
    unknown = sorted(i for i in ids if i not in BY_ID)
    if unknown or not ids:
        raise ValueError(f"unknown method id(s) {unknown or text!r}: the ladder has 1-{len(LADDER)}")
    return sorted(ids)
