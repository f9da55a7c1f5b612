"""Random models built from configs, for tests and benchmarks (no downloads).

``TINY_CONFIGS`` holds one small config per supported architecture family, including the
variants users bring (Llama-3 style GQA with ``llama3`` rope scaling, Phi-3.5 longrope).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

_COMMON = {
    "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
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


def build_random_model(
    config: dict,
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_size: str | int = "5MB",
    tokenizer_from: str | Path | None = None,
    seed: int = 0,
    init_std: float = 0.05,
) -> Path:
    """Build a random causal LM from a config dict and save it sharded as safetensors.

    Args:
        config: a ``config.json``-style dict with ``model_type``.
        out_dir: directory to create.
        dtype: ``fp32``/``bf16``/``fp16`` for the stored weights.
        max_shard_size: passed to ``save_pretrained`` (small values give several shards).
        tokenizer_from: a model directory whose tokenizer files are copied (e.g. the default).
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
    from lens_merge.checkpoint import Checkpoint, hash_entry
    from lens_merge.delta import LensDelta

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
