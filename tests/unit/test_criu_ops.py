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


# --------------------------------------------------------------------------- memory engines

PATCHED_VERSION = 'echo "Version: 4.2.1"; echo "Restore-memory: copy hugepage mmap"'


def _fake_criu(tmp_path: Path, body: str) -> Criu:
    """A script standing in for criu: --version as given, everything else per ``body``."""
    path = tmp_path / "criu"
    path.write_text("#!/bin/bash\n"
                    f'if [ "$1" = --version ]; then {PATCHED_VERSION}; exit 0; fi\n'
                    f'echo "$@" >> {tmp_path}/calls\n' + body + "\n")
    path.chmod(0o755)
    return Criu(path, (4, 2, 1))


def test_restore_memory_line_parsed():
    assert criu_ops.parse_restore_memory_line("Version: 4.2.1\nRestore-memory: copy hugepage mmap\n") == \
        ("copy", "hugepage", "mmap")
    assert criu_ops.parse_restore_memory_line("Version: 4.2.1\nGitID: v4.2.1\n") == ()


def test_memory_engines_unpatched_binary_says_why(tmp_path):
    path = _script(tmp_path, 'if [ "$1" = --version ]; then echo "Version: 4.2.1"; exit 0; fi; exit 1')
    got = criu_ops.memory_engines(Criu(path, (4, 2, 1)))
    assert list(got) == ["copy", "hugepage", "mmap", "lazy"] and got["copy"] is None
    assert "not built with fastvllm's patches" in got["mmap"] and "not built with fastvllm's patches" in got["hugepage"]
    assert "userfaultfd" in got["lazy"] and "\n" not in got["lazy"]


def test_memory_engines_patched_binary(tmp_path, monkeypatch):
    criu = _fake_criu(tmp_path, 'exit 0')  # "criu check --feature uffd-noncoop" succeeds
    monkeypatch.setattr(criu_ops, "thp_mode", lambda text=None: "madvise")
    assert criu_ops.memory_engines(criu) == {"copy": None, "hugepage": None, "mmap": None, "lazy": None}
    assert "check --feature uffd-noncoop" in (tmp_path / "calls").read_text()


def test_memory_engines_hugepage_needs_thp(tmp_path, monkeypatch):
    criu = _fake_criu(tmp_path, 'exit 0')
    monkeypatch.setattr(criu_ops, "thp_mode", lambda text=None: "never")
    assert "never" in criu_ops.memory_engines(criu)["hugepage"]


def test_thp_mode():
    assert criu_ops.thp_mode("always [madvise] never\n") == "madvise"
    assert criu_ops.thp_mode("always madvise [never]\n") == "never"
    assert criu_ops.thp_mode("") is None


BUDDY = """Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32      2      2      3      2      3      2      1      4      4      2    752
Node 0, zone   Normal   1615   3090   2712   1658   1189    598    558    419    252    143    691
"""


def test_free_huge_blocks_counts_order_9_and_10():
    # order 9 counts once, order 10 twice: DMA 1+3*2, DMA32 2+752*2, Normal 143+691*2
    assert criu_ops.free_huge_blocks(BUDDY) == (1 + 6) + (2 + 1504) + (143 + 1382)


def test_hugepages_ready():
    free = criu_ops.free_huge_blocks(BUDDY)
    ok, why = criu_ops.hugepages_ready(free * (2 << 20), buddyinfo=BUDDY, thp="madvise", reporting=False)
    assert ok and f"{free} free 2 MiB blocks" in why
    ok, why = criu_ops.hugepages_ready((free + 1) * (2 << 20), buddyinfo=BUDDY, thp="always", reporting=False)
    assert not ok and "compact" in why
    ok, why = criu_ops.hugepages_ready(1 << 20, buddyinfo=BUDDY, thp="never", reporting=False)
    assert not ok and "never" in why
    ok, why = criu_ops.hugepages_ready(1 << 20, buddyinfo=BUDDY, thp="madvise", reporting=True)
    assert not ok and "free page reporting" in why and "\n" not in why


def test_hugepage_check_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTVLLM_HUGEPAGE_CHECK", "off")
    ok, why = criu_ops.hugepages_ready(1 << 40, buddyinfo=BUDDY, thp="madvise", reporting=True)
    assert ok and "FASTVLLM_HUGEPAGE_CHECK=off" in why
    monkeypatch.setenv("FASTVLLM_HUGEPAGE_CHECK", "on")
    assert not criu_ops.hugepages_ready(1 << 20, buddyinfo=BUDDY, thp="madvise", reporting=True)[0]


def test_free_page_reporting_reads_the_balloon_feature_bit(tmp_path):
    def dev(name, device, features):
        d = tmp_path / name
        d.mkdir()
        (d / "device").write_text(device + "\n")
        (d / "features").write_text(features + "\n")

    dev("virtio0", "0x0002", "0" * 5 + "1" + "0" * 58)  # a block device with bit 5: not a balloon
    assert not criu_ops.free_page_reporting(tmp_path)
    dev("virtio1", "0x0005", "0110000000" + "0" * 54)  # balloon without reporting
    assert not criu_ops.free_page_reporting(tmp_path)
    dev("virtio2", "0x0005", "0110010100" + "0" * 54)  # balloon with VIRTIO_BALLOON_F_REPORTING
    assert criu_ops.free_page_reporting(tmp_path)
    assert not criu_ops.free_page_reporting(tmp_path / "missing")


def test_memory_stats_sums_tasks(tmp_path):
    log = _log(tmp_path,
               "(00.010000) restore-memory: engine mmap ($CRIU_RESTORE_MEMORY)",
               "(00.020000) pie: 11: restore-memory: mmap: mapped 3 runs (88100864 bytes), read 11 runs (131072 bytes)",
               "(00.030000) pie: 12: restore-memory: mmap: mapped 1 runs (65536 bytes), read 2 runs (8192 bytes)")
    stats = criu_ops.memory_stats(log)
    assert stats["engine"] == "mmap" and stats["engine_from"] == "$CRIU_RESTORE_MEMORY" and stats["tasks"] == 2
    assert (stats["mapped_runs"], stats["mapped_bytes"]) == (4, 88100864 + 65536)
    assert (stats["read_runs"], stats["read_bytes"]) == (13, 131072 + 8192)


def test_memory_stats_hugepage_and_copy(tmp_path):
    log = _log(tmp_path,
               "(00.010000) restore-memory: engine hugepage (--restore-memory)",
               "(00.020000) pie: 11: restore-memory: hugepage: advised 3 areas (142610432 bytes), skipped 1 areas",
               "(00.021000) pie: 11: restore-memory: hugepage: read 14 runs (88231936 bytes)",
               "(00.030000) pie: 12: restore-memory: hugepage: THP disabled for this task (PR_SET_THP_DISABLE), "
               "advised 0 areas (0 bytes), skipped 0 areas",
               "(00.031000) pie: 12: restore-memory: hugepage: read 1 runs (4096 bytes)")
    stats = criu_ops.memory_stats(log)
    assert stats["tasks"] == 2 and stats["hugepage_areas"] == 3 and stats["hugepage_bytes"] == 142610432
    assert stats["hugepage_skipped"] == 1 and stats["read_bytes"] == 88231936 + 4096 and stats["mapped_bytes"] == 0
    assert criu_ops.memory_stats(tmp_path / "missing.log")["engine"] is None


def test_restore_rejects_unknown_engine_before_running_criu(tmp_path):
    criu = _fake_criu(tmp_path, "exit 1")
    with pytest.raises(FastvllmError) as info:
        criu_ops.restore_tree(criu, tmp_path, criu_ops.RestoreOptions(memory="turbo"))
    msg = str(info.value)
    assert "unknown restore memory engine 'turbo'" in msg and "copy, hugepage, mmap, lazy" in msg
    assert not (tmp_path / "calls").exists()


def test_restore_refuses_patched_engine_on_unpatched_criu(tmp_path):
    path = _script(tmp_path, 'echo "Version: 4.2.1"')
    with pytest.raises(FastvllmError, match="has no mmap memory engine.*build_criu.sh"):
        criu_ops.restore_tree(Criu(path, (4, 2, 1)), tmp_path, criu_ops.RestoreOptions(memory="mmap"))


def test_cli_restore_passes_the_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_CRIU_MODE", "cli")
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "run"))
    # "restore ... --pidfile F": write a pid into F
    criu = _fake_criu(tmp_path, 'while [ $# -gt 0 ]; do [ "$1" = --pidfile ] && echo 4242 > "$2"; shift; done')
    pid, _ = criu_ops.restore_tree(criu, tmp_path, criu_ops.RestoreOptions(memory="mmap"))
    assert pid == 4242
    assert "--restore-memory mmap" in (tmp_path / "calls").read_text()


def test_failed_lazy_restore_kills_the_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLLM_CRIU_MODE", "cli")
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "run"))
    # lazy-pages: listen (create the socket file in -W) and wait to be killed; restore: fail
    criu = _fake_criu(tmp_path, f'''
if [ "$1" = lazy-pages ]; then
  echo $$ > {tmp_path}/daemon.pid.tmp; mv {tmp_path}/daemon.pid.tmp {tmp_path}/daemon.pid  # before it is "listening"
  while [ $# -gt 0 ]; do [ "$1" = -W ] && touch "$2/lazy-pages.socket"; shift; done
  exec sleep 60
fi
echo "Error (criu/cr-restore.c:2331): Restoring FAILED." >&2; exit 1''')
    with pytest.raises(criu_ops.CriuFailed):
        criu_ops.restore_tree(criu, tmp_path, criu_ops.RestoreOptions(memory="lazy"))
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("lazy-pages -D ") and "--lazy-pages" in calls[1] and "--restore-memory copy" in calls[1]
    assert calls[0].split(" -W ")[1].split()[0] == calls[1].split(" -W ")[1].split()[0], "one work dir for both"
    daemon = int((tmp_path / "daemon.pid").read_text())
    assert not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE
