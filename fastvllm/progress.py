"""Progress for long commands: a Rich spinner per step on a terminal, plain lines otherwise.

Progress always goes to stderr, so that ``--json`` output on stdout stays one clean object.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console


class Progress:
    """Reports named steps with their duration, measured from the command's start."""

    def __init__(self, *, quiet: bool = False, t0: float | None = None):
        self.t0 = t0 if t0 is not None else time.monotonic()
        self.quiet = quiet
        self.console = Console(stderr=True)
        self.rich = self.console.is_terminal and not quiet

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self.rich:
            self.console.print(f"[dim]{self.elapsed():7.2f}s[/] {message}")
        else:
            print(f"[fastvllm {self.elapsed():7.2f}s] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, title: str):
        start = time.monotonic()
        if self.rich:
            with self.console.status(f"{title}..."):
                yield
        else:
            self.note(f"{title}...")
            yield
        self.note(f"{title}: done in {time.monotonic() - start:.2f} s")
