"""The control channel on real files: a server end answering in a thread, the CLI's end."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from fastvllm.inside_vllm import control


@pytest.fixture
def chan_dir(tmp_path):
    return control.prepare_dir(tmp_path / "run" / "ctl")


def _serve(path, handler, stop):
    end = control.ServerEnd(path)
    while not stop.is_set():
        request = end.take_request()
        if request is None:
            time.sleep(0.001)
            continue
        try:
            end.answer(request, True, handler(request["op"], request["args"]))
        except Exception as exc:  # noqa: BLE001
            end.answer(request, False, str(exc))


@pytest.fixture
def server(chan_dir):
    stop = threading.Event()
    seen = []

    def handler(op, args):
        seen.append(op)
        if op == "fail":
            raise RuntimeError("refused: one line")
        return {"echo": args}

    thread = threading.Thread(target=_serve, args=(chan_dir, handler, stop), daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join()


def test_directory_is_private_and_cleared(tmp_path):
    path = tmp_path / "ctl"
    path.mkdir(mode=0o755)
    (path / control.REQUEST).write_text('{"id": "old", "op": "bind"}')  # from an earlier life
    control.prepare_dir(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert not (path / control.REQUEST).exists()


def test_symlinked_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ctl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(control.ControlError, match="not a plain directory"):
        control.prepare_dir(tmp_path / "ctl")


def test_round_trip_and_refusal(chan_dir, server):
    client = control.ClientEnd(chan_dir)
    assert client.call("ping", x=1) == {"echo": {"x": 1}}
    with pytest.raises(control.ControlError, match="refused: one line"):
        client.call("fail")
    assert server == ["ping", "fail"]
    assert not (chan_dir / control.REQUEST).exists() and not (chan_dir / control.REPLY).exists()


def test_messages_are_owner_only(chan_dir):
    control.write_message(chan_dir / control.READY, {"canary": {}})
    assert stat.S_IMODE((chan_dir / control.READY).stat().st_mode) == 0o600


def test_stale_reply_is_not_taken_for_a_fresh_one(chan_dir, server):
    control.write_message(chan_dir / control.REPLY, {"id": "someone-else", "ok": True, "result": {"stale": 1}})
    assert control.ClientEnd(chan_dir).call("ping") == {"echo": {}}


def test_dead_server_is_noticed_at_once(chan_dir):
    client = control.ClientEnd(chan_dir, alive=lambda: False)
    start = time.monotonic()
    with pytest.raises(control.ControlError, match="exited"):
        client.call("bind", timeout=30)
    with pytest.raises(control.ControlError, match="exited before it was ready"):
        client.wait_ready(timeout=30)
    assert time.monotonic() - start < 5


def test_unanswered_request_times_out(chan_dir):
    with pytest.raises(control.ControlError, match="did not answer 'ping' within"):
        control.ClientEnd(chan_dir).call("ping", timeout=0.3)


def test_ready_message(chan_dir):
    control.ServerEnd(chan_dir).announce_ready({"pid": os.getpid()})
    assert control.ClientEnd(chan_dir).wait_ready(timeout=1) == {"pid": os.getpid()}


def test_remove_dir_after_the_server_is_gone(chan_dir):
    control.write_message(chan_dir / control.READY, {})
    (chan_dir / control.LOCK).write_text("")
    control.remove_dir(chan_dir)
    assert not chan_dir.exists()
    control.remove_dir(chan_dir)  # twice is fine
