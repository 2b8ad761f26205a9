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


if __name__ == "__main__":
    main(sys.argv[1:])
