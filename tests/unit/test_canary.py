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
