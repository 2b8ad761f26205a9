"""Memory preflight: refuse a restore that cannot fit, before CRIU runs.

A restore that does not fit is OOM-killed part-way; in a pod the kubelet then restarts the
container into the same restore, forever (issue 12, case 7). The restored tree needs

- the CRIU images' bytes (the memory as dumped: every page comes back, copied or mapped);
- at level 2, the weights it reloads;
- at levels 1 and 2, the KV cache it re-allocates (``VLLM_CPU_KVCACHE_SPACE`` GiB on CPU);
  at level 0 the KV cache is inside the images already.

It is compared with what the kernel can give: ``MemAvailable`` from ``/proc/meminfo`` and,
inside a memory cgroup, the room under its limit. Room is ``limit - (usage - inactive
file cache)`` for the process's cgroup and every ancestor (the smallest wins): inactive page
cache is reclaimed before the OOM killer acts, so it is not counted as used (the same
"working set" rule the kubelet evicts by). cgroup v2 (``memory.max``/``memory.current``)
and v1 (``memory.limit_in_bytes``/``memory.usage_in_bytes``) are both read. The paths are
parameters, so tests pass real files of their own. Where neither can be read there is
nothing to compare with and the check passes (a preflight must not block a restore that
might fit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import FastvllmError

GIB = 1 << 30
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-rounded number


class NotEnoughMemory(FastvllmError):
    """The restore would not fit in memory."""


@dataclass
class Need:
    """Bytes a restore needs, by where they come from."""

    image_bytes: int
    weight_bytes: int = 0
    kv_cache_bytes: int = 0

    @property
    def total(self) -> int:
        return self.image_bytes + self.weight_bytes + self.kv_cache_bytes

    @classmethod
    def for_level(cls, level: int, image_bytes: int, weight_bytes: int, kv_cache_gib: float) -> "Need":
        return cls(image_bytes=image_bytes,
                   weight_bytes=weight_bytes if level == 2 else 0,
                   kv_cache_bytes=int(kv_cache_gib * GIB) if level in (1, 2) else 0)


@dataclass
class Room:
    """Bytes available: the smaller of MemAvailable and the cgroup's room."""

    mem_available: int | None
    cgroup: str | None = None  # the cgroup whose limit binds
    cgroup_limit: int | None = None
    cgroup_used: int | None = None

    @property
    def cgroup_room(self) -> int | None:
        if self.cgroup_limit is None:
            return None
        return max(0, self.cgroup_limit - (self.cgroup_used or 0))

    @property
    def total(self) -> int | None:
        values = [v for v in (self.mem_available, self.cgroup_room) if v is not None]
        return min(values) if values else None

    def to_json(self) -> dict:
        return dict(asdict(self), cgroup_room=self.cgroup_room, total=self.total)


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> tuple:
    """(cgroup path, limit, used) of the tightest memory cgroup above this process, or Nones."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None, None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    best = (None, None, None)
    if v1 is not None:
        best = _tightest(root / "memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    if best[1] is None and v2 is not None and (root / "cgroup.controllers").exists():
        best = _tightest(root, v2, "memory.max", "memory.current", "inactive_file")
    return best


def _tightest(base: Path, rel: str, limit_file: str, usage_file: str, inactive_key: str) -> tuple:
    """Walk from the cgroup up to ``base`` (a container sees its own cgroup as the root)."""
    best = (None, None, None)
    candidates = []
    path = base / rel.lstrip("/")
    while True:
        candidates.append(path)
        if path == base or base not in path.parents:
            break
        path = path.parent
    for cg in candidates:
        limit = _read_int(cg / limit_file)
        if limit is None or limit >= _UNLIMITED:
            continue
        used = (_read_int(cg / usage_file) or 0) - _stat_value(cg / "memory.stat", inactive_key)
        room = limit - max(0, used)
        if best[1] is None or room < best[1] - best[2]:
            best = (str(cg), limit, max(0, used))
    return best


def room(meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup"),
         cgroup_root: Path = Path("/sys/fs/cgroup")) -> Room:
    cg, limit, used = cgroup_room(proc_cgroup, cgroup_root)
    return Room(mem_available=mem_available(meminfo), cgroup=cg, cgroup_limit=limit, cgroup_used=used)


def check(need: Need, available: Room | None = None) -> Room:
    """Raise :class:`NotEnoughMemory` (one line with the numbers) unless ``need`` fits."""
    available = available or room()
    have = available.total
    if have is None or need.total <= have:
        return available
    parts = [f"images {_gib(need.image_bytes)}"]
    if need.weight_bytes:
        parts.append(f"weights {_gib(need.weight_bytes)}")
    if need.kv_cache_bytes:
        parts.append(f"KV cache {_gib(need.kv_cache_bytes)}")
    where = []
    if available.mem_available is not None:
        where.append(f"MemAvailable {_gib(available.mem_available)}")
    if available.cgroup_limit is not None:
        where.append(f"cgroup limit {_gib(available.cgroup_limit)} with {_gib(available.cgroup_used or 0)} in use")
    raise NotEnoughMemory(f"restore needs {_gib(need.total)} GiB ({', '.join(parts)}) but only {_gib(have)} GiB "
                          f"is available ({'; '.join(where)})",
                          fix="free memory, raise the memory limit, or restore a snapshot with a smaller "
                              "VLLM_CPU_KVCACHE_SPACE (or level 2, which keeps the weights out of the images)")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
