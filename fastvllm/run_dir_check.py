"""The run directory must be ours before anything in it is trusted.

fastvllm keeps server records (which ``stop --all`` kills), logs, locks and partial-snapshot
records in the run directory, by default ``/var/tmp/fastvllm``: a path under a
world-writable directory. Another local user could create it first and plant symlinks or
fake records there (issue 12). So before use the directory must be

- a real directory, not a symlink (checked with ``O_NOFOLLOW`` on the open, then ``fstat``
  of that same open directory, so a swap between check and use does not pass);
- owned by the effective user;
- not writable by group or others (nobody else can have planted anything in it).

A directory we own that is merely readable by others (0755) is tightened to 0700 in place:
nothing could have been planted, and its files (logs, records) should not be readable.
The subdirectories need no check of their own: only the owner can create entries inside
a 0700 directory. Later uses go by path, so a parent directory someone else could rename
entries in would reopen a window; the default parent, ``/var/tmp``, is sticky (only an
entry's owner can rename or remove it), as ``/tmp`` is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import FastvllmError


class RunDirUnsafe(FastvllmError):
    """The run directory is a symlink, someone else's, or writable by others."""


def check(path: Path) -> Path:
    """Raise :class:`RunDirUnsafe` unless ``path`` is a safe run directory; returns it.

    Tightens a directory of ours that is only readable by others to 0700.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise RunDirUnsafe(f"run directory {path} is a symlink (to {os.readlink(path)})",
                               fix="remove it, or set FASTVLLM_RUN_DIR to a directory you own") from None
        raise RunDirUnsafe(f"run directory {path} cannot be opened ({exc.strerror})",
                           fix="set FASTVLLM_RUN_DIR to a directory you own") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):  # pragma: no cover - O_DIRECTORY already refuses
            raise RunDirUnsafe(f"run directory {path} is not a directory", fix="set FASTVLLM_RUN_DIR")
        me = os.geteuid()
        if st.st_uid != me:
            raise RunDirUnsafe(f"run directory {path} is owned by uid {st.st_uid}, not by you (uid {me})",
                               fix=f"remove {path} (someone else created it) or set FASTVLLM_RUN_DIR "
                                   "to a directory you own")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise RunDirUnsafe(f"run directory {path} is writable by others (mode {mode:04o})",
                               fix=f"check its contents, then chmod 700 {path}, or set FASTVLLM_RUN_DIR "
                                   "to a fresh directory")
        if mode & 0o077:
            try:
                os.fchmod(fd, 0o700)
            except OSError:  # a read-only mount: readable is not plantable, go on
                pass
    finally:
        os.close(fd)
    return path
