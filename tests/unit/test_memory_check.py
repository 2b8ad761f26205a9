"""Memory preflight against real meminfo/cgroup files written by the test (v1 and v2)."""

from __future__ import annotations

import pytest

from fastvllm import memory_check
from fastvllm.memory_check import GIB, Need, NotEnoughMemory


def _meminfo(tmp_path, avail_gib: float):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       25165824 kB\nMemFree:         1000000 kB\n"
                    f"MemAvailable:   {int(avail_gib * GIB / 1024)} kB\n")
    return path


def _v2(tmp_path, rel: str, files: dict[str, dict[str, str]]):
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for sub, content in files.items():
        d = root / sub if sub else root
        d.mkdir(parents=True, exist_ok=True)
        for name, text in content.items():
            (d / name).write_text(text)
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::{rel}\n")
    return proc, root


def _v1(tmp_path, rel: str, limit: int, usage: int, inactive: int = 0):
    root = tmp_path / "cg1"
    d = root / "memory" / rel.lstrip("/")
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 0\ninactive_file 999\ntotal_inactive_file {inactive}\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc = tmp_path / "cgroup"
    proc.write_text(f"12:pids:/\n4:memory:{rel}\n0::/\n")
    return proc, root


def test_need_by_level():
    assert Need.for_level(0, 10 * GIB, 6 * GIB, 1).total == 10 * GIB
    assert Need.for_level(1, 10 * GIB, 6 * GIB, 1).total == 11 * GIB
    assert Need.for_level(2, 1 * GIB, 6 * GIB, 1.5).total == int(8.5 * GIB)


def test_mem_available_alone_without_cgroup_limit(tmp_path):
    proc, root = _v2(tmp_path, "/user.slice", {"user.slice": {"memory.max": "max\n", "memory.current": "100\n"}})
    room = memory_check.room(_meminfo(tmp_path, 20), proc, root)
    assert room.cgroup_limit is None and room.total == 20 * GIB
    memory_check.check(Need(image_bytes=19 * GIB), room)
    with pytest.raises(NotEnoughMemory) as info:
        memory_check.check(Need(image_bytes=19 * GIB, kv_cache_bytes=2 * GIB), room)
    line = str(info.value)
    assert "\n" not in line
    assert "needs 21.00 GiB (images 19.00, KV cache 2.00) but only 20.00 GiB" in line
    assert "MemAvailable 20.00" in line and "cgroup" not in line.split(";")[0]


def test_cgroup_v2_limit_binds_minus_working_set(tmp_path):
    proc, root = _v2(tmp_path, "/kubepods/pod1/ctr", {
        "kubepods/pod1/ctr": {"memory.max": f"{8 * GIB}\n", "memory.current": f"{3 * GIB}\n",
                              "memory.stat": f"anon 100\ninactive_file {1 * GIB}\n"},
        "kubepods/pod1": {"memory.max": "max\n"},
    })
    room = memory_check.room(_meminfo(tmp_path, 20), proc, root)
    assert room.cgroup_limit == 8 * GIB and room.cgroup_used == 2 * GIB and room.total == 6 * GIB
    assert room.cgroup.endswith("kubepods/pod1/ctr")
    with pytest.raises(NotEnoughMemory, match=r"only 6.00 GiB .*cgroup limit 8.00 with 2.00 in use"):
        memory_check.check(Need.for_level(2, 1 * GIB, 5 * GIB, 1), room)


def test_cgroup_v2_an_ancestor_can_be_tighter(tmp_path):
    proc, root = _v2(tmp_path, "/pod/ctr", {
        "pod/ctr": {"memory.max": f"{8 * GIB}\n", "memory.current": f"{1 * GIB}\n"},
        "pod": {"memory.max": f"{4 * GIB}\n", "memory.current": f"{3 * GIB}\n"},
    })
    room = memory_check.room(_meminfo(tmp_path, 20), proc, root)
    assert room.cgroup.endswith("/pod") and room.total == 1 * GIB


def test_cgroup_v1_limit_and_unlimited_root(tmp_path):
    proc, root = _v1(tmp_path, "/docker/abc", limit=4 * GIB, usage=2 * GIB, inactive=GIB // 2)
    room = memory_check.room(_meminfo(tmp_path, 20), proc, root)
    assert room.cgroup_limit == 4 * GIB and room.cgroup_used == int(1.5 * GIB)
    assert room.total == int(2.5 * GIB)
    with pytest.raises(NotEnoughMemory, match="cgroup limit 4.00"):
        memory_check.check(Need(image_bytes=3 * GIB), room)


def test_cgroup_v1_unlimited_leaves_meminfo(tmp_path):
    proc, root = _v1(tmp_path, "/docker/abc", limit=9223372036854771712, usage=2 * GIB)
    room = memory_check.room(_meminfo(tmp_path, 5), proc, root)
    assert room.cgroup_limit is None and room.total == 5 * GIB


def test_container_view_where_its_cgroup_is_the_root(tmp_path):
    # Inside a cgroup namespace /proc/self/cgroup says "/" and the limit sits at the root.
    proc, root = _v2(tmp_path, "/", {"": {"memory.max": f"{2 * GIB}\n", "memory.current": "0\n"}})
    assert memory_check.room(_meminfo(tmp_path, 20), proc, root).total == 2 * GIB


def test_unreadable_sources_do_not_block(tmp_path):
    room = memory_check.room(tmp_path / "none", tmp_path / "none", tmp_path / "none")
    assert room.total is None
    memory_check.check(Need(image_bytes=10**15), room)


def test_this_host_reads(tmp_path):
    room = memory_check.room()
    assert room.mem_available and room.total and room.total <= room.mem_available
    assert set(room.to_json()) >= {"mem_available", "cgroup_limit", "total"}
