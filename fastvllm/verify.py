"""``fastvllm verify SNAPSHOT``: is every file of a snapshot the one that was written?

A flipped byte in ``pages-N.img`` restores wrong memory, and only the 16-token canary would
stand in its way (issue 12, case 6). Snapshots are copied between volumes and hosts, kept
for days and read by other nodes, so a user (or a pod's init step) needs one command that
proves a snapshot intact before it is trusted.

Every CRIU image was sealed at snapshot time (:mod:`fastvllm.integrity`: an xxh3-128
digest each, recorded in the manifest). ``verify`` always recomputes every digest, never
trusting the cheap inode/ctime identity that restore uses: verify exists for the case
where the bytes themselves are in doubt (bit rot, a bad copy). Files without a recorded
digest (``external/``, copied weights) are checked for presence and size. An image file
in ``criu/`` that the seal does not list is a mismatch too: CRIU reads images by name, so
an added file could change what is restored.

Verdicts per file: ``ok`` (digest matches), ``size-ok`` (no digest recorded; size
matches), ``changed`` (digest or size differs), ``missing``, ``unsealed`` (an image the
seal does not list).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import integrity, manifest
from .errors import SnapshotInvalid

BAD = ("changed", "missing", "unsealed")


@dataclass
class FileVerdict:
    path: str  # relative to the snapshot
    verdict: str
    detail: str = ""


@dataclass
class Report:
    snapshot: str
    files: list[FileVerdict] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def bad(self) -> list[FileVerdict]:
        return [f for f in self.files if f.verdict in BAD]

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_json(self) -> dict:
        return {"snapshot": self.snapshot, "ok": self.ok, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3), "files": [asdict(f) for f in self.files]}

    def problem(self) -> str:
        """One line naming the first bad file (and how many more)."""
        first = self.bad[0]
        more = f" (and {len(self.bad) - 1} more bad files)" if len(self.bad) > 1 else ""
        return f"{self.snapshot}: {first.path} {first.detail}{more}"


def verify_snapshot(snapshot: Path) -> Report:
    """Check every file of ``snapshot``; raises :class:`SnapshotInvalid` only when there is
    nothing to check against (no manifest, no seal)."""
    snapshot = Path(snapshot).absolute()
    record = _read_manifest(snapshot)
    sealed: dict = record.get("images") or {}
    if not sealed:
        raise SnapshotInvalid(f"{snapshot} has no image digests to verify against (taken by an older fastvllm)",
                              fix="take a new snapshot with this fastvllm")
    report = Report(snapshot=str(snapshot))
    t0 = time.monotonic()
    images = snapshot / manifest.CRIU_DIR
    for name, entry in sorted(sealed.items()):
        rel = f"{manifest.CRIU_DIR}/{name}"
        path = images / name
        if not path.is_file():
            report.files.append(FileVerdict(rel, "missing", "is missing"))
            continue
        got = integrity.digest(path)
        report.bytes_read += path.stat().st_size
        if got == entry.get("xxh3_128"):
            report.files.append(FileVerdict(rel, "ok"))
        else:
            report.files.append(FileVerdict(rel, "changed", f"does not match its xxh3-128 digest "
                                                            f"(sealed {entry.get('xxh3_128')}, now {got})"))
    if images.is_dir():
        for path in sorted(images.iterdir()):
            if path.name not in sealed:
                report.files.append(FileVerdict(f"{manifest.CRIU_DIR}/{path.name}", "unsealed",
                                                "is in criu/ but not in the snapshot's seal"))
    for rel, size in sorted((record.get("files") or {}).items()):
        if rel.startswith(manifest.CRIU_DIR + "/"):
            continue  # digested above
        path = snapshot / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            report.files.append(FileVerdict(rel, "missing", "is missing"))
            continue
        if actual == size:
            report.files.append(FileVerdict(rel, "size-ok", "no digest recorded; size matches"))
        else:
            report.files.append(FileVerdict(rel, "changed", f"is {actual} bytes, manifest says {size}"))
    report.seconds = time.monotonic() - t0
    return report


def _read_manifest(snapshot: Path) -> dict:
    """The manifest's ``images`` and ``files`` records. Not :func:`manifest.load`: that stops
    at the first file of the wrong size, and verify reports on every file."""
    path = snapshot / manifest.MANIFEST
    if not snapshot.is_dir():
        raise SnapshotInvalid(f"{snapshot} is not a directory", fix="pass a directory made by fastvllm snapshot")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise SnapshotInvalid(f"{snapshot} has no {manifest.MANIFEST}: not a fastvllm snapshot (or an incomplete one)",
                              fix="pass a directory made by fastvllm snapshot") from None
    except (OSError, ValueError) as exc:
        raise SnapshotInvalid(f"{path} is unreadable or corrupt ({exc.__class__.__name__})",
                              fix="take a new snapshot") from None
    if not isinstance(record, dict) or record.get("format") != manifest.FORMAT:
        raise SnapshotInvalid(f"{path} is not a fastvllm manifest", fix="take a new snapshot")
    if not isinstance(record.get("images", {}), dict) or not isinstance(record.get("files", {}), dict):
        raise SnapshotInvalid(f"{path} is malformed (images or files has the wrong type)", fix="take a new snapshot")
    return record
