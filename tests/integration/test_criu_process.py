"""criu_ops and external_files on a small real process tree (no vLLM): fast CRIU coverage.

The tree mirrors what matters in a vLLM server: a session leader with a child, a loopback
TCP listener, and a /dev/shm segment mapped shared whose contents live outside the image.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from fastvllm import criu_ops, external_files, server

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent("""
    import mmap, os, socket, sys, time
    shm_path, port = sys.argv[1], int(sys.argv[2])
    fd = os.open(shm_path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    buf = mmap.mmap(fd, 1 << 20)
    buf[:5] = b"hello"
    if os.fork() == 0:          # a child, so that a whole tree is dumped
        while True:
            time.sleep(1)
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port)); srv.listen()
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        buf[5:10] = b"world"    # state written after the dump must come from the saved shm copy
        conn.sendall(bytes(buf[:10]) + b" pid=" + str(os.getpid()).encode())
        conn.close()
""")


def _ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        return conn.recv(100)


@pytest.fixture
def tree(tmp_path):
    shm = f"/dev/shm/fastvllm-test-{uuid.uuid4().hex[:8]}"
    port = server.free_port()
    log = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, shm, str(port)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while "ready" not in (tmp_path / "out.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield proc, shm, port, tmp_path / "out.log"
    for pid in server.tree_pids(proc.pid) or [proc.pid]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    external_files.remove([shm])


def test_dump_then_restore_tree_keeps_socket_pids_and_shm(tree, tmp_path):
    proc, shm, port, log_path = tree
    criu = criu_ops.find_criu()
    pids = server.tree_pids(proc.pid)
    assert len(pids) == 2
    assert _ask(port).startswith(b"helloworld")
    found = external_files.shm_paths_of(pids)
    assert shm in found

    criu_ops.dump_tree(criu, proc.pid, tmp_path / "img")
    proc.wait(timeout=10)
    assert criu_ops.wait_pids_free(pids) == {}
    saved = external_files.save(found | {str(log_path)}, tmp_path / "ext")
    # Scribble over the segment after the dump: restore must bring back the dump-time bytes.
    with open(shm, "r+b") as fh:
        fh.write(b"XXXXXXXXXX")
    external_files.put_back(saved, tmp_path / "ext")

    root, _ = criu_ops.restore_tree(criu, tmp_path / "img")
    try:
        assert root == proc.pid, "CRIU restores the original PIDs"
        assert sorted(server.tree_pids(root)) == sorted(pids)
        answer = _ask(port)
        assert answer == b"helloworld pid=" + str(root).encode()
    finally:
        server.kill_tree(server.tree_pids(root))


def test_restore_with_pid_taken_names_the_pid(tree, tmp_path):
    proc, shm, port, log_path = tree
    criu = criu_ops.find_criu()
    pids = server.tree_pids(proc.pid)
    found = external_files.shm_paths_of(pids)
    criu_ops.dump_tree(criu, proc.pid, tmp_path / "img", criu_ops.DumpOptions(leave_running=True))
    saved = external_files.save(found | {str(log_path)}, tmp_path / "ext")
    # The original tree still runs: its PIDs are taken, so restore must fail and say which.
    with pytest.raises(criu_ops.CriuFailed) as err:
        external_files.put_back(saved, tmp_path / "ext")
        criu_ops.restore_tree(criu, tmp_path / "img")
    message = str(err.value)
    assert "\n" not in message
    assert "is taken" in message or "in use" in message, message
    assert _ask(port).startswith(b"hello"), "the running tree is unharmed"


def test_dump_of_missing_pid_is_one_clear_line(tmp_path):
    criu = criu_ops.find_criu()
    with pytest.raises(criu_ops.CriuFailed) as err:
        criu_ops.dump_tree(criu, 4_000_000, tmp_path / "img")
    assert "\n" not in str(err.value) and "CRIU dump failed" in str(err.value)
