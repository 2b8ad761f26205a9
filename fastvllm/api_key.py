"""API keys: where one comes from, and keeping it out of everything fastvllm writes.

A key is given with ``--api-key`` (fastvllm's option, or among the vLLM args after ``--``)
or ``VLLM_API_KEY``. It is taken out of the vLLM args and out of the server's environment
and handed to the server only with the control channel's ``bind`` request
(:mod:`fastvllm.inside_vllm.api_entry`), which builds vLLM's authentication middleware with
it. So the key is in no process's argv (``/proc/PID/cmdline`` is world-readable), in no
manifest, registry record or log fastvllm writes, and not in a snapshot's memory image:
a snapshot only records *that* its server was protected, and a restore must then be given
a key again (it may be a new one: keys rotate without a new snapshot).
"""

from __future__ import annotations

import os

ENV = "VLLM_API_KEY"
REDACTED = "<redacted>"


def split(extra_args: list[str]) -> tuple[list[str], str | None]:
    """(vLLM args without any ``--api-key``, the last key found there or None)."""
    out, key, skip = [], None, False
    for i, arg in enumerate(extra_args):
        if skip:
            skip = False
            continue
        if arg == "--api-key":
            if i + 1 < len(extra_args):
                key, skip = extra_args[i + 1], True
            continue
        if arg.startswith("--api-key="):
            key = arg.split("=", 1)[1]
            continue
        out.append(arg)
    return out, key


def resolve(given: str | None, extra_args: list[str], env: dict[str, str] | None = None) -> tuple[list[str], str | None]:
    """(clean vLLM args, the key to serve with): ``given`` beats one in the vLLM args, which
    beats ``$VLLM_API_KEY``; an empty key means none."""
    env = os.environ if env is None else env
    args, in_args = split(list(extra_args))
    key = given or in_args or env.get(ENV) or None
    return args, key


def redact(argv: list[str]) -> list[str]:
    """``argv`` with the value of every ``--api-key`` replaced (for anything recorded)."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append(REDACTED)
            hide = False
        elif arg == "--api-key":
            out.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=" + REDACTED)
        else:
            out.append(arg)
    return out


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}
