"""A snapshot's host facts recorded by one real process and checked by another that plays
"a host with other CPU flags" (FASTVLLM_FAKE_CPU_FLAGS, the test-only override)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastvllm import host_compat

pytestmark = pytest.mark.integration

CHECK = """
import json, sys
from fastvllm import host_compat
from fastvllm.errors import FastvllmError
try:
    warnings = host_compat.refuse_if_incompatible(json.load(open(sys.argv[1])))
except FastvllmError as exc:
    print(f"fastvllm: error: {exc}", file=sys.stderr)
    sys.exit(1)
print(json.dumps([m.to_json() for m in warnings]))
"""


@pytest.fixture
def recorded(tmp_path):
    path = tmp_path / "host.json"
    path.write_text(json.dumps(host_compat.host_facts("4.2.1")))
    return path


def _check(recorded, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != host_compat.FAKE_FLAGS_ENV}
    full.update(env)
    return subprocess.run([sys.executable, "-c", CHECK, str(recorded)], capture_output=True, text=True,
                          env=full, timeout=60)


def test_the_same_host_passes(recorded):
    proc = _check(recorded)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_a_host_lacking_flags_is_refused_in_one_line(recorded):
    flags = json.loads(recorded.read_text())["cpu_flags"]
    drop = [f for f in ("avx512f", "avx2", "sse4_2") if f in flags] or flags[:1]
    proc = _check(recorded, **{host_compat.FAKE_FLAGS_ENV: " ".join(f"-{f}" for f in drop)})
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvllm: error: this host cannot restore the snapshot")
    assert all(f in lines[0] for f in drop) and "SIGILL" in lines[0]


def test_a_host_with_extra_flags_passes(recorded):
    flags = json.loads(recorded.read_text())["cpu_flags"]
    proc = _check(recorded, **{host_compat.FAKE_FLAGS_ENV: " ".join(flags + ["amx_tile", "avx10_2"])})
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
