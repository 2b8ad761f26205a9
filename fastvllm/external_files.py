"""Files a process tree uses that CRIU does not put in its images.

CRIU stores anonymous memory, but for file-backed shared mappings and open files it stores
only a reference (path, size, offset). For a vLLM tree those are the ``/dev/shm`` segments
(``psm_*`` message queues, ``sem.*`` semaphores, and the ``link_remap.N`` hard links CRIU
makes for unlinked ones) and the server's log. They must be saved right after the dump and
put back, byte for byte and with hard links kept, before each restore.

Compiled kernels are the third kind: torch's inductor compiles a C++ kernel (a ``.so`` in
``TORCHINDUCTOR_CACHE_DIR``) the first time a request asks for log-probabilities, which the
canary does even with ``--enforce-eager``, and the worker keeps it mapped. A restore in a
fresh container, whose cache directory is empty, failed with "... existed when the snapshot
was taken but is missing now". They are saved too and put back only where missing: the
cache is content-addressed, and a file there may be mapped by another running server.
"""

from __future__ import annotations

import os
import stat
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_DELETED = " (deleted)"


@dataclass
class SavedFile:
    """One file to put back: its original path, the copy in the snapshot, and its inode group."""

    path: str
    stored_as: str
    size: int
    link_group: int  # files with the same group are hard links of one inode
    mode: int = 0o600  # CRIU checks size and mode of every file it reopens
    uid: int = 0
    gid: int = 0
    keep_existing: bool = False  # a compile-cache file: an existing one of the same size stays

    def to_json(self) -> dict:
        return asdict(self)


def shm_paths_of(pids: list[int]) -> set[str]:
    """Paths under /dev/shm that ``pids`` have open or mapped, plus the other names of the
    /dev/shm files they hold under a deleted name.

    glibc's ``sem_open`` creates a semaphore under a temporary name, maps it, links it to
    the real name (``sem.mp-*`` for Python's multiprocessing) and unlinks the temporary
    one: the creator's maps then show ``/dev/shm/sem.XXXXXX (deleted)`` while the file
    lives on as ``sem.mp-*``, which no process names. CRIU dumps the mapping through a
    ``link_remap`` link and kills the tree; the ``sem.mp-*`` name was left on the host,
    unused, after every snapshot (vLLM's worker creates one through tqdm's lock). Matched
    by inode, it is saved with the snapshot (as a hard link of the remap) and removed.
    """
    found: set[str] = set()
    inodes: set[int] = set()
    for pid in pids:
        named, held = _shm_held(pid)
        found |= named
        inodes |= held
    try:
        shm_dev = os.stat(SHM_DIR).st_dev
        names = os.listdir(SHM_DIR)
    except OSError:
        return found
    for name in names:
        if name.startswith(".fastvllm"):
            continue  # host-wide lock files
        try:
            st = os.lstat(SHM_DIR / name)
        except OSError:
            continue
        if st.st_dev == shm_dev and st.st_ino in inodes and stat.S_ISREG(st.st_mode):
            found.add(str(SHM_DIR / name))
    return found


def _shm_held(pid: int) -> tuple[set[str], set[int]]:
    """The /dev/shm files ``pid`` maps or holds open: their paths (deleted ones left out)
    and their inodes (under any name or none). One read of its maps and fds."""
    shm = str(SHM_DIR) + "/"
    named: set[str] = set()
    inodes: set[int] = set()
    for path, inode in _map_entries(pid):
        if path.startswith(shm):
            inodes.add(inode)
            if not path.endswith(_DELETED):
                named.add(path)
    for link, target in _fd_entries(pid):
        if target.startswith(shm):
            if not target.endswith(_DELETED):
                named.add(target)
            try:
                inodes.add(os.stat(link).st_ino)
            except OSError:
                continue
    return named, inodes


def compile_cache_roots(env: dict[str, str] | None = None) -> list[str]:
    """Where torch inductor, triton and vLLM keep compiled artifacts (their env vars, else
    their defaults)."""
    env = os.environ if env is None else env
    home = env.get("HOME") or str(Path.home())
    user = env.get("USER") or env.get("LOGNAME") or "root"
    roots = [env.get("TORCHINDUCTOR_CACHE_DIR") or f"/tmp/torchinductor_{user}",
             env.get("TRITON_CACHE_DIR") or f"{home}/.triton/cache",
             env.get("VLLM_CACHE_ROOT") or f"{env.get('XDG_CACHE_HOME') or home + '/.cache'}/vllm"]
    return [str(Path(r).absolute()) for r in roots]


def compile_cache_paths_of(pids: list[int], roots: list[str]) -> set[str]:
    """Files under ``roots`` that ``pids`` have open or mapped (compiled kernels)."""
    found: set[str] = set()
    prefixes = tuple(r.rstrip("/") + "/" for r in roots)
    for pid in pids:
        for path in _fd_targets(pid) | _mapped_files(pid):
            if path.startswith(prefixes) and not path.endswith(_DELETED) and os.path.isfile(path):
                found.add(path)
    return found


def link_remaps_in_shm() -> set[str]:
    """CRIU's ``link_remap.N`` files in /dev/shm (made on dump for unlinked-but-open files)."""
    try:
        return {str(SHM_DIR / n) for n in os.listdir(SHM_DIR) if re.fullmatch(r"link_remap\.\d+", n)}
    except FileNotFoundError:
        return set()


def _fd_entries(pid: int) -> list[tuple[str, str]]:
    """(``/proc/PID/fd/N``, what it points to) for each open fd of ``pid``."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        link = f"/proc/{pid}/fd/{fd}"
        try:
            out.append((link, os.readlink(link)))
        except OSError:
            continue
    return out


def _fd_targets(pid: int) -> set[str]:
    return {target for _, target in _fd_entries(pid)}


def _map_entries(pid: int) -> list[tuple[str, int]]:
    """(path, inode) of each file-backed mapping of ``pid`` (path as maps shows it)."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.append((parts[5].rstrip("\n"), int(parts[4])))
    except OSError:
        pass
    return out


def _mapped_files(pid: int) -> set[str]:
    return {path for path, _ in _map_entries(pid)}


def save(paths: set[str], dest: Path, keep_existing: set[str] = frozenset()) -> list[SavedFile]:
    """Copy ``paths`` into ``dest``; hard links among them are recorded, stored once. Those
    in ``keep_existing`` are put back only where missing (see the module's docstring)."""
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    saved: list[SavedFile] = []
    by_inode: dict[tuple[int, int], tuple[int, str]] = {}
    for index, path in enumerate(sorted(paths)):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in by_inode:
            group, stored = by_inode[key]
        else:
            group, stored = len(by_inode), f"{index:04d}-{Path(path).name}"
            _sparse_copy(Path(path), dest / stored)
            os.chmod(dest / stored, 0o600)
            by_inode[key] = (group, stored)
        saved.append(SavedFile(path=path, stored_as=stored, size=st.st_size, link_group=group,
                               mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid,
                               keep_existing=path in keep_existing))
    return saved


def put_back(saved: list[SavedFile], src: Path) -> list[str]:
    """Recreate each saved file at its original path; returns the paths written.

    An existing file at a path is replaced: these are fastvllm's own run-time files for this
    snapshot's tree, which is not running (restore checks its PIDs are free first).
    """
    written: list[str] = []
    first_of_group: dict[int, str] = {}
    for item in saved:
        target = Path(item.path)
        if item.keep_existing and target.is_file() and not target.is_symlink() \
                and target.stat().st_size == item.size:
            continue  # the same compiled kernel is already there (perhaps mapped by a server)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        if item.link_group in first_of_group:
            os.link(first_of_group[item.link_group], target)
        else:
            _sparse_copy(src / item.stored_as, target)
            os.chmod(target, item.mode)
            if os.geteuid() == 0:
                os.chown(target, item.uid, item.gid)
            first_of_group[item.link_group] = str(target)
        written.append(str(target))
    return written


def remove(paths) -> None:
    """Delete leftovers of a dead tree (never called while the tree runs)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _sparse_copy(src: Path, dst: Path, block: int = 1 << 20) -> None:
    """Copy keeping holes: the vLLM shm ring buffers are large and mostly never written."""
    zero = bytes(block)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(block):
            if chunk == zero[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()


def from_json(items: list[dict]) -> list[SavedFile]:
    return [SavedFile(**item) for item in items]
