"""The defaults a user gets without flags: snapshot level and restore memory engine.

Each default is whatever measured fastest *and* is safe on the host at hand; the numbers
behind them are in README ("Memory restore engines" and the ladder), measured on this
project's 2-core CPU machines:

- **Level 1 on CPU.** Level 2's restore is bound by vLLM re-processing the weights
  (oneDNN repacking: ~32 s of a 38.9 s restore for a Llama-3.2-3B-shaped model; the reader
  itself waited 0.06 s), work level 1 never redoes: its image holds the packed weights and
  only the KV cache is re-allocated. Even restored by plain copying, level 1 is faster
  than level 2; restored by mapping it is the fastest of all. On GPU, level 2 stays the
  default (vLLM's own sleep level 2 plus the CUDA copy engine; level 1 would put every
  weight into the CRIU image as host memory) until it is measured on a GPU.
- **mmap where the patched CRIU has it**, then ``copy``. ``hugepage`` is offered, not
  defaulted: it helps only when the kernel has free huge pages, and stalls on compaction
  otherwise (see :func:`fastvllm.criu_ops.hugepages_ready`). ``lazy`` moves the cost to
  the first request (each page a userfaultfd round trip).
"""

from __future__ import annotations

ENGINES = ("copy", "hugepage", "mmap", "lazy")
PREFERENCE = ("mmap", "copy")  # "auto": the first available


def snapshot_level(plat: str | None = None) -> int:
    """Level for ``fastvllm snapshot`` without ``--level`` (see the module doc)."""
    from .engine import platform

    return 1 if (plat or platform()) == "cpu" else 2


def memory_engine(available: dict[str, str | None]) -> tuple[str, list[str]]:
    """The engine ``--memory auto`` picks from ``criu_ops.memory_engines()``'s answer
    (name -> None if usable, else why not); returns (engine, reasons the better ones
    were passed over)."""
    skipped = []
    for name in PREFERENCE:
        reason = available.get(name, "unknown engine")
        if reason is None:
            return name, skipped
        skipped.append(f"{name}: {reason}")
    return "copy", skipped
