"""Build small random-weight Llama models on local disk, for tests and benchmarks.

There is no model hub here, and the snapshot/restore work only needs a model vLLM
can load by path whose weights have a known, realistic size; what the model says
does not matter. So we train a byte-level BPE tokenizer on a corpus generated in
code and save a random-init ``LlamaForCausalLM`` next to it. Everything is seeded,
so the same seed gives the same weight bytes and benchmarks compare like with like.

Two kinds of model:

- ``--size tiny|small`` (:data:`SIZES`): small invented shapes, built through transformers'
  own random init (cheap at these sizes), with a 4096-token tokenizer.
- ``--like NAME`` (:data:`LIKE`): the exact architecture, tensor names and shapes of a real
  checkpoint (e.g. Llama-3.2-3B, 6.4 GB), so load and restore times are those of the real
  model. Built without transformers' model classes: each tensor is drawn from its own seeded
  generator and written shard by shard with ``safetensors``, so memory stays at one shard
  and 6.4 GB takes about a minute on 2 cores instead of many. The tokenizer fills the
  checkpoint's whole vocabulary (Llama 3 layout: BPE ids, then 256 special tokens), so every
  id the model can sample decodes to text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from .errors import FastvllmError

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

# "Like" presets: the config.json of the real checkpoint on the hub (minus
# transformers_version, which the writer sets), so vLLM builds exactly the same model.
# Weights are random, so "Instruct" or base makes no difference; the names are those of
# model_names.WELL_KNOWN. Add a preset by copying a Llama-family config.json here: the
# tensor table reads hidden/intermediate sizes, layers, heads, head_dim, vocab and tying;
# vLLM reads the rest (rope scaling, eps) as it would from the real file.
_LLAMA3_COMMON = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, attention_dropout=0.0,
    mlp_bias=False, hidden_act="silu", bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    initializer_range=0.02, pretraining_tp=1, rms_norm_eps=1e-05, rope_theta=500000.0,
    max_position_embeddings=131072, torch_dtype="bfloat16", use_cache=True, vocab_size=128256)
LIKE: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B(-Instruct): 1.24e9 params, 2.47 GB.
    "llama-3.2-1b": dict(_LLAMA3_COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    # meta-llama/Llama-3.2-3B(-Instruct): 3.21e9 params, 6.43 GB.
    "llama-3.2-3b": dict(_LLAMA3_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    # meta-llama/Llama-3.1-8B(-Instruct): 8.03e9 params, 16.1 GB (untied: lm_head is its own tensor).
    "llama-3.1-8b": dict(_LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}
# Shards of at most ~2 GB: each is generated in memory and then written, so this bounds the
# maker's memory on a shared machine (llama-3.2-3b: 4 shards, peak RSS 2.4 GB, 46 s).
LIKE_SHARD_BYTES = 2_000_000_000
# Llama 3's tokenizer layout: vocab_size - 256 BPE tokens, then 256 special tokens
# (_llama3_specials).
_LLAMA3_SPECIALS = 256
_EMBED_STD = 0.02
LIKE_GAIN = 2.0  # see _init_std

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


def like_config(like: str | dict) -> dict:
    """The config.json contents of a preset name, or of a custom config dict (tests use a
    scaled-down one through the same writer); unknown names fail with the preset list."""
    if isinstance(like, dict):
        cfg = dict(like)
    elif like in LIKE:
        cfg = dict(LIKE[like])
    else:
        raise FastvllmError(f"no --like preset named {like!r}", fix=f"choose one of {', '.join(sorted(LIKE))}")
    if cfg.get("model_type", "llama") != "llama":
        raise FastvllmError(f"--like writes Llama-family checkpoints only, not {cfg['model_type']!r}",
                            fix="use a LlamaForCausalLM config")
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg


def tensor_table(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint with its shape, named exactly as HF Llama checkpoints
    name them (vLLM maps these names onto its fused layers). Cheap: nothing is allocated,
    so the 3B preset's shapes and parameter count are testable without writing 6.4 GB."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    table = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        table += [(p + "input_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (q, h)),
                  (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)),
                  (p + "self_attn.o_proj.weight", (h, q)),
                  (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (inter, h)),
                  (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter))]
    table.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        table.append(("lm_head.weight", (v, h)))
    return table


def param_count(config: dict) -> int:
    return sum(_numel(shape) for _, shape in tensor_table(config))


def _init_std(name: str, shape: tuple[int, ...]) -> float | None:
    """Standard deviation of a tensor's random init; None means all ones (the norms).

    Linear layers get ``LIKE_GAIN / sqrt(fan_in)``: a gain over 1 puts the random network
    in its chaotic regime, where the next token is a sensitive function of the context.
    Measured on the 3B shapes (transformers, 4 prompts, 16 greedy tokens): gain 1.0 (what
    keeps activations at unit scale) collapses, as deep random attention does: every
    context ends near one direction, one "hub" token wins the argmax, and the 4 prompts
    gave 1, 7, 6 and 2 distinct tokens, three of them looping on the same token id; gain
    1.5 and 2.0 gave 16 distinct tokens for every prompt. Llama's flat 0.02 is worse still
    (the layers vanish next to the embedding, and since 3B ties lm_head to it the last
    token becomes its own argmax), and the 0.1 the tiny preset uses is gain 5.5-9 here.
    Embeddings use Llama's 0.02: the first layer norm rescales them, and for the tied
    logits it is only a temperature, which greedy decoding ignores.
    """
    if name.endswith("norm.weight"):
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return _EMBED_STD
    return LIKE_GAIN * shape[1] ** -0.5


def _random_tensor(name: str, shape: tuple[int, ...], seed: int):
    """One tensor, from a generator seeded by (seed, name): the same bytes whatever the
    shard layout or generation order. Drawn in float32 blocks and cast to bf16, so the
    biggest tensor (the 128256-row embedding) never needs a float32 copy of itself."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    std = _init_std(name, shape)
    if std is None:
        return out.fill_(1.0)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    flat = out.view(-1)
    block = 1 << 25
    for start in range(0, flat.numel(), block):
        n = min(block, flat.numel() - start)
        flat[start:start + n].copy_(torch.randn(n, generator=gen).mul_(std))
    return out


def shard_plan(table: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Whole layers per shard, in checkpoint order, up to ``shard_bytes`` each (bf16)."""
    groups: dict[str, list] = {}
    for name, shape in table:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append((name, shape))
    shards: list[list] = []
    size = 0
    for group in groups.values():
        g_bytes = sum(2 * _numel(shape) for _, shape in group)
        if not shards or (size + g_bytes > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1] += group
        size += g_bytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _llama3_specials() -> list[str]:
    """Llama 3's 256 special tokens, in their id order (128000 = <|begin_of_text|> ...)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
    out, reserved = [], 0
    for i in range(_LLAMA3_SPECIALS):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def _name_corpus(lines: int) -> list[str]:
    """Lines of invented words: real words run out of BPE merges after a few thousand,
    and 128000 merges need a few hundred thousand distinct words."""
    rng = random.Random(4321)  # fixed: the tokenizer must not depend on the model seed
    word = lambda: "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 5)))  # noqa: E731
    return [" ".join(word() for _ in range(16)) for _ in range(lines)]


def _build_llama3_tokenizer(config: dict):
    """Byte-level BPE filling ``vocab_size - 256`` ids, then Llama 3's 256 special tokens:
    the real tokenizer's layout (bos 128000, eos <|eot_id|>), so every id below
    ``vocab_size`` decodes and the config's bos/eos ids mean what they mean upstream.
    About 6 s for Llama 3's 128000 BPE tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    vocab = config["vocab_size"]
    regular = vocab - _LLAMA3_SPECIALS
    if regular < 512:
        raise FastvllmError(f"vocab_size {vocab} is too small for the Llama 3 tokenizer layout",
                            fix=f"use at least {512 + _LLAMA3_SPECIALS}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus() + _name_corpus(regular // 6), trainer=trainer)
    if tok.get_vocab_size() != regular:
        raise RuntimeError(f"tokenizer reached {tok.get_vocab_size()} tokens, want {regular}")
    specials = _llama3_specials()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B",
        special_tokens=[(specials[0], regular)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token="<|eot_id|>",
        model_max_length=config.get("max_position_embeddings", 2048), chat_template=_LLAMA3_CHAT_TEMPLATE)


def _write_like(tmp: Path, config: dict, seed: int, shard_bytes: int) -> dict:
    """config.json, generation_config.json, the shards and their index, one shard in memory
    at a time. ``safetensors.torch.save_file`` (not fastvllm's own writer) so the files are
    laid out as hub checkpoints are: tensors sorted by name within each shard."""
    from safetensors.torch import save_file

    import transformers

    # transformers_version as save_pretrained writes it: without one, transformers 5 takes
    # any local tokenizer for a possibly broken Mistral one and warns on every load.
    config = {"transformers_version": transformers.__version__, **config}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    eos = config.get("eos_token_id")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos}, indent=2) + "\n")
    table = tensor_table(config)
    shards = shard_plan(table, shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = (f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                else "model.safetensors")
        tensors = {n: _random_tensor(n, shape, seed) for n, shape in shard}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        weight_map.update({n: name for n, _ in shard})
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return {"params": param_count(config), "shards": len(shards), "tensor_bytes": total}


def make_model(out_dir: Path, size: str | None = None, seed: int = 0, *, like: str | dict | None = None,
               shard_bytes: int = LIKE_SHARD_BYTES) -> dict:
    """Write a model directory vLLM can serve by path: ``size`` (tiny, the default, or
    small) or ``like`` (a :data:`LIKE` preset name, or a config dict of the same form).

    Built in a hidden sibling directory and renamed into place, so ``out_dir`` is
    either absent or complete: a half-written model would fail much later, inside
    vLLM, with a confusing error.
    """
    t0 = time.monotonic()
    if size is not None and like is not None:
        raise FastvllmError("--size and --like are exclusive", fix="pass one of them")
    if like is None:
        size = size or "tiny"
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
        config = None
    else:
        config = like_config(like)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; "
                              "remove it or pass another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
        if config is None:
            _build_tokenizer().save_pretrained(tmp)
            model = _build_model(size, seed)
            model.save_pretrained(tmp, safe_serialization=True)
            params = sum(p.numel() for p in model.parameters())
            del model
            extra = {"size": size, "params": params, "vocab_size": VOCAB_SIZE}
        else:
            _build_llama3_tokenizer(config).save_pretrained(tmp)
            written = _write_like(tmp, config, seed, shard_bytes)
            extra = {"like": like if isinstance(like, str) else "custom", "params": written["params"],
                     "vocab_size": config["vocab_size"], "shards": written["shards"]}
        for f in tmp.iterdir():  # safetensors comes out 0600; let other users serve it
            os.chmod(f, 0o644)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weight_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return {"path": str(out_dir), **extra, "weight_bytes": weight_bytes, "seed": seed,
            "seconds": round(time.monotonic() - t0, 2)}
