"""Exec a command with io_uring blocked for it and its descendants only.

CRIU cannot dump an io_uring, and uvloop's libuv opens one in the API server. The known
machine-wide fix is ``sysctl kernel.io_uring_disabled=2``; instead a seccomp filter makes
``io_uring_setup`` fail with EPERM in this process tree only (exactly what the sysctl does),
and libuv falls back to epoll. The filter survives exec and fork, and CRIU restores it.

Usage: ``python -m fastvllm.io_uring_guard CMD [ARGS...]``
"""

import errno
import os
import sys

IO_URING_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")


def install_filter() -> None:
    """Load a seccomp filter that answers io_uring syscalls with EPERM."""
    import pyseccomp as seccomp

    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in IO_URING_SYSCALLS:
        flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
    flt.load()


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m fastvllm.io_uring_guard CMD [ARGS...]")
    install_filter()
    os.execvp(argv[0], argv)


_PROBE = (
    "import ctypes, ctypes.util, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "params = ctypes.create_string_buffer(120)\n"
    "fd = libc.syscall(425, 1, params)\n"  # 425: io_uring_setup on every Linux arch
    "sys.exit(0 if fd < 0 and ctypes.get_errno() == 1 else 3)\n"
)


def guard_works() -> bool:
    """True when a child started under the guard gets EPERM from io_uring_setup."""
    import subprocess

    try:
        proc = subprocess.run([sys.executable, "-m", "fastvllm.io_uring_guard", sys.executable, "-c", _PROBE],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


if __name__ == "__main__":
    main(sys.argv[1:])
