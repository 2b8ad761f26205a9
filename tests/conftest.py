"""Shared fixtures: a private run dir per session, and the real CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_run_dir(tmp_path_factory):
    """Logs and the server registry of this test session, kept apart from the user's."""
    path = tmp_path_factory.mktemp("run")
    os.environ["FASTVLLM_RUN_DIR"] = str(path)
    return path


class Cli:
    """Runs ``fastvllm`` exactly as a user would, in a separate process."""

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 900, check: bool = True):
        full_env = dict(os.environ, **(env or {}))
        proc = subprocess.run([sys.executable, "-m", "fastvllm.cli", *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"fastvllm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc

    def json(self, *args: str, **kw) -> dict:
        # --json goes right after the subcommand: anything after "--" belongs to vLLM.
        proc = self(args[0], "--json", *args[1:], **kw)
        return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def cli():
    return Cli()
