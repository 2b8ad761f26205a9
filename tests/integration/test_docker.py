"""The ``cpu`` image end to end in a real Docker engine (Debian's docker.io, started by
scripts/setup_docker.sh if none runs; the base image is debootstrapped locally, since no
registry is reachable).

Two containers share one snapshot volume: the first finds no snapshot, cold-starts,
snapshots (at the CLI's default level, listening on 0.0.0.0) and restores; the second
restores, passes the canary and must reach its first token sooner. Two more restore the
same snapshot at once, each on its own configured port. A level-0 pair on the same volume
gives the restore time the default level is compared with. Then the snapshot is damaged on the volume: a third container says so in one
line, cold-starts, and leaves every byte of it as it was. Containers run with exactly the
flags README's ``docker run`` line documents (``RUN_FLAGS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fastvllm import server

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "fastvllm:cpu-test"
LABEL = "fastvllm-test-docker"
START_TIMEOUT_S = 900


TIMES: dict[str, float] = {}


def run_flags(snapshots: Path, model: Path, host_port: int, container_port: int = 8000, **env: str) -> dict:
    """README's docker run line, as Docker SDK arguments.

    CAP_CHECKPOINT_RESTORE is not asked for: Docker 20.10 (Debian's) refuses the name, and
    CAP_SYS_ADMIN covers it. CAP_NET_ADMIN: CRIU restores socket buffer sizes with
    SO_SNDBUFFORCE/SO_RCVBUFFORCE. CAP_SYS_TIME: CRIU restores into a new time namespace
    (monotonic clocks continue) and writes its offsets. No ``--init``: the entrypoint is PID 1.
    """
    return dict(
        cap_add=["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN", "SYS_TIME"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        shm_size="1g",
        init=False,
        ports={f"{container_port}/tcp": ("127.0.0.1", host_port)},
        volumes={str(snapshots): {"bind": "/snapshots", "mode": "rw"},
                 str(model): {"bind": "/models/tiny", "mode": "ro"}},
        environment={"FASTVLLM_MODEL": "/models/tiny", "FASTVLLM_VLLM_ARGS": "--enforce-eager",
                     "VLLM_CPU_KVCACHE_SPACE": "1", "FASTVLLM_PORT": str(container_port), **env},
        labels={LABEL: "1"},
    )


@pytest.fixture(scope="module")
def client():
    """A Docker engine (started if needed) and the locally made base image."""
    docker = pytest.importorskip("docker")
    setup = subprocess.run(["bash", str(REPO / "scripts" / "setup_docker.sh")], capture_output=True, text=True,
                           timeout=1800)
    assert setup.returncode == 0, f"scripts/setup_docker.sh failed:\n{setup.stderr[-3000:]}"
    cli = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=3600)
    for stale in cli.containers.list(all=True, filters={"label": LABEL}):  # an interrupted earlier run
        stale.remove(force=True)
    cli.base_image = setup.stdout.strip().splitlines()[-1]
    yield cli
    for container in cli.containers.list(all=True, filters={"label": LABEL}):
        container.remove(force=True)


@pytest.fixture(scope="module")
def image(client):
    """``docker build --target cpu`` of this tree (layers cached across runs)."""
    import docker

    args = {"CPU_BASE": client.base_image}
    tarballs = sorted((REPO / "docker" / "inputs").glob("criu_*.orig.tar.*"))
    if tarballs:  # the CRIU source ./run.sh setup already fetched
        args["CRIU_TARBALL"] = f"docker/inputs/{tarballs[-1].name}"
    start = time.monotonic()
    try:
        built, _ = client.images.build(path=str(REPO), target="cpu", tag=IMAGE, buildargs=args, rm=True,
                                       forcerm=True)
    except docker.errors.BuildError as exc:
        log = "".join(chunk.get("stream", "") + chunk.get("error", "") for chunk in exc.build_log)
        pytest.fail(f"docker build failed: {exc.msg}\n{log[-4000:]}")
    print(f"\n[docker] image {IMAGE} built in {time.monotonic() - start:.0f} s (cached layers reused)")
    return built


def _host_port() -> int:
    for port in range(8100, 8200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 8100-8199")


class Run:
    """One container from start to stop, with its log and the times its lines appeared."""

    def __init__(self, client, flags: dict, name: str):
        self.port = next(iter(flags["ports"].values()))[1]
        self.container = client.containers.create(IMAGE, name=f"fastvllm-test-{name}-{os.getpid()}", detach=True,
                                                  **flags)
        self.started = time.monotonic()
        self.container.start()

    def logs(self, stdout: bool = True, stderr: bool = True) -> str:
        return self.container.logs(stdout=stdout, stderr=stderr).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> tuple[re.Match, float]:
        """The first match of ``pattern`` in the log, and seconds since the container started."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.logs())
            if match:
                return match, time.monotonic() - self.started
            self.container.reload()
            if self.container.status == "exited":
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the container's log (status {self.container.status}):\n"
                             f"{self.logs()[-5000:]}")

    def stop(self) -> int:
        """docker stop (SIGTERM, forwarded to the server); the container's exit status."""
        self.container.stop(timeout=60)
        return self.container.wait(timeout=120)["StatusCode"]


@pytest.fixture(scope="module")
def first_boot(client, image, tiny_model, tmp_path_factory):
    """Container 1 on an empty volume: cold start, snapshot, restore, serve."""
    volume = tmp_path_factory.mktemp("docker-snapshots")
    run = Run(client, run_flags(volume, Path(tiny_model), _host_port(), FASTVLLM_SNAPSHOT_ON_MISS="1"), "first")
    try:
        cold, _ = run.wait_for(r"cold start's first token after ([\d.]+) s")
        _, serving_s = run.wait_for(r"serving \(restored from the snapshot just taken\)")
        log = run.logs()
        assert "no snapshot at /snapshots/" in log
        assert re.search(r"restored: canary matches", log)
        snapshots = [p for p in volume.iterdir()]
        assert len(snapshots) == 1 and not snapshots[0].name.startswith("."), snapshots
        meta = json.loads((snapshots[0] / "manifest.json").read_text())
        assert oct(snapshots[0].stat().st_mode & 0o777) == "0o700"
        _check_canary(run, meta)
        status = run.stop()
    finally:
        run.container.remove(force=True)
    assert status in (0, 143), f"container 1 exited with {status} on docker stop (137 = killed: signals not forwarded)"
    return {"volume": volume, "snapshot": snapshots[0], "meta": meta, "cold_first_token_s": float(cold.group(1)),
            "serving_s": serving_s, "model": Path(tiny_model)}


def _check_canary(run: Run, meta: dict) -> None:
    """From the host, through the published port: the server answers as the snapshot recorded."""
    endpoint = f"http://127.0.0.1:{run.port}"
    canary = meta["canary"]
    _, text = server.complete(endpoint, meta["served_model_name"], canary["prompt"], canary["max_tokens"])
    assert text == canary["completion"]


def test_second_container_restores_faster(client, first_boot):
    run = Run(client, run_flags(first_boot["volume"], first_boot["model"], _host_port(),
                                FASTVLLM_SNAPSHOT_ON_MISS="1"), "second")
    try:
        restored, _ = run.wait_for(r"restored: canary matches; first token after ([\d.]+) s")
        _, serving_s = run.wait_for(r"serving \(restored from /snapshots/")
        _check_canary(run, first_boot["meta"])
        log = run.logs()
        assert "cold-start" not in log, log[-3000:]
        assert "/v1/completions" in run.logs(stderr=False), "the server's own log is not on stdout"
        status = run.stop()
    finally:
        run.container.remove(force=True)
    restore_s = float(restored.group(1))
    TIMES["default_level_restore_s"] = restore_s
    print(f"\n[docker] first token, since the entrypoint started: cold start (container 1) "
          f"{first_boot['cold_first_token_s']:.2f} s, restore (container 2) {restore_s:.2f} s "
          f"({first_boot['cold_first_token_s'] / restore_s:.1f}x)")
    print(f"[docker] docker start -> serving: container 1 (cold + snapshot + restore) {first_boot['serving_s']:.2f} s, "
          f"container 2 (restore) {serving_s:.2f} s")
    assert restore_s < first_boot["cold_first_token_s"]
    assert serving_s < first_boot["serving_s"]
    assert status in (0, 143), f"container 2 exited with {status} on docker stop"


def test_two_containers_restore_one_snapshot_at_once_on_their_own_ports(client, first_boot):
    """The snapshot binds late: each restore listens on its container's FASTVLLM_PORT."""
    runs = [Run(client, run_flags(first_boot["volume"], first_boot["model"], _host_port(), container_port=port),
                f"pair-{port}") for port in (8000, 8001)]
    try:
        for run in runs:
            run.wait_for(r"restored: canary matches")
            run.wait_for(r"serving \(restored from /snapshots/")
        for run in runs:  # both serving at the same time
            _check_canary(run, first_boot["meta"])
            assert "cold-start" not in run.logs()
        statuses = [run.stop() for run in runs]
    finally:
        for run in runs:
            run.container.remove(force=True)
    assert all(status in (0, 143) for status in statuses)


def test_default_level_beside_level_0(client, first_boot):
    """Containers used to be held to level 0 (then restored with copy, several times
    slower). Both levels restore here, each passing its canary; their first-token times
    are printed side by side (a comparison, not asserted: with the mmap engine both map
    their images and measure the same when the page cache is warm, see README's ladder),
    and the default level's snapshot must be the smaller one (no KV cache in its images),
    which is what makes it the default: less to store and to read on a cold node."""
    flags = dict(FASTVLLM_SNAPSHOT_ON_MISS="1", FASTVLLM_LEVEL="0")
    times = {}
    for name in ("level0-first", "level0-second"):
        run = Run(client, run_flags(first_boot["volume"], first_boot["model"], _host_port(), **flags), name)
        try:
            if name == "level0-first":
                run.wait_for(r"serving \(restored from the snapshot just taken\)")
            else:
                restored, _ = run.wait_for(r"restored: canary matches; first token after ([\d.]+) s")
                times["level0"] = float(restored.group(1))
            run.stop()
        finally:
            run.container.remove(force=True)
    default = TIMES.get("default_level_restore_s")
    level0 = [json.loads((d / "manifest.json").read_text()) for d in first_boot["volume"].iterdir()
              if (d / "manifest.json").is_file()]
    level0 = [m for m in level0 if m.get("level") == 0]
    assert len(level0) == 1, "the level-0 container snapshotted onto the volume"
    sizes = {"default": first_boot["meta"]["image_bytes"], "level0": level0[0]["image_bytes"]}
    print(f"\n[docker] restore, first token since the entrypoint started: default level "
          f"{first_boot['meta']['level']} {default} s ({sizes['default'] / 2**30:.2f} GiB of images), "
          f"level 0 {times['level0']:.2f} s ({sizes['level0'] / 2**30:.2f} GiB)")
    assert first_boot["meta"]["level"] != 0 and sizes["default"] < sizes["level0"]


def _state(root: Path) -> dict:
    """Every entry under ``root``: kind, mode, size, mtime and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = None
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            digest = h.hexdigest()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def test_corrupt_snapshot_means_one_line_and_a_cold_start(client, first_boot):
    snapshot = first_boot["snapshot"]
    for other in first_boot["volume"].iterdir():  # the level-0 snapshot of the test above
        if other != snapshot:
            shutil.rmtree(other)
    pages = max((snapshot / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as fh:  # a truncated copy, as an interrupted rsync leaves it
        fh.truncate(pages.stat().st_size // 2)
    before = _state(first_boot["volume"])
    run = Run(client, run_flags(first_boot["volume"], first_boot["model"], _host_port(),
                                FASTVLLM_SNAPSHOT_ON_MISS="1"), "corrupt")
    try:
        run.wait_for(r"serving \(cold-started\)")
        log = run.logs()
        status = run.stop()
    finally:
        run.container.remove(force=True)
    said = [ln for ln in log.splitlines() if "not used" in ln or "corrupt" in ln or "damaged" in ln]
    assert len(said) == 1, said
    print(f"\n[docker] container 3 said: {said[0]}")
    assert f"snapshot {snapshot.name}" in said[0] or f"/snapshots/{snapshot.name}" in said[0]
    assert f"{pages.relative_to(snapshot)}" in said[0] and "cold-starting" in said[0]
    assert "snapshot created" not in log and "restored:" not in log
    assert _state(first_boot["volume"]) == before, "the bad snapshot (or the volume) was changed"
    assert status in (0, 143)
