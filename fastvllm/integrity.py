"""Proof that a snapshot's CRIU images are the bytes that were dumped.

The ``mmap`` memory engine maps the page images into the restored processes
(``MAP_PRIVATE``): every page a server has not written to yet is read from the image
file whenever it faults in, for as long as the server runs. An image changed after the
dump would silently change the server's memory, so before such a restore the images must
be shown unchanged, and they must stay unchanged while it runs.

- At snapshot time every CRIU image gets an xxh3-128 digest (read right after the dump,
  while the files are still in the page cache), is made read-only (0400), and its
  identity (inode, size, mtime, ctime) is recorded *after* the chmod.
- Before a restore that maps the images, a matching identity is taken as proof: ctime
  cannot be set back from user space, so any write, truncate or chmod since shows (so does
  a new hard link, which then costs a digest check but is accepted). When
  the identity differs (the snapshot was copied to another volume or host, or touched)
  the digests are recomputed and compared, which costs a read of the images (~1-3 GB/s).

Every other engine checks the same way before CRIU runs (a flipped byte would restore
wrong memory, with only the canary in the way), unless ``restore --trust-images``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SnapshotInvalid

_CHUNK = 8 << 20


def digest(path: Path) -> str:
    """xxh3-128 of a file's bytes, as hex."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def identity(path: Path) -> list[int]:
    """What changes whenever a file's bytes (or mode) do: inode, size, mtime, ctime (ns)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def seal(images_dir: Path) -> dict[str, dict]:
    """Digest every image, make it read-only, then record its identity; returns
    ``{name: {"xxh3_128": hex, "identity": [...]}}`` for the manifest."""
    record = {}
    for path in sorted(p for p in images_dir.iterdir() if p.is_file()):
        record[path.name] = {"xxh3_128": digest(path)}
        path.chmod(0o400)
    for path in sorted(p for p in images_dir.iterdir() if p.is_file()):
        record[path.name]["identity"] = identity(path)
    return record


@dataclass
class Verdict:
    """How a check ended: ``by`` is "identity" (cheap) or "digest" (recomputed)."""

    by: str
    files: int


def check_unchanged(images_dir: Path, record: dict[str, dict] | None, *, why: str) -> Verdict:
    """Raise :class:`SnapshotInvalid` unless every recorded image is unchanged."""
    if not record:
        raise SnapshotInvalid(f"this snapshot has no image digests, which {why} needs",
                              fix="take a new snapshot with this fastvllm, or restore with --memory copy")
    slow = []
    for name, entry in record.items():
        path = images_dir / name
        try:
            if identity(path) == entry.get("identity"):
                continue
        except FileNotFoundError:
            raise SnapshotInvalid(f"CRIU image {name} is missing", fix="the snapshot is damaged; take a new one") from None
        slow.append((name, path, entry.get("xxh3_128")))
    for name, path, want in slow:
        if digest(path) != want:
            raise SnapshotInvalid(f"CRIU image {name} changed after the snapshot was taken, which {why} cannot allow",
                                  fix="take a new snapshot (or restore with --memory copy, at your own risk)")
    return Verdict(by="digest" if slow else "identity", files=len(record))


def mapped_images(pids: list[int]) -> dict[int, str]:
    """PIDs whose memory maps a CRIU page image (a tree restored with ``mmap``), with one
    such path each: dumping them would make the new snapshot depend on the old one's files."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6:
                        name = os.path.basename(parts[5].strip())
                        if name.startswith("pages-") and name.endswith(".img"):
                            found[pid] = parts[5].strip()
                            break
        except OSError:
            continue
    return found
