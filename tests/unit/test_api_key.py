"""API keys are taken out of the vLLM args and the environment, and redacted in records."""

from fastvllm import api_key


def test_split_both_spellings():
    assert api_key.split(["--enforce-eager", "--api-key", "k1"]) == (["--enforce-eager"], "k1")
    assert api_key.split(["--api-key=k2", "--x"]) == (["--x"], "k2")
    assert api_key.split(["--x"]) == (["--x"], None)


def test_resolve_precedence():
    env = {"VLLM_API_KEY": "from-env"}
    assert api_key.resolve("given", ["--api-key", "in-args"], env) == ([], "given")
    assert api_key.resolve(None, ["--api-key", "in-args"], env) == ([], "in-args")
    assert api_key.resolve(None, [], env) == ([], "from-env")
    assert api_key.resolve(None, [], {"VLLM_API_KEY": ""}) == ([], None)


def test_redact():
    out = api_key.redact(["a", "--api-key", "sk-1", "--api-key=sk-2"])
    assert "sk-1" not in out and "--api-key=sk-2" not in out and out[0] == "a"


def test_headers():
    assert api_key.headers("k") == {"Authorization": "Bearer k"} and api_key.headers(None) == {}
