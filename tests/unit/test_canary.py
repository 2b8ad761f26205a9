"""Canary comparison: token ids exact, sampled log-probabilities within the tolerance."""

from fastvllm import canary

REC = {"token_ids": [5, 6, 7], "logprobs": [-1.0, -2.0, -3.0], "text": "abc"}


def test_identical_matches():
    assert canary.mismatch(REC, dict(REC)) is None


def test_logprob_within_tolerance_matches():
    got = dict(REC, logprobs=[-1.0, -2.0 + canary.LOGPROB_TOLERANCE / 2, -3.0])
    assert canary.mismatch(REC, got) is None


def test_same_text_other_logprob_is_caught():
    got = dict(REC, logprobs=[-1.0, -2.003, -3.0])
    why = canary.mismatch(REC, got)
    assert "same tokens and text" in why and "token 1" in why and "0.003" in why


def test_other_tokens_are_caught():
    why = canary.mismatch(REC, dict(REC, token_ids=[5, 9, 7], text="axc"))
    assert "from position 1" in why and "'axc'" in why


def test_missing_logprobs_or_old_record():
    assert "lacks" in canary.mismatch(REC, dict(REC, logprobs=[]))
    assert "older fastvllm" in canary.mismatch({"text": "abc"}, REC)


def test_nan_is_never_a_match():
    assert canary.mismatch(REC, dict(REC, logprobs=[-1.0, float("nan"), -3.0]))


def test_a_restore_checks_a_prefix_of_the_recorded_canary():
    from fastvllm import canary

    recorded = {"prompt": canary.PROMPT, "max_tokens": 16, "completion": "abc", "tolerance": 1e-4,
                "token_ids": list(range(16)), "logprobs": [-0.5] * 16}
    head = canary.prefix(recorded)
    assert head["max_tokens"] == canary.RESTORE_TOKENS == len(head["token_ids"]) == len(head["logprobs"])
    assert head["token_ids"] == list(range(canary.RESTORE_TOKENS)) and recorded["max_tokens"] == 16
    n = canary.RESTORE_TOKENS
    assert n >= 2, "token 0 is the prefill's; a decode step (KV cache) needs token 1"
    same = {"token_ids": list(range(n)), "logprobs": [-0.5] * n, "text": "ab"}
    assert canary.mismatch(head, same) is None
    moved = {**same, "logprobs": [-0.5, -0.5003] + [-0.5] * (n - 2)}
    assert "log-probability of token 1" in canary.mismatch(head, moved)
    other = {**same, "token_ids": [0, 9] + list(range(2, n))}
    assert "token ids differ from position 1" in canary.mismatch(head, other)
