"""fastvllm's API-server entry: vLLM's OpenAI server, run in this process from vLLM's public
pieces, that listens on no TCP port until the control channel says where.

Usage (by :mod:`fastvllm.server`, under :mod:`fastvllm.launcher`)::

    python -m fastvllm.inside_vllm.api_entry --fastvllm-control DIR [vLLM serve args]

Why not ``vllm serve`` plus its dev endpoints, as before: those endpoints (``/sleep``,
``/collective_rpc``) sat on the very socket that serves users, needed
vLLM's server dev mode (so containers, which listen on 0.0.0.0, were held to level 0),
and the listening socket was inside the CRIU image (so a snapshot was frozen to its port,
and a restored level-2 server answered ``/health`` before its weights were back). Here:

1. vLLM's own argument parser, ``build_async_engine_client`` (the engine core and workers),
   and ``init_app_state`` (the OpenAI serving objects) run as in ``vllm serve``, but no
   socket is created.
2. The engine is warmed and the canary (:mod:`fastvllm.canary`) computed **in-process**
   through the engine client; ``ready.json`` carries it to the CLI.
3. The CLI then drives the engine through :mod:`fastvllm.inside_vllm.control`: release the
   KV cache (level 1) or weights and KV cache (level 2) for the dump, wake / reload, check
   the canary, and finally ``bind``. A snapshot is dumped in the unbound state, so a restored
   process is unbound too: it reloads, proves its canary, and only then binds the address
   the restore asked for. ``/health`` cannot answer before the server can serve, because
   nothing listens before then.
4. ``bind`` builds vLLM's FastAPI app (with the API key given with it, if any: the key is
   never in the process's argv, environment or in a snapshot's image) and serves it with
   vLLM's ``serve_http`` on a socket created right then.

Worker-side work (freeing and reloading weights and the KV cache on CPU, privatizing
mapped pages) is :class:`fastvllm.inside_vllm.worker_extension.FastvllmWorkerExtension`,
reached with the engine client's ``collective_rpc``; only its ``fastvllm_*`` methods can be
called through the channel. On GPU release and wake are vLLM's native sleep mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from .. import canary
from .control import ServerEnd

EXTENSION = "fastvllm.inside_vllm.worker_extension.FastvllmWorkerExtension"
POLL_UNBOUND_S = 0.005  # restore waits on these polls: keep them short while unbound
POLL_SERVING_S = 0.05


def parse_args(argv: list[str]):
    """(control directory, vLLM's parsed serve args); vLLM's own parser and checks."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--fastvllm-control", required=True, type=Path)
    ours, rest = own.parse_known_args(argv)
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="python -m fastvllm.inside_vllm.api_entry"))
    args = parser.parse_args(rest)
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    if args.api_key:
        # The CLI passes keys only with "bind" (never in argv, where /proc and logs show it).
        raise SystemExit("fastvllm api_entry: --api-key comes through the control channel, not argv")
    if getattr(args, "uds", None) or getattr(args, "headless", False) or getattr(args, "grpc", False):
        raise SystemExit("fastvllm api_entry: serves HTTP on a TCP address given at bind time only")
    if not args.worker_extension_cls:
        args.worker_extension_cls = EXTENSION
    return ours.fastvllm_control, args


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


async def run_canary(engine, prompt: str = canary.PROMPT, max_tokens: int = canary.MAX_TOKENS) -> dict:
    """One greedy request through the engine client (no HTTP): token ids, each sampled
    token's log-probability, text, and wall-clock stamps (the CLI turns them into its
    own timings)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0, seed=0)
    started, first, final = time.time(), None, None
    async for output in engine.generate(prompt, params, request_id=f"fastvllm-canary-{secrets.token_hex(6)}"):
        if first is None and output.outputs and output.outputs[0].token_ids:
            first = time.time()
        final = output
    if final is None or not final.outputs:
        raise RuntimeError("the canary request returned no output")
    out = final.outputs[0]
    ids = [int(t) for t in out.token_ids]
    logprobs = [float(position[tid].logprob) for position, tid in zip(out.logprobs or [], ids)]
    return {"token_ids": ids, "logprobs": logprobs, "text": out.text, "started_at": started,
            "first_token_at": first, "finished_at": time.time()}


class Session:
    """One API server's life: prepared, released / woken on request, then bound and serving."""

    def __init__(self, engine, args, channel: ServerEnd, cpu: bool | None = None):
        self.engine = engine
        self.args = args
        self.channel = channel
        self.cpu = _is_cpu() if cpu is None else cpu
        self.released: int | None = None  # the sleep level the engine is at, None = awake
        self.http: asyncio.Task | None = None
        self.supported_tasks = None
        self.app = None  # built before the dump, without an API key

    async def prepare(self) -> None:
        """Build the app and its serving state, warm the engine, compute the canary, say ready.

        The app is built here, before any dump, so that a restore's bind only opens the
        socket and starts uvicorn (whose protocol modules are imported here too)."""
        import uvicorn
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        engine_ready_at = time.time()
        self.supported_tasks = await self.engine.get_supported_tasks()
        self.args.api_key = None
        self.app = build_app(self.args, self.supported_tasks, self.engine.model_config)
        await init_app_state(self.engine, self.app.state, self.args, self.supported_tasks)
        uvicorn.Config(self.app, log_level=self.args.uvicorn_log_level).load()
        warm = await run_canary(self.engine, canary.WARMUP_PROMPT)
        result = await run_canary(self.engine)
        # What vLLM's app lifespan does when uvicorn starts (a full collection, then
        # gc.freeze), done now: after a restore, a full collection walks the whole heap at
        # bind time (measured 0.7-1.5 s on the tiny model); frozen objects are skipped.
        from vllm.utils.gc_utils import freeze_gc_heap

        freeze_gc_heap()
        _log("engine ready; warm-up request %.2f s (first token after %.2f s), canary %.2f s; "
             "listening on no port until told", warm["finished_at"] - warm["started_at"],
             (warm["first_token_at"] or warm["finished_at"]) - warm["started_at"],
             result["finished_at"] - result["started_at"])
        self.channel.announce_ready({
            "pid": os.getpid(), "engine_ready_at": engine_ready_at, "warmup": warm, "canary": result,
            "served_model_name": _served_name(self.engine, self.args), "platform": "cpu" if self.cpu else "cuda",
        })

    async def commands(self) -> None:
        """Answer the control channel's requests, one at a time, for the server's whole life."""
        while True:
            request = self.channel.take_request()
            if request is None:
                await asyncio.sleep(POLL_SERVING_S if self.http else POLL_UNBOUND_S)
                continue
            try:
                result = await self.handle(str(request.get("op")), request.get("args") or {})
            except Exception as exc:  # noqa: BLE001 - every failure is one line to the CLI
                text = str(exc).splitlines()[0] if str(exc) else ""
                self.channel.answer(request, False, f"{exc.__class__.__name__}: {text}"[:600])
            else:
                self.channel.answer(request, True, result)

    async def handle(self, op: str, args: dict) -> dict:
        if op == "ping":
            return {"pid": os.getpid(), "serving": self.http is not None, "released": self.released}
        if op == "release":
            return await self.release(int(args.get("level", 2)))
        if op == "wake":
            return await self.wake(args)
        if op == "canary":
            return await self.check_canary(args)
        if op == "bind":
            return await self.bind(args)
        if op == "rpc":
            method = str(args.get("method", ""))
            if not method.startswith("fastvllm_"):
                raise PermissionError(f"only the worker extension's fastvllm_* methods can be called, not {method!r}")
            workers = await self.engine.collective_rpc(method, kwargs={"request": json.dumps(args.get("request") or {})})
            return {"workers": list(workers)}
        raise ValueError(f"unknown control request {op!r}")

    async def release(self, level: int) -> dict:
        """Free the KV cache (level 1) or weights and KV cache (level 2) before a dump."""
        if self.http is not None:
            raise RuntimeError("the server is serving: release is only for an unbound server")
        if level not in (1, 2):
            raise ValueError(f"sleep level {level}")
        if self.released is not None:
            return {"level": level, "workers": [], "already_released": self.released}
        if self.cpu:
            # Its blocks would point into a KV cache that is about to be freed.
            if not await self.engine.reset_prefix_cache():
                raise RuntimeError("the engine could not reset its prefix cache (requests still running?)")
            workers = await self.engine.collective_rpc("fastvllm_release",
                                                       kwargs={"request": json.dumps({"kv_only": level == 1})})
        else:
            await self.engine.sleep(level=level)
            workers = []
        self.released = level
        return {"platform": "cpu" if self.cpu else "cuda", "level": level, "workers": list(workers)}

    async def wake(self, args: dict) -> dict:
        """Undo :meth:`release`: level 1 re-allocates the KV cache (GPU: vLLM's wake_up
        copies the host-offloaded weights back), level 2 also reloads the weights."""
        level = self.released
        if level is None:
            return {"workers": [], "already_awake": True}
        request = {k: args.get(k) for k in ("files", "loader", "model_dir", "threads", "chunk_bytes", "buffers")}
        if level == 1:
            if self.cpu:
                workers = await self.engine.collective_rpc("fastvllm_reload",
                                                           kwargs={"request": json.dumps({"kv_only": True})})
            else:
                await self.engine.wake_up()
                workers = []
        else:
            if not self.cpu:
                await self.engine.wake_up(tags=["weights"])
            workers = await self.engine.collective_rpc("fastvllm_reload", kwargs={"request": json.dumps(request)})
            if not self.cpu:
                await self.engine.wake_up(tags=["kv_cache"])
        self.released = None
        return {"workers": list(workers)}

    async def check_canary(self, args: dict) -> dict:
        """Run the canary; with ``expect``, fail unless it matches (see :mod:`fastvllm.canary`)."""
        if self.released is not None:
            raise RuntimeError(f"the engine is released (level {self.released}): wake it first")
        expect = args.get("expect")
        # a recorded canary's length (or a prefix of it: canary.prefix) sets the request's
        max_tokens = args.get("max_tokens") or (expect or {}).get("max_tokens") or canary.MAX_TOKENS
        result = await run_canary(self.engine, args.get("prompt") or canary.PROMPT, int(max_tokens))
        if expect:
            why = canary.mismatch(expect, result, args.get("tolerance") or expect.get("tolerance"))
            if why:
                raise CanaryMismatch(why)
        return result

    async def bind(self, args: dict) -> dict:
        """Check the canary (when given one), then listen on ``host:port`` and serve.

        Answers once uvicorn has started; a refused canary or an address in use leaves the
        server unbound (the CLI then stops it)."""
        if self.http is not None:
            raise RuntimeError("the server is already serving")
        if self.released is not None:
            raise RuntimeError(f"the engine is released (level {self.released}): wake it before binding")
        t0 = time.monotonic()
        checked = await self.check_canary(args) if args.get("expect") else None
        t_canary = time.monotonic()
        from vllm import envs
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.launcher import create_server_socket, serve_http
        from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

        host, port = str(args["host"]), int(args["port"])
        key = args.get("api_key")
        self.args.host, self.args.port = host, port
        self.args.api_key = [key] if key else None
        socket_at = time.time()
        sock = create_server_socket((host, port), reuse_port=False)
        app = self.app
        if key:  # vLLM adds its authentication middleware while building the app
            app = build_app(self.args, self.supported_tasks, self.engine.model_config)
            for name, value in self.app.state._state.items():  # the serving objects built before the dump
                setattr(app.state, name, value)
            app.state.args = self.args
        t_app = time.monotonic()
        kwargs = {}
        log_config = get_uvicorn_log_config(self.args)
        if log_config is not None:
            kwargs["log_config"] = log_config
        a = self.args
        self.http = asyncio.create_task(serve_http(
            app, sock=sock, enable_ssl_refresh=a.enable_ssl_refresh, host=host, port=port,
            log_level=a.uvicorn_log_level, access_log=not a.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ssl_keyfile=a.ssl_keyfile,
            ssl_certfile=a.ssl_certfile, ssl_ca_certs=a.ssl_ca_certs, ssl_cert_reqs=a.ssl_cert_reqs,
            ssl_ciphers=a.ssl_ciphers, h11_max_incomplete_event_size=a.h11_max_incomplete_event_size,
            h11_max_header_count=a.h11_max_header_count, **kwargs))
        deadline = time.monotonic() + 60
        while True:
            server = getattr(app.state, "server", None)
            if server is not None and server.started:
                break
            if self.http.done() or time.monotonic() > deadline:
                self.http.cancel()
                self.http = None
                sock.close()
                raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
            await asyncio.sleep(0.002)
        done = time.monotonic()
        _log("serving on %s:%d (API key %s)", host, port, "required" if key else "not required")
        return {"address": f"{host}:{port}", "auth": bool(key), "canary": checked, "bound_at": time.time(),
                "seconds": {"canary": round(t_canary - t0, 4), "app": round(t_app - t_canary, 4),
                            "http_start": round(done - t_app, 4)},
                # Wall clock, for whoever checks from outside that nothing listened before.
                "canary_passed_at": checked["finished_at"] if checked else None, "socket_at": socket_at}


def _log(message: str, *args) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.fastvllm.api_entry").info(message, *args)


class CanaryMismatch(RuntimeError):
    """The engine's answer to the canary is not the recorded one."""


def _served_name(engine, args) -> str:
    names = args.served_model_name
    if names:
        return names[0] if isinstance(names, (list, tuple)) else str(names)
    return str(engine.model_config.served_model_name or args.model)


async def run(control_dir: Path, args) -> None:
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import logger as launcher_logger
    from vllm.entrypoints.serve.utils.api_utils import log_non_default_args, log_version_and_model
    from vllm.utils.system_utils import decorate_logs, set_ulimit
    from vllm.version import __version__ as vllm_version

    decorate_logs("APIServer", skip_if_decorated=True)
    log_version_and_model(launcher_logger, vllm_version, args.model)
    log_non_default_args(args)
    set_ulimit()
    channel = ServerEnd(control_dir)
    async with build_async_engine_client(args) as engine:
        session = Session(engine, args, channel)
        await session.prepare()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # serve_http takes these over once bound
            loop.add_signal_handler(sig, stop.set)
        commands = asyncio.create_task(session.commands())
        shutdown = None
        while not stop.is_set():
            if session.http is not None and session.http.done():
                shutdown = session.http.result()
                break
            if commands.done():  # a bug in the command loop: stop rather than hang unbound
                commands.result()
            await asyncio.sleep(0.05)
        commands.cancel()
    if shutdown is not None:
        await shutdown


def main(argv: list[str] | None = None) -> None:
    control_dir, args = parse_args(sys.argv[1:] if argv is None else argv)

    def interrupt(*_):  # until the engine is up and the loop's own handlers take over
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    import uvloop

    try:
        uvloop.run(run(control_dir, args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
