"""The container's configuration: what it was asked to serve, from ``FASTVLLM_*`` variables
and/or the ``fastvllm entrypoint`` arguments (arguments win), checked in one place.

Host and port are where the server listens, given at bind time (a snapshot does not fix
them); the API key (``VLLM_API_KEY`` or ``--api-key`` among the vLLM args) is taken out of
the vLLM args and never written anywhere (see :mod:`fastvllm.api_key`).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .. import api_key as keys
from .. import server
from ..errors import FastvllmError


@dataclass
class Config:
    """What the container was asked to serve (from the environment and/or arguments)."""

    model: str
    vllm_args: list[str] = field(default_factory=list)
    port: int = server.DEFAULT_PORT
    host: str = "0.0.0.0"
    snapshot_root: Path = Path("/snapshots")
    snapshot_on_miss: bool = False
    level: int | None = None  # None: the CLI's default
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **given) -> "Config":
        """Arguments win over ``FASTVLLM_*`` variables; unset ones take the defaults."""
        env = dict(os.environ if env is None else env)
        values = {
            "model": env.get("FASTVLLM_MODEL"),
            "vllm_args": shlex.split(env.get("FASTVLLM_VLLM_ARGS", "")),
            "port": env.get("FASTVLLM_PORT"),
            "host": env.get("FASTVLLM_HOST"),
            "snapshot_root": env.get("FASTVLLM_SNAPSHOT_DIR"),
            "snapshot_on_miss": env.get("FASTVLLM_SNAPSHOT_ON_MISS"),
            "level": env.get("FASTVLLM_LEVEL"),
        }
        values.update({k: v for k, v in given.items() if v not in (None, [], "")})
        if not values["model"]:
            raise FastvllmError("no model given", fix="set FASTVLLM_MODEL or pass the model as the first argument")
        try:
            port = int(values["port"] or server.DEFAULT_PORT)
            level = None if values["level"] in (None, "") else int(values["level"])
        except ValueError:
            raise FastvllmError(f"FASTVLLM_PORT / FASTVLLM_LEVEL must be integers (got {values['port']!r}, "
                                f"{values['level']!r})", fix="e.g. FASTVLLM_PORT=8000 FASTVLLM_LEVEL=0") from None
        on_miss = values["snapshot_on_miss"]
        if isinstance(on_miss, str):
            on_miss = on_miss.strip().lower() in ("1", "true", "yes", "on")
        vllm_args, key = keys.resolve(given.get("api_key"), list(values["vllm_args"]), env)
        cfg = cls(model=values["model"], vllm_args=vllm_args, port=port,
                  host=values["host"] or "0.0.0.0", snapshot_root=Path(values["snapshot_root"] or "/snapshots"),
                  snapshot_on_miss=bool(on_miss), level=level, api_key=key)
        cfg.check()
        return cfg

    @property
    def snapshot_level(self) -> int:
        if self.level is not None:
            return self.level
        from ..defaults import snapshot_level

        return snapshot_level()

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise FastvllmError(f"port {self.port} is out of range", fix="use 1-65535")
        if self.snapshot_level not in (0, 1, 2):
            raise FastvllmError(f"FASTVLLM_LEVEL={self.level} is not supported", fix="use 0, 1 or 2")
        for flag in ("--host", "--port", "--model"):
            if flag in self.vllm_args or any(a.startswith(flag + "=") for a in self.vllm_args):
                raise FastvllmError(f"{flag} belongs to fastvllm, not to the vLLM args",
                                    fix=f"set FASTVLLM_{flag[2:].upper()} (or the entrypoint option) instead")

    def server_args(self) -> list[str]:
        """vLLM args for a snapshot: the user's (the address is given at bind time)."""
        return list(self.vllm_args)
