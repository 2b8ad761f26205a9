"""The restore memory engines (copy, hugepage, mmap, lazy) on a 2 GiB process, real CRIU.

One dump of tests/programs/memhog.c, restored with every engine: the memory must come
back bit for bit (memhog recomputes its checksum over every page on SIGUSR1), and each
engine must leave its mark: mmap keeps the pages image mapped, hugepage leaves
AnonHugePages, lazy's daemon goes away once every page is served. CRIU restores the
original PIDs, so each restore first kills the previous one and waits for the PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastvllm import criu_ops

pytestmark = pytest.mark.integration

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
BIG_MIB = 2048
SMALL_MIB = 64


@pytest.fixture(scope="module")
def criu():
    found = criu_ops.find_criu()
    missing = [e for e in ("hugepage", "mmap") if e not in criu_ops.restore_memory_support(found)]
    if missing:
        pytest.skip(f"CRIU at {found.binary} lacks fastvllm's patches ({', '.join(missing)}): "
                    "run bash scripts/build_criu.sh")
    return found


@pytest.fixture(scope="module")
def memhog(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build tests/programs/memhog.c")
    out = tmp_path_factory.mktemp("memhog") / "memhog"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(PROGRAMS / "memhog.c")], check=True)
    return out


class Hog:
    """A memhog process (first the original, then whichever restore owns its PID)."""

    def __init__(self, binary: Path, workdir: Path, mib: int, mode: str = "fill", env: dict | None = None):
        self.dir = workdir
        self.out = workdir / "report.txt"
        self.log = workdir / "stdout.txt"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([str(binary), str(mib), str(self.out), mode], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        deadline = time.monotonic() + 120
        while not self.log.read_text().startswith("ready"):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.checksum = self.log.read_text().split()[1]

    def ask(self, pid: int, timeout: float = 120) -> dict[str, str]:
        """SIGUSR1 -> memhog touches every page and writes its report; parsed."""
        self.out.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not self.out.exists():
            assert time.monotonic() < deadline, "memhog did not answer"
            time.sleep(0.02)
        report = {}
        for line in self.out.read_text().splitlines():
            for part in line.replace("sum ", "sum=").split():
                key, _, value = part.partition("=")
                report[key] = value
        return report


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert criu_ops.wait_pids_free([pid], timeout=30) == {}, f"PID {pid} still taken"


def _dump(criu, hog: Hog) -> Path:
    images = hog.dir / "img"
    criu_ops.dump_tree(criu, hog.pid, images)
    hog.proc.wait(timeout=30)
    assert criu_ops.wait_pids_free([hog.pid], timeout=30) == {}
    return images


def _dumped_hog(criu, hog: "Hog"):
    """(hog, images) once ``hog`` is dumped; the hog is killed if the dump fails."""
    try:
        images = _dump(criu, hog)
    except BaseException:
        _kill(hog.pid)
        raise
    return hog, images


@pytest.fixture(scope="module")
def big(criu, memhog, tmp_path_factory):
    return _dumped_hog(criu, Hog(memhog, tmp_path_factory.mktemp("big"), BIG_MIB))


@pytest.fixture(scope="module")
def small(criu, memhog, tmp_path_factory):
    return _dumped_hog(criu, Hog(memhog, tmp_path_factory.mktemp("small"), SMALL_MIB, mode="alloc"))


@pytest.fixture(scope="module")
def small_heap(criu, memhog, tmp_path_factory):
    """As ``small``, but its malloc chunks live in the brk heap (glibc's main arena)."""
    return _dumped_hog(criu, Hog(memhog, tmp_path_factory.mktemp("small-heap"), SMALL_MIB, mode="alloc",
                                 env={"MALLOC_ARENA_MAX": "1"}))


def _image_mapped_in_heap(pid: int, images: Path) -> bool:
    """Whether a piece of the pages image is mapped inside the process's brk heap: between
    ``start_brk`` (/proc/PID/stat field 47) and the current break, which is the end of the
    last VMA that starts in that range (the heap is one run of VMAs once pieces are mapped)."""
    start_brk = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[44])
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo = int(line.split("-", 1)[0], 16)
        if str(images / "pages-") in line and start_brk <= lo < start_brk + (1 << 32):
            return True
    return False


def _heap_huge_kib(pid: int) -> int:
    """AnonHugePages of the [heap] VMA (its anonymous part)."""
    in_heap, total = False, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:
            in_heap = line.rstrip().endswith("[heap]")
        elif in_heap and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def _smaps_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("engine", ["copy", "hugepage", "mmap", "lazy"])
def test_each_engine_restores_every_byte(criu, big, engine):
    hog, images = big
    why = criu_ops.memory_engines(criu)[engine]
    if why:
        pytest.skip(f"{engine}: {why}")
    if engine == "hugepage":
        # Correctness, not speed: free page reporting (which makes hugepage slow on VMs and
        # so makes hugepages_ready() say no there) does not stop the kernel handing them out.
        ready, why = criu_ops.hugepages_ready(BIG_MIB << 20, reporting=False)
        if not ready:
            pytest.skip(f"hugepage: {why}")
    pid, log = criu_ops.restore_tree(criu, images, criu_ops.RestoreOptions(memory=engine))
    try:
        assert pid == hog.pid, "CRIU restores the original PID"
        stats = criu_ops.memory_stats(log)
        maps = Path(f"/proc/{pid}/maps").read_text()
        mapped_image = str(images / "pages-") in maps
        huge_kib = _smaps_kib(pid, "AnonHugePages")
        assert hog.ask(pid)["sum"] == hog.checksum, f"{engine}: memory differs after restore"
        if engine == "mmap":
            assert mapped_image, "mmap: the pages image is not mapped into the restored process"
            assert stats["mapped_bytes"] >= (BIG_MIB << 20) * 0.99 and stats["tasks"] == 1, stats
            # RPC (criu swrk) gets the engine through the environment, the CLI through the option
            via = "$CRIU_RESTORE_MEMORY" if criu_ops._pycriu_available() else "--restore-memory"
            assert stats["engine"] == "mmap" and stats["engine_from"] == via, stats
        else:
            assert not mapped_image, f"{engine} must not leave the image mapped"
        if engine == "hugepage":
            assert huge_kib > 0, "hugepage: no AnonHugePages in the restored process"
            assert stats["hugepage_bytes"] >= BIG_MIB << 20 and stats["engine"] == "hugepage", stats
        if engine == "copy":
            assert stats["engine"] == "copy" and stats["read_bytes"] >= BIG_MIB << 20 and stats["mapped_bytes"] == 0
        if engine == "lazy":
            daemon = criu_ops._LAZY_DAEMONS[-1]
            assert daemon.wait(timeout=60) == 0, "the lazy-pages daemon did not finish after every page was touched"
    finally:
        _kill(pid)


def test_allocator_after_mmap_restore(criu, small):
    """What released memory gives back when it is a private file mapping of the image.

    The raw mmap'd area: MADV_DONTNEED drops the private copy and the next read faults the
    page back in *from the image* (the dump-time bytes), where anonymous memory reads zeros.
    glibc's calloc after free + malloc_trim (which madvises the arena's free pages away)
    still returns zeros, because glibc clears any memory it hands out again instead of
    trusting the kernel to have zeroed it.
    """
    hog, images = small
    seen = {}
    for engine in ("copy", "mmap"):
        pid, _ = criu_ops.restore_tree(criu, images, criu_ops.RestoreOptions(memory=engine))
        try:
            seen[engine] = hog.ask(pid)
        finally:
            _kill(pid)
    assert seen["copy"]["raw"] == "zero", seen
    assert seen["mmap"]["raw"] == "image", seen
    for engine in seen:
        assert seen[engine]["calloc_nonzero"] == "0", seen
        assert seen[engine]["sum"] == hog.checksum, seen


def test_main_heap_after_mmap_restore(criu, small_heap):
    """The brk heap is mapped from the image too (patch 0003), and glibc's main arena stays
    correct on it: free + malloc_trim(0) (MADV_DONTNEED of free chunks inside the heap and a
    brk shrink) then calloc of the same sizes (which grows brk again and trusts the kernel
    for zeros only there) still returns zeros, and every byte comes back."""
    hog, images = small_heap
    engines = ["copy", "mmap"]
    if criu_ops.hugepages_ready(SMALL_MIB << 20, reporting=False)[0]:
        engines.append("hugepage")  # correctness only: free page reporting does not stop THP
    seen = {}
    for engine in engines:
        pid, _ = criu_ops.restore_tree(criu, images, criu_ops.RestoreOptions(memory=engine))
        try:
            seen[engine] = {"heap_mapped": _image_mapped_in_heap(pid, images), "heap_huge_kib": _heap_huge_kib(pid),
                            **hog.ask(pid)}
            assert hog.ask(pid)["sum"] == hog.checksum, f"{engine}: second look differs"
        finally:
            _kill(pid)
    assert seen["mmap"]["heap_mapped"] and not seen["copy"]["heap_mapped"], seen
    if "hugepage" in seen:  # the hugepage engine advises the heap before the fill
        assert seen["hugepage"]["heap_huge_kib"] > 0 and seen["copy"]["heap_huge_kib"] == 0, seen
    for engine in seen:
        assert seen[engine]["calloc_nonzero"] == "0", seen
        assert seen[engine]["sum"] == hog.checksum, seen


def test_failed_lazy_restore_kills_its_daemon(criu, small):
    """A restore that fails (its PID is taken) must not leave a lazy-pages daemon behind."""
    hog, images = small
    if criu_ops.memory_engines(criu)["lazy"]:
        pytest.skip("no userfaultfd")
    pid, _ = criu_ops.restore_tree(criu, images, criu_ops.RestoreOptions(memory="copy"))
    try:
        before = set(criu_ops._LAZY_DAEMONS)
        with pytest.raises(criu_ops.CriuFailed):
            criu_ops.restore_tree(criu, images, criu_ops.RestoreOptions(memory="lazy"))
        assert set(criu_ops._LAZY_DAEMONS) <= before, "a failed restore registered its daemon"
        assert not [p for p in _lazy_pids() if p not in {d.pid for d in before}], "a lazy-pages daemon survived"
    finally:
        _kill(pid)


def _lazy_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(cmd) > 1 and cmd[1] == b"lazy-pages" and cmd[0].endswith(b"criu"):
                pids.append(int(entry.name))
    return pids
