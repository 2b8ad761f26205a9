"""The root process of every server tree fastvllm starts: blocks io_uring, runs the
server as its child, forwards signals, exits with the server's status.

Why a separate root:
- CRIU cannot dump an io_uring, and uvloop's libuv opens one in the API server. The known
  fix is machine-wide (``sysctl kernel.io_uring_disabled=2``). Instead this process loads
  a seccomp filter that makes ``io_uring_setup`` fail with EPERM (what the sysctl does) for
  itself and every descendant only; libuv then falls back to epoll. CRIU restores it.
- CRIU restores the memory of a tree's root only after all its descendants are done. With
  the 400+ MB API server as root, its restore ran after the worker's, in series; with this
  small process as root, the API server, engine core and worker restore side by side.
- A container's PID 1 must forward signals and exit with the server's status.

Usage: ``python -m fastvllm.launcher CMD [ARGS...]``
"""

import errno
import os
import signal
import sys

IO_URING_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def forward_signals(pid: int) -> None:
    """Pass every stop/reload signal we get on to ``pid`` (the tree below us)."""

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)


def install_filter() -> None:
    """Load a seccomp filter that answers io_uring syscalls with EPERM."""
    import pyseccomp as seccomp

    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in IO_URING_SYSCALLS:
        flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
    flt.load()


def supervise(argv: list[str]) -> int:
    """Run ``argv`` as a child; forward signals to it; return its exit status."""
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"fastvllm launcher: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
            os._exit(127)

    forward_signals(child)
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 1
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m fastvllm.launcher CMD [ARGS...]")
    install_filter()
    sys.exit(supervise(argv))


_PROBE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "params = ctypes.create_string_buffer(120)\n"
    "fd = libc.syscall(425, 1, params)\n"  # 425: io_uring_setup on every Linux arch
    "sys.exit(0 if fd < 0 and ctypes.get_errno() == 1 else 3)\n"
)


def guard_works() -> bool:
    """True when a child started under the launcher gets EPERM from io_uring_setup."""
    import subprocess

    try:
        proc = subprocess.run([sys.executable, "-m", "fastvllm.launcher", sys.executable, "-c", _PROBE],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


if __name__ == "__main__":
    main(sys.argv[1:])
