"""Build small random-weight Llama models on local disk, for tests and benchmarks.

There is no model hub here, and the snapshot/restore work only needs a model vLLM
can load by path whose weights have a known, realistic size; what the model says
does not matter. So we train a byte-level BPE tokenizer on a corpus generated in
code and save a random-init ``LlamaForCausalLM`` next to it. Everything is seeded,
so the same seed gives the same weight bytes and benchmarks compare like with like.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order

# Sizes on disk are bf16 weights. GQA (kv heads < heads) and head_dim 64 are what real
# Llama-family checkpoints use, so vLLM takes the same attention paths as in production.
# Init std 0.1, not Llama's 0.02: at 0.02 the residual stream is dominated by the
# last token's embedding and greedy decoding falls into a 1-2 token loop at once; at
# 0.1 sixteen greedy tokens are all distinct, which makes outputs easy to compare.
_COMMON = dict(head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False,
               initializer_range=0.1)
SIZES: dict[str, dict] = {
    # ~6.0M params, ~12 MB: fast enough for unit tests.
    "tiny": dict(_COMMON, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    # ~466M params, ~0.93 GB (0.87 GiB): big enough that snapshot I/O is realistic.
    "small": dict(_COMMON, hidden_size=1536, intermediate_size=4096, num_hidden_layers=18,
                  num_attention_heads=24, num_key_value_heads=8),
}

_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_WORDS = {
    "det": "the a this that every one some no each another".split(),
    "adj": ("old new small large quiet bright dark green red blue cold warm early late "
            "quick slow heavy light simple strange gentle busy empty full broken clever "
            "careful tired happy silent distant narrow wide ancient modern wooden golden").split(),
    "noun": ("river city window garden teacher engine market village forest machine "
             "letter bridge morning evening kitchen library station mountain harbor "
             "island painter farmer doctor student soldier captain question answer "
             "story winter summer autumn spring number signal message valley road "
             "tower castle country ocean storm cloud stone paper table chair lamp door "
             "house ship train horse bird child friend stranger music picture school").split(),
    "verb": ("found opened carried watched followed painted crossed built wrote read "
             "remembered covered measured described repaired visited answered moved "
             "lifted counted ignored noticed borrowed collected returned explained "
             "ordered closed filled cleaned sold bought kept left").split(),
    "adv": ("slowly quickly quietly often never always again later soon carefully "
            "suddenly finally almost nearly rarely").split(),
    "prep": "near under over behind beside across through inside outside beyond".split(),
}
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ["a", "e", "i", "o", "u", "ai", "ou"]]


def _corpus(lines: int = 1500) -> list[str]:
    """English-like sentences plus invented names, so BPE has enough distinct words
    to fill the whole vocabulary (real words alone run out of merges)."""
    rng = random.Random(1234)  # fixed: the tokenizer must not depend on the model seed
    pick = lambda k: rng.choice(_WORDS[k])  # noqa: E731
    name = lambda: "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).title()  # noqa: E731
    out = []
    for _ in range(lines):
        s = (f"{pick('det').title()} {pick('adj')} {pick('noun')} {pick('verb')} {pick('det')} "
             f"{pick('noun')} {pick('prep')} {name()} {pick('adv')}")
        if rng.random() < 0.5:
            s += f", and {name()} {pick('verb')} {rng.randint(2, 9999)} of them"
        out.append(s + rng.choice([".", ".", "!", "?"]))
    return out


def _build_tokenizer():
    """Byte-level BPE: any text encodes without <unk> and decodes back exactly, so
    benchmark prompts need no care; bos is prepended the way Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:  # the model's embedding size depends on it
        raise RuntimeError(f"tokenizer reached {tok.get_vocab_size()} tokens, want {VOCAB_SIZE}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=2048, chat_template=_CHAT_TEMPLATE)


def _build_model(size: str, seed: int):
    """Initialise straight in bf16 under no_grad: a float32 copy of "small" would
    double peak memory for nothing."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         dtype="bfloat16", **SIZES[size])
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old_dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return model


def make_model(out_dir: Path, size: str = "tiny", seed: int = 0) -> dict:
    """Write a model directory vLLM can serve by path.

    Built in a hidden sibling directory and renamed into place, so ``out_dir`` is
    either absent or complete: a half-written model would fail much later, inside
    vLLM, with a confusing error.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; "
                              "remove it or pass another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
        _build_tokenizer().save_pretrained(tmp)
        model = _build_model(size, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        del model
        for f in tmp.iterdir():  # safetensors comes out 0600; let other users serve it
            os.chmod(f, 0o644)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weight_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return {"path": str(out_dir), "size": size, "params": params,
            "weight_bytes": weight_bytes, "vocab_size": VOCAB_SIZE}
