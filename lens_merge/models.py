"""Model references: ``default`` (the embedded SmolLM2) or a local Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lens_merge.errors import ModelError

if TYPE_CHECKING:
    import torch

DEFAULT = "default"

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def resolve_model(ref: str | Path, progress: bool = False) -> Path:
    """Turn a model reference into a local HF directory.

    Args:
        ref: ``"default"`` for the embedded SmolLM2-135M-Instruct, or a directory path.
        progress: show a progress bar if the default model must be materialized.

    Raises:
        ModelError: when the reference is neither ``default`` nor an existing directory.
    """
    if str(ref) == DEFAULT:
        from lens_merge.default_model import materialize_default

        return materialize_default(progress=progress)
    p = Path(ref).expanduser()
    if not p.is_dir():
        raise ModelError(f"model {str(ref)!r}: not 'default' and not an existing directory "
                         "(the Hub is not contacted; pass a local Hugging Face directory)")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: config.json missing (expected a Hugging Face model directory)")
    return p


def torch_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or the torch names) to a torch dtype."""
    import torch

    try:
        return getattr(torch, _DTYPES[name])
    except KeyError as exc:
        raise ModelError(f"dtype {name!r} unknown; use one of fp32, bf16, fp16") from exc


def load_model(path: str | Path, dtype: str | None = "fp32", device: str = "cpu"):
    """Load a causal LM with plain transformers (eager attention, eval mode).

    Args:
        path: a local HF directory (already resolved).
        dtype: ``fp32``/``bf16``/``fp16``, or None to keep the checkpoint's dtype.
        device: torch device string.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "eager"}
    kwargs["dtype"] = torch_dtype(dtype) if dtype else "auto"
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, padding_side: str = "left"):
    """Load the tokenizer of a model directory, with a pad token and the given padding side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def empty_model(path: str | Path, dtype: str | None = None):
    """The model of a directory's ``config.json`` with no weights (every tensor on meta).

    Built with accelerate's ``init_empty_weights`` (buffers, such as rotary frequencies, are
    real); ``lens_merge.weights.blocks.BlockLoader`` materializes parts of it from the shards.
    Eager attention, eval mode, like ``load_model``.

    Args:
        path: a local HF directory (already resolved).
        dtype: ``fp32``/``bf16``/``fp16`` for the meta parameters, or None for the config's.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    kwargs = {"attn_implementation": "eager"}
    if dtype:
        kwargs["dtype"] = torch_dtype(dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()
