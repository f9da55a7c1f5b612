"""Random models and a small tokenizer built from configs, for tests and benchmarks.

Nothing is downloaded and the default model is not needed:

- ``build_tiny_tokenizer(out_dir)`` trains a byte-level BPE of ``TINY_VOCAB`` tokens on the
  embedded default data (all ten languages), shaped like SmolLM2's tokenizer: the same special
  tokens and ids, pre-tokenizer (single digits, then GPT-2's byte-level regex; llama.cpp's
  ``smollm`` family, see ``TINY_TOKENIZER_PRE``) and ChatML chat template.
- ``TINY_CONFIGS`` holds one small config per supported architecture family, including the
  variants users bring (Llama-3 style GQA with ``llama3`` rope scaling, Phi-3.5 longrope).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

# Vocabulary of the test tokenizer, and so of the tiny models' embeddings.
TINY_VOCAB = 2048
# tokenizer.ggml.pre for the test tokenizer: its check-text hash is unknown to the GGUF
# exporter (a new vocabulary), so GGUF exports of tiny models pass tokenizer_pre=this.
TINY_TOKENIZER_PRE = "smollm"
# SmolLM2's special tokens at SmolLM2's ids (unk, bos, eos; pad = eos).
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# SmolLM2-Instruct's ChatML template (a default system prompt when none is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = {
    "vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "tie_word_embeddings": False,
}

TINY_CONFIGS: dict[str, dict] = {
    "llama": {**_COMMON, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "tie_word_embeddings": True, "rope_theta": 100000.0},
    "llama3": {**_COMMON, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "rope_theta": 500000.0, "max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}},
    "mistral": {**_COMMON, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                "rope_theta": 1000000.0, "sliding_window": None},
    "qwen2": {**_COMMON, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
              "rope_theta": 1000000.0, "use_sliding_window": False},
    "qwen3": {**_COMMON, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
              "head_dim": 16, "rope_theta": 1000000.0, "use_sliding_window": False},
    "phi3": {**_COMMON, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"],
             "num_key_value_heads": 4, "rope_theta": 10000.0, "max_position_embeddings": 4096,
             "original_max_position_embeddings": 4096, "resid_pdrop": 0.0,
             "embd_pdrop": 0.0, "attention_dropout": 0.0, "pad_token_id": 2},
    "phi3-longrope": {**_COMMON, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"],
                      "num_key_value_heads": 4, "rope_theta": 10000.0,
                      "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                      "rope_scaling": {"type": "longrope",
                                       "short_factor": [1.0 + 0.05 * i for i in range(8)],
                                       "long_factor": [1.0 + 0.5 * i for i in range(8)]},
                      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0},
    "gemma2": {**_COMMON, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
               "head_dim": 16, "tie_word_embeddings": True, "query_pre_attn_scalar": 16,
               "sliding_window": 512, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0, "hidden_activation": "gelu_pytorch_tanh"},
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def _tiny_corpus() -> list[str]:
    """Training text of the test tokenizer: every default row in every language, in order."""
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.data import load_prompts

    rows = load_prompts("default", DEFAULT_LANGUAGES, split="all").rows
    extra = ["system\n", "user\n", "assistant\n",
             "You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    return [r[lang] for r in rows for lang in DEFAULT_LANGUAGES] + extra


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = TINY_VOCAB) -> Path:
    """Train and save a small SmolLM2-shaped byte-level BPE tokenizer (deterministic).

    Args:
        out_dir: directory to write ``tokenizer.json``, ``tokenizer_config.json``,
            ``special_tokens_map.json``, ``chat_template.jinja`` (and the slow tokenizer's
            ``vocab.json``/``merges.txt``) into; created when missing.
        vocab_size: total tokens, special tokens included.

    Returns:
        The output directory.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                         use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_tiny_corpus(), trainer=trainer)
    backend.post_processor = None
    unk, bos, eos = TINY_SPECIALS
    tok = GPT2TokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                            unk_token=unk, pad_token=eos, add_bos_token=False,
                            add_prefix_space=False, model_max_length=8192)
    tok.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def build_random_model(
    config: dict,
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_size: str | int = "200KB",
    tokenizer_from: str | Path | None = None,
    seed: int = 0,
    init_std: float = 0.05,
) -> Path:
    """Build a random causal LM from a config dict and save it sharded as safetensors.

    Args:
        config: a ``config.json``-style dict with ``model_type``.
        out_dir: directory to create.
        dtype: ``fp32``/``bf16``/``fp16`` for the stored weights.
        max_shard_size: passed to ``save_pretrained``; the default gives the tiny configs
            several shards (about one block each in fp32), as real checkpoints have.
        tokenizer_from: a directory whose tokenizer files are copied (``build_tiny_tokenizer``'s
            output, or a real model's, whose vocabulary must fit ``config["vocab_size"]``).
        seed: torch seed for the random init.
        init_std: std of the normal init (larger than HF's default, so outputs are peaky).

    Returns:
        The output directory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lens_merge.models import torch_dtype

    cfg = copy.deepcopy(config)
    model_type = cfg.pop("model_type")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    hf_cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norm weights, so errors in norms show up
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(torch_dtype(dtype))
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_from) / f
            if src.is_file():
                shutil.copy2(src, out / f)
    return out


def random_delta(model_dir: str | Path, top_k: int = 2, scale: float = 0.01, seed: int = 0,
                 languages: list[str] | None = None):
    """A Lens delta with random dW on every tensor of the top ``top_k`` blocks.

    The base hashes are taken from the checkpoint's stored bytes, as training records them.
    """
    import torch

    from lens_merge.architectures import for_config
    from lens_merge.weights.checkpoint import Checkpoint, hash_entry
    from lens_merge.weights.delta import LensDelta

    ck = Checkpoint.open(model_dir)
    cfg = ck.config()
    arch = for_config(cfg)
    n = cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    tensors, records = {}, {}
    for name in ck.tensor_names():
        bid = arch.block_of(name)
        if bid is None or bid < n - top_k:
            continue
        e = ck.entry(name)
        tensors[name] = torch.randn(e.shape, generator=g) * scale
        records[name] = {"shape": list(e.shape), "base_dtype": e.dtype,
                         "base_sha256": hash_entry(e)}
    meta = {"base": {"ref": str(model_dir), "path": str(model_dir),
                     "model_type": cfg["model_type"], "architecture": arch.name,
                     "num_hidden_layers": n},
            "languages": languages or ["en", "zh", "ja"], "top_k": top_k,
            "blocks": list(range(n - top_k, n)), "tensors": records,
            "loss_weights": {}, "hyperparameters": {"random": True, "scale": scale},
            "final_losses": {}, "subspace_sha256": ""}
    return LensDelta(tensors=tensors, meta=meta)
