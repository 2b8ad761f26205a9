"""The canary: a fixed greedy request whose answer proves a restored engine is the snapshot's.

A canary result is the generated token ids, the log-probability of each sampled token and
the text. Two results match when the token ids are identical and every sampled token's
log-probability differs by at most :data:`LOGPROB_TOLERANCE`. Text alone is too weak: a
weight that came back slightly wrong (a tensor scaled by 1.001) still gives the same
greedy tokens on a small model, but moves their log-probabilities.

Why the tolerance is 1e-4 nats, tighter than vLLM's own 1e-3: on CPU the same engine
computes bit-identical log-probabilities for the same request before a dump, after a
release and reload, and after a restore (measured here: differences of 0.0). The
tolerance only leaves room for reduction-order noise of other kernels (GPU), and at 1e-3
the perturbed-weight test case of this project (one tensor x 1.001 on the tiny model)
would pass unnoticed.

The request is computed inside the server (:mod:`fastvllm.inside_vllm.api_entry`),
through the engine client, before the server listens on any port.
"""

from __future__ import annotations

import math

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MAX_TOKENS = 16
# A restore checks the first RESTORE_TOKENS of the recorded canary, before it binds. Every
# decode step costs ~0.08 s on the 0.93 GB model and ~0.6 s on Llama-3.2-3B shapes here (2
# cores), and a server binds only after its canary: 16 tokens would add ~9 s to a 3B restore.
# Greedy decoding is causal, so a prefix of the same request is the same computation. Two
# tokens cover both paths a restore can break: token 0 comes from the prefill, token 1 from
# a decode step that reads the (re-allocated) KV cache. With their log-probabilities they
# are a stricter proof than sixteen tokens of text: the log-probability of every sampled
# token moves when any weight does. The snapshot's rehearsal checks all sixteen.
RESTORE_TOKENS = 2
WARMUP_PROMPT = "Hello, my name is"
LOGPROB_TOLERANCE = 1e-4


def request() -> dict:
    """The canary request, as recorded in a manifest."""
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 0, "tolerance": LOGPROB_TOLERANCE}


def prefix(record: dict, n: int = RESTORE_TOKENS) -> dict:
    """The first ``n`` tokens of a recorded canary (ids and log-probabilities), to check a
    restore with (see :data:`RESTORE_TOKENS`); its text is not known, so it is dropped."""
    ids = list(record.get("token_ids") or [])[:n]
    return {**record, "token_ids": ids, "logprobs": list(record.get("logprobs") or [])[:n],
            "max_tokens": len(ids), "text": None}


def mismatch(expected: dict, got: dict, tolerance: float | None = None) -> str | None:
    """Why ``got`` is not ``expected`` (one line), or None when they match."""
    tolerance = LOGPROB_TOLERANCE if tolerance is None else tolerance
    want_ids, got_ids = list(expected.get("token_ids") or []), list(got.get("token_ids") or [])
    if not want_ids:
        return "the recorded canary has no token ids (a snapshot from an older fastvllm?)"
    if want_ids != got_ids:
        at = next((i for i, (a, b) in enumerate(zip(want_ids, got_ids)) if a != b), min(len(want_ids), len(got_ids)))
        recorded = f", recorded {expected['text']!r}" if expected.get("text") is not None else ""
        return f"token ids differ from position {at} (answered {got.get('text')!r}{recorded})"
    want_lp, got_lp = list(expected.get("logprobs") or []), list(got.get("logprobs") or [])
    if len(want_lp) != len(want_ids) or len(got_lp) != len(got_ids):
        return "a canary lacks the log-probabilities of its tokens"
    worst, at = 0.0, -1
    for i, (a, b) in enumerate(zip(want_lp, got_lp)):
        diff = abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf
        if diff > worst:
            worst, at = diff, i
    if worst > tolerance:
        return (f"same tokens and text ({got.get('text')!r}), but the log-probability of token {at} "
                f"differs by {worst:.3g} (tolerance {tolerance:g})")
    return None
