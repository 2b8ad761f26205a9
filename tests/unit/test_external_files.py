"""Files outside CRIU's images are found from a live process, saved, and put back byte for
byte, with their mode, their holes and their hard links."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fastvllm import external_files
from fastvllm.external_files import SavedFile, from_json, link_remaps_in_shm, put_back, save, shm_paths_of

MiB = 1 << 20


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def shm_cleanup():
    """Paths registered here are removed when the test ends, whatever happened."""
    made: list[Path] = []
    yield made
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture
def shm_name(shm_cleanup):
    """Unique /dev/shm paths for this test (all removed afterwards)."""
    tag = f"fastvllm-unit-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def make(suffix: str) -> Path:
        path = Path("/dev/shm") / f"{tag}-{suffix}"
        shm_cleanup.append(path)
        return path

    return make


# --------------------------------------------------------------------------- save / put_back


def test_hard_links_mode_and_content_survive_save_and_put_back(tmp_path):
    orig = tmp_path / "orig"
    orig.mkdir()
    a, b, c = orig / "a-psm", orig / "b-link", orig / "c-sem"
    a.write_bytes(b"shared inode contents\n" * 100)
    os.link(a, b)
    c.write_bytes(os.urandom(5000))
    os.chmod(a, 0o640)
    os.chmod(c, 0o751)
    content_a, content_c = a.read_bytes(), c.read_bytes()
    assert os.stat(a).st_ino == os.stat(b).st_ino

    store = tmp_path / "store"
    saved = save({str(a), str(b), str(c)}, store)

    by_path = {item.path: item for item in saved}
    assert set(by_path) == {str(a), str(b), str(c)}
    assert by_path[str(a)].link_group == by_path[str(b)].link_group != by_path[str(c)].link_group
    assert by_path[str(a)].stored_as == by_path[str(b)].stored_as  # one copy per inode
    assert len(list(store.iterdir())) == 2
    assert _mode(store) == 0o700
    assert all(_mode(p) == 0o600 for p in store.iterdir())
    assert by_path[str(a)].mode == 0o640 and by_path[str(c)].mode == 0o751
    assert by_path[str(a)].size == len(content_a)

    # Through JSON, as the manifest stores them.
    restored = from_json([item.to_json() for item in saved])
    assert restored == saved

    for p in (a, b, c):
        p.unlink()
    written = put_back(restored, store)

    assert sorted(written) == sorted([str(a), str(b), str(c)])
    assert a.read_bytes() == content_a and b.read_bytes() == content_a
    assert c.read_bytes() == content_c
    assert os.stat(a).st_ino == os.stat(b).st_ino != os.stat(c).st_ino
    assert os.stat(a).st_nlink == 2 and os.stat(c).st_nlink == 1
    assert _mode(a) == _mode(b) == 0o640
    assert _mode(c) == 0o751
    st = os.stat(c)
    assert (st.st_uid, st.st_gid) == (by_path[str(c)].uid, by_path[str(c)].gid)


def test_sparse_file_stays_sparse(tmp_path):
    src = tmp_path / "ring"
    size = 24 * MiB
    with open(src, "wb") as fh:
        fh.write(b"head")
        fh.seek(20 * MiB + 123)
        fh.write(b"middle data")
        fh.truncate(size)  # ends in a hole
    if os.stat(src).st_blocks * 512 > 8 * MiB:
        pytest.skip(f"{tmp_path} does not keep holes (filesystem without sparse files)")
    original = src.read_bytes()

    store = tmp_path / "store"
    saved = save({str(src)}, store)
    stored = store / saved[0].stored_as
    assert stored.stat().st_size == size
    assert stored.stat().st_blocks * 512 <= 4 * MiB, stored.stat().st_blocks
    assert stored.read_bytes() == original

    src.unlink()
    put_back(saved, store)
    st = os.stat(src)
    assert st.st_size == size
    assert st.st_blocks * 512 <= 4 * MiB, st.st_blocks
    data = src.read_bytes()
    assert data == original
    assert data[:4] == b"head" and data[20 * MiB + 123: 20 * MiB + 134] == b"middle data"


def test_empty_file_round_trips(tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    saved = save({str(src)}, tmp_path / "store")
    src.unlink()
    put_back(saved, tmp_path / "store")
    assert src.is_file() and src.stat().st_size == 0


def test_put_back_replaces_existing_file_without_writing_through_it(tmp_path):
    target = tmp_path / "psm_1"
    target.write_bytes(b"saved contents")
    os.chmod(target, 0o600)
    store = tmp_path / "store"
    saved = save({str(target)}, store)

    # Something else now sits at the path, hard linked from elsewhere and with another mode.
    target.unlink()
    target.write_bytes(b"a much longer stale file that must go away entirely")
    os.chmod(target, 0o644)
    other = tmp_path / "other-link"
    os.link(target, other)

    put_back(saved, store)
    assert target.read_bytes() == b"saved contents"
    assert _mode(target) == 0o600
    assert os.stat(target).st_ino != os.stat(other).st_ino
    assert other.read_bytes() == b"a much longer stale file that must go away entirely"


def test_put_back_replaces_symlink_and_creates_parent(tmp_path):
    target = tmp_path / "sub" / "log"
    target.parent.mkdir()
    target.write_text("server log\n")
    store = tmp_path / "store"
    saved = save({str(target)}, store)
    shutil.rmtree(target.parent)
    put_back(saved, store)
    assert target.read_text() == "server log\n"

    victim = tmp_path / "victim"
    victim.write_text("do not touch")
    target.unlink()
    target.symlink_to(victim)
    put_back(saved, store)
    assert not target.is_symlink() and target.read_text() == "server log\n"
    assert victim.read_text() == "do not touch"


def test_save_skips_vanished_paths(tmp_path):
    real = tmp_path / "real"
    real.write_text("x")
    saved = save({str(real), str(tmp_path / "gone")}, tmp_path / "store")
    assert [s.path for s in saved] == [str(real)]


def test_remove_ignores_missing(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    external_files.remove([str(f), str(tmp_path / "never")])
    assert not f.exists()


# --------------------------------------------------------------------------- live process discovery

_CHILD = r"""
import ctypes, mmap, os, sys, time
mapped_only, fd_only, deleted = sys.argv[1:4]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
# 1. mapped, fd closed: visible only in /proc/PID/maps
fd = os.open(mapped_only, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 8192)
addr = libc.mmap(None, 8192, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)
# 2. open, not mapped: visible only in /proc/PID/fd
held = open(fd_only, "wb")
# 3. open and mapped, then unlinked (like a POSIX semaphore after sem_unlink)
fd3 = os.open(deleted, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd3, 4096)
m3 = mmap.mmap(fd3, 4096)
os.unlink(deleted)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def shm_child(shm_name):
    paths = [shm_name("mapped"), shm_name("fdonly"), shm_name("deleted")]
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, paths)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"child failed: {line!r} {proc.stderr.read()}")
        yield proc, paths
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_shm_paths_of_real_process(shm_child):
    proc, (mapped, fd_only, deleted) = shm_child
    # The child really exercises both sources.
    assert str(mapped) in external_files._mapped_files(proc.pid)
    assert str(mapped) not in external_files._fd_targets(proc.pid)
    assert str(fd_only) in external_files._fd_targets(proc.pid)
    assert f"{deleted} (deleted)" in external_files._mapped_files(proc.pid)

    found = shm_paths_of([proc.pid])
    tag = mapped.name.rsplit("-", 1)[0]
    ours = {p for p in found if tag in p}
    assert ours == {str(mapped), str(fd_only)}
    assert not any(p.endswith("(deleted)") for p in found)
    assert all(p.startswith("/dev/shm/") for p in found)


def test_shm_paths_of_ignores_dead_pids_and_non_shm(shm_child, tmp_path):
    proc, (mapped, _, _) = shm_child
    # Our own process maps python's shared libraries: none of them may be reported.
    assert not {p for p in shm_paths_of([os.getpid()]) if not p.startswith("/dev/shm/")}
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert shm_paths_of([pid_max + 1]) == set()
    assert str(mapped) in shm_paths_of([pid_max + 1, proc.pid])


def test_link_remaps_in_shm_finds_real_file(shm_cleanup):
    n = 900_000_000 + uuid.uuid4().int % 99_999_999
    remap = Path("/dev/shm") / f"link_remap.{n}"
    decoy = Path("/dev/shm") / f"link_remap.{n}x"
    shm_cleanup += [remap, decoy]
    assert str(remap) not in link_remaps_in_shm()
    remap.write_bytes(b"sem")
    decoy.write_bytes(b"not a remap")
    found = link_remaps_in_shm()
    assert str(remap) in found
    assert str(decoy) not in found
    assert all(Path(p).name.startswith("link_remap.") for p in found)
    remap.unlink()
    assert str(remap) not in link_remaps_in_shm()


def test_saved_file_json_defaults():
    item = from_json([{"path": "/dev/shm/x", "stored_as": "0000-x", "size": 3, "link_group": 0}])[0]
    assert item == SavedFile("/dev/shm/x", "0000-x", 3, 0, 0o600, 0, 0)


def test_compile_cache_kernels_are_found_saved_and_put_back_only_where_missing(tmp_path):
    """A compiled kernel the tree maps from a cache dir is saved; on restore it is written
    back where missing and left alone where the same file already is (another server may
    map it)."""
    import mmap

    from fastvllm import external_files as ef

    cache = tmp_path / "inductor"
    (cache / "ab").mkdir(parents=True)
    kernel = cache / "ab" / "k.so"
    kernel.write_bytes(b"\x7fELF" + bytes(8188))
    other = tmp_path / "elsewhere.so"
    other.write_bytes(b"x" * 4096)
    with open(kernel, "rb") as fa, open(other, "rb") as fb:
        ma, mb = mmap.mmap(fa.fileno(), 0, prot=mmap.PROT_READ), mmap.mmap(fb.fileno(), 0, prot=mmap.PROT_READ)
        try:
            found = ef.compile_cache_paths_of([os.getpid()], [str(cache)])
        finally:
            ma.close()
            mb.close()
    assert found == {str(kernel)}
    assert ef.compile_cache_roots({"TORCHINDUCTOR_CACHE_DIR": str(cache), "HOME": "/h"})[0] == str(cache)
    saved = ef.save(found, tmp_path / "snap-external", keep_existing=found)
    assert saved[0].keep_existing
    before = kernel.stat().st_ino
    assert ef.put_back(saved, tmp_path / "snap-external") == []  # present, same size: untouched
    assert kernel.stat().st_ino == before
    kernel.unlink()
    assert ef.put_back(saved, tmp_path / "snap-external") == [str(kernel)]
    assert kernel.read_bytes().startswith(b"\x7fELF")
