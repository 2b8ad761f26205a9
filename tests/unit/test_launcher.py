"""The guard really makes io_uring_setup fail with EPERM, for the command and its children,
and only for them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastvllm.launcher import guard_works

# Prints "<return value> <errno>" of io_uring_setup(1, params); 425 on every Linux arch.
PROBE = (
    "import ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "params = ctypes.create_string_buffer(120)\n"
    "fd = libc.syscall(425, 1, params)\n"
    "print(fd, ctypes.get_errno())\n"
)
EPERM = 1


def _probe(*prefix: str) -> tuple[int, int]:
    proc = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    fd, err = proc.stdout.split()
    return int(fd), int(err)


GUARD = (sys.executable, "-m", "fastvllm.launcher")


def test_guard_works_here():
    assert guard_works() is True


def test_guarded_probe_gets_eperm():
    assert _probe(*GUARD) == (-1, EPERM)


def test_guard_survives_fork_and_exec_into_grandchildren():
    cmd = f"{sys.executable} -c '{PROBE}'"
    proc = subprocess.run([*GUARD, "sh", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-1", str(EPERM)]


def test_unguarded_probe_is_not_blocked():
    disabled = Path("/proc/sys/kernel/io_uring_disabled")
    if disabled.exists() and disabled.read_text().strip() == "2":
        reason = "io_uring is disabled machine-wide (kernel.io_uring_disabled=2): every process gets EPERM"
        print(reason)
        pytest.skip(reason)
    fd, err = _probe()
    assert not (fd == -1 and err == EPERM), "io_uring_setup got EPERM without the guard"


def test_guard_without_command_is_a_usage_error():
    proc = subprocess.run([*GUARD], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "usage: python -m fastvllm.launcher CMD" in proc.stderr


def test_guard_passes_exit_status_and_args_through():
    proc = subprocess.run([*GUARD, "sh", "-c", "echo \"$1-$2\"; exit 7", "sh", "a b", "c"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 7 and proc.stdout == "a b-c\n"
