"""CRIU's logs become one actionable line; CRIU is located and version-checked; the PIDs
a restore needs are checked against real processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fastvllm import criu_ops
from fastvllm.criu_ops import Criu, explain_log, find_criu, pids_in_use, wait_pids_free
from fastvllm.errors import FastvllmError


def _log(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "dump-test.log"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _explain(tmp_path: Path, *lines: str, action: str = "dump") -> tuple[str, Path]:
    path = _log(tmp_path, "(00.000001) Version: 4.2.1 (gitid 0)", *lines, "(00.100000) Info: end")
    msg = explain_log(path, action=action)
    assert "\n" not in msg
    assert msg.startswith(f"CRIU {action} failed: ")
    assert str(path) in msg
    return msg, path


# --------------------------------------------------------------------------- explain_log


def test_pid_collision_names_the_owner(tmp_path):
    me = os.getpid()
    msg, _ = _explain(tmp_path, f"(00.020000) Error (criu/cr-restore.c:1237): Can't fork for {me}: File exists",
                      action="restore")
    cmdline = " ".join(psutil.Process(me).cmdline())[:60]
    assert msg.startswith(f"CRIU restore failed: PID {me} is taken by another process (pid {me} '{cmdline}');")
    assert "fastvllm stop" in msg


def test_pid_collision_with_pid_now_gone(tmp_path):
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    msg, _ = _explain(tmp_path, f"Error (criu/cr-restore.c:1237): Can't fork for {gone}: File exists",
                      action="restore")
    assert f"PID {gone} is taken by another process (pid {gone}, now gone)" in msg


def test_io_uring(tmp_path):
    msg, _ = _explain(tmp_path, "(00.030000) Error (criu/proc_parse.c:502): Unknown shit 600 (anon_inode:[io_uring])")
    assert "io_uring" in msg and "CRIU cannot dump" in msg and "io_uring_disabled=2" in msg


def test_vdso(tmp_path):
    msg, _ = _explain(tmp_path, "(00.010000) Error (criu/vdso.c:401): vdso: Unexpected rt vDSO area bounds")
    assert "too old for the kernel's vDSO" in msg and "CRIU 4.2.1" in msg


def test_tcp_opt(tmp_path):
    msg, _ = _explain(tmp_path, "(00.050000) Error (criu/sockets.c:640): Can't get 6:13 opt: Operation not supported")
    assert "cannot dump TCP sockets on kernel >= 6.16" in msg


def test_bad_size(tmp_path):
    msg, _ = _explain(tmp_path, "(00.060000) Error (criu/files-reg.c:2175): File var/tmp/x.log has bad size 10 (expect 20)",
                      action="restore")
    assert "file /var/tmp/x.log has a different size than when the snapshot was taken" in msg


def test_bad_mode(tmp_path):
    msg, _ = _explain(tmp_path, "(00.060000) Error (criu/files-reg.c:2294): File dev/shm/psm_1 has bad mode 0100644 "
                                "(expect 0100600)", action="restore")
    assert "file /dev/shm/psm_1 has a different mode than when" in msg


def test_missing_file_pattern_matches(tmp_path):
    msg, _ = _explain(tmp_path, "(00.070000) Error (criu/files-reg.c:2353): Can't open file var/tmp/fastvllm/logs/s.log "
                                "on restore: No such file or directory", action="restore")
    assert "existed when the snapshot was taken but is missing now" in msg


def test_missing_file_names_the_right_path(tmp_path):
    msg, _ = _explain(tmp_path, "(00.070000) Error (criu/files-reg.c:2353): Can't open file var/tmp/x.log "
                                "on restore: No such file or directory", action="restore")
    assert "/var/tmp/x.log existed when the snapshot was taken" in msg


def test_address_in_use(tmp_path):
    msg, _ = _explain(tmp_path, "(00.080000) Error (criu/sk-inet.c:1): Can't bind inet socket (id 5): "
                                "Address already in use", action="restore")
    assert "a port or unix socket path the server used is taken" in msg


def test_no_space(tmp_path):
    msg, _ = _explain(tmp_path, "(00.090000) Error (criu/image.c:1): Can't write image: No space left on device")
    assert "no space left on device; free space" in msg


def test_ptrace_permission(tmp_path):
    msg, _ = _explain(tmp_path, "(00.001000) Error (compel/src/lib/infect.c:1): Operation not permitted: can't PTRACE_SEIZE 77")
    assert "may not ptrace" in msg and "run as root" in msg


def test_unable_to_seize(tmp_path):
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    msg, _ = _explain(tmp_path, f"(00.1) Error (compel/src/lib/infect.c:187): SEIZE {gone}: task not stopped after seize")
    assert f"could not freeze process {gone}" in msg


def test_every_pattern_is_covered():
    """If a pattern is added to _LOG_PATTERNS, a test for it must be added here too."""
    assert len(criu_ops._LOG_PATTERNS) == 10


def test_specific_pattern_wins_over_generic(tmp_path):
    # io_uring comes before "No space left" in the table, whatever the order in the log.
    msg, _ = _explain(tmp_path, "Error (x.c:1): write: No space left on device",
                      "Error (criu/proc_parse.c:502): Unknown shit 600 (anon_inode:[io_uring])")
    assert "io_uring" in msg and "no space" not in msg


def test_unknown_error_gives_first_error_line_and_log(tmp_path):
    msg, path = _explain(tmp_path,
                         "(00.001000) Warn  (criu/kerndat.c:1): something harmless",
                         "(00.002000) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: "
                         "Operation not permitted",
                         "(00.003000) Error (criu/cr-dump.c:2098): Frobnication of the zorbulator broke",
                         "(00.004000) Error (criu/cr-dump.c:2111): Dumping FAILED.")
    assert msg.startswith("CRIU dump failed: ")
    assert "Frobnication of the zorbulator broke" in msg
    assert "Dumping FAILED" not in msg  # only the first error line
    assert "RLIMIT_NOFILE" not in msg
    assert msg.endswith(f"(full log: {path})")


def test_container_tun_error_does_not_hide_the_cause(tmp_path):
    msg, _ = _explain(tmp_path,
                      "(00.001000) Error (criu/tun.c:90): tun: Unable to create tun: No such file or directory",
                      "(00.002000) Error (criu/timens.c:40): Unable to write the time namespace offsets",
                      "(00.004000) Error (criu/cr-restore.c:2400): Restoring FAILED.", action="restore")
    assert "time namespace offsets" in msg and "create tun" not in msg


def test_unknown_error_is_not_a_mangled_fragment(tmp_path):
    line = "(00.003000) Error (criu/cr-dump.c:2098): Frobnication of the zorbulator broke"
    msg, path = _explain(tmp_path, line)
    shown = msg.removeprefix("CRIU dump failed: ").removesuffix(f" (full log: {path})")
    assert shown in {"Frobnication of the zorbulator broke", line, line.split(" ", 1)[1]}, shown


def test_only_rlimit_errors_fall_back_to_detail(tmp_path):
    path = _log(tmp_path, "(00.002000) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self")
    msg = explain_log(path, action="restore", detail="criu exited with 1")
    assert msg == f"CRIU restore failed: criu exited with 1 (full log: {path})"


def test_missing_log_uses_detail(tmp_path):
    path = tmp_path / "never-written.log"
    assert explain_log(path, action="dump") == f"CRIU dump failed: unknown error (full log: {path})"
    assert explain_log(path, action="dump", detail="DUMP failed") == f"CRIU dump failed: DUMP failed (full log: {path})"


def test_run_cli_failure_detail_is_the_last_line():
    with pytest.raises(criu_ops._CriuCallFailed) as info:
        criu_ops._run_cli(["sh", "-c", "echo first >&2; echo 'Error: the last line' >&2; exit 1"])
    assert str(info.value) == "Error: the last line"


def test_run_cli_success_and_silent_failure():
    criu_ops._run_cli(["true"])
    with pytest.raises(criu_ops._CriuCallFailed, match=r"^criu exited with 3$"):
        criu_ops._run_cli(["sh", "-c", "exit 3"])


# --------------------------------------------------------------------------- find_criu


def _script(tmp_path: Path, body: str, name: str = "criu") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_find_criu_forced_path_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_CRIU", str(tmp_path / "no-such-criu"))
    with pytest.raises(FastvllmError, match="is not an executable file") as info:
        find_criu()
    assert str(tmp_path / "no-such-criu") in str(info.value)


def test_find_criu_forced_path_not_executable(tmp_path, monkeypatch):
    path = tmp_path / "criu"
    path.write_text("#!/bin/sh\necho 'Version: 4.2.1'\n")
    path.chmod(0o644)
    monkeypatch.setenv("FASTVLLM_CRIU", str(path))
    if os.access(path, os.X_OK):
        pytest.skip("running with a uid that can execute any file")
    with pytest.raises(FastvllmError, match="is not an executable file"):
        find_criu()


def test_find_criu_too_old(tmp_path, monkeypatch):
    path = _script(tmp_path, 'echo "Version: 3.17.1"')
    monkeypatch.setenv("FASTVLLM_CRIU", str(path))
    with pytest.raises(FastvllmError) as info:
        find_criu()
    msg = str(info.value)
    assert "CRIU 3.17.1" in msg and "too old" in msg and "need >= 4.2" in msg and str(path) in msg


def test_find_criu_4_1_is_too_old(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_CRIU", str(_script(tmp_path, 'echo "Version: 4.1"')))
    with pytest.raises(FastvllmError, match="too old"):
        find_criu()


def test_find_criu_good_version(tmp_path, monkeypatch):
    path = _script(tmp_path, 'echo "Version: 4.2.1"; echo "GitID: v4.2.1"')
    monkeypatch.setenv("FASTVLLM_CRIU", str(path))
    criu = find_criu()
    assert criu == Criu(path.resolve(), (4, 2, 1))
    assert criu.version_str == "4.2.1"


def test_find_criu_unreadable_version(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_CRIU", str(_script(tmp_path, 'echo "criu, some build"')))
    with pytest.raises(FastvllmError, match="cannot read the version"):
        find_criu()


# --------------------------------------------------------------------------- PIDs


def test_pids_in_use_and_wait_pids_free_with_real_process():
    proc = subprocess.Popen(["sleep", "1"])
    try:
        deadline = time.monotonic() + 5  # on a loaded machine the child may not have exec'd yet
        while b"sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = pids_in_use([proc.pid])
        assert busy == {proc.pid: f"pid {proc.pid} 'sleep 1'"}
        t0 = time.monotonic()
        # The child exits on its own; wait_pids_free must also reap the zombie it leaves.
        assert wait_pids_free([proc.pid], timeout=10) == {}
        assert time.monotonic() - t0 < 5
        assert pids_in_use([proc.pid]) == {}
    finally:
        proc.kill()
        proc.wait()


def test_wait_pids_free_times_out_on_live_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        t0 = time.monotonic()
        busy = wait_pids_free([proc.pid], timeout=0.3)
        elapsed = time.monotonic() - t0
        assert list(busy) == [proc.pid] and "sleep 30" in busy[proc.pid]
        assert 0.25 <= elapsed < 3
    finally:
        proc.kill()
        proc.wait()


def test_pids_in_use_of_free_pids():
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    assert pids_in_use([gone]) == {}
    assert wait_pids_free([gone], timeout=0.1) == {}
    assert list(pids_in_use([gone, os.getpid()])) == [os.getpid()]
