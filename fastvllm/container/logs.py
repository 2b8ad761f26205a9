"""The container's log: the server's log file, copied to stdout as it grows, and
fastvllm's own one-line notes on stderr (both are ``docker logs``).

CRIU needs the server tree's output in a file (see :mod:`fastvllm.paths`), so the log is
followed rather than inherited.
"""

from __future__ import annotations

import os
import sys
import threading

from ..paths import logs_dir


def say(message: str) -> None:
    print(f"fastvllm entrypoint: {message}", file=sys.stderr, flush=True)


class LogFollower(threading.Thread):
    """Copies what server logs in the run dir gain to stdout (the container's log).

    Offsets are per path, so a log that CRIU's restore puts back (a new file with the
    dump-time content) continues where it left off instead of being printed twice.
    """

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True, name="fastvllm-log-follower")
        self.dir = logs_dir()
        self.interval = interval
        self.offsets = {str(p): p.stat().st_size for p in self.dir.glob("*.log")}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def skip_to(self, path: str, offset: int) -> None:
        with self.lock:
            self.offsets[path] = max(self.offsets.get(path, 0), offset)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.pump()

    def stop(self) -> None:
        self.done.set()
        self.pump()

    def pump(self) -> None:
        with self.lock:
            for path in sorted(self.dir.glob("*.log")):
                key = str(path)
                try:
                    with open(path, "rb") as fh:
                        size = os.fstat(fh.fileno()).st_size
                        offset = min(self.offsets.get(key, 0), size)
                        fh.seek(offset)
                        data = fh.read(size - offset)
                except OSError:
                    continue
                self.offsets[key] = offset + len(data)
                if data:
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
