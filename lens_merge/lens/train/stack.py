"""Running only the top K blocks (plus the final norm) of a transformers causal LM.

``TopStack`` holds the model's own top K decoder blocks, its final norm and its rotary
embedding (no embeddings, no lm_head, no lower blocks) and runs them on the cached residual
stream as the model's forward would (``lens_merge.lens.stream.run_blocks``). The modules are
the model's (no copy), so training the stack trains the model's parameters. ``load_top_stack``
builds the model on the meta device and materializes only those parts from the shards.

``FrozenHead`` is the frozen lm_head (the embedding matrix when the model ties them), read
from the shards alone: the next-token log-probabilities of final (normed) states, for the
cache's reference distribution and the trainer's KL term.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lens_merge.lens.hidden import position_ids


class TopStack(nn.Module):
    """The top K decoder blocks and the final norm of ``model``, fed from the cache.

    Args:
        model: a causal LM whose top ``top_k`` blocks and final norm hold weights (a loaded
            model, or ``lens_merge.models.empty_model`` with those parts materialized).
        top_k: K.
        input_scale: the factor the model's forward multiplies ``inputs_embeds`` by (Gemma:
            sqrt(hidden)); the cache holds states divided by it.
    """

    def __init__(self, model, top_k: int, input_scale: float = 1.0) -> None:
        super().__init__()
        decoder = model.base_model
        n = len(decoder.layers)
        if not 0 < top_k <= n:
            raise ValueError(f"top_k={top_k} does not fit a model of {n} blocks")
        self.first_block = n - top_k
        self.layers = nn.ModuleList(list(decoder.layers)[self.first_block:])
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.config = model.config
        self.input_scale = input_scale
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.layers.parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final (normed) states [B, T, d] from block-(N-K) inputs ``x`` [B, T, d]."""
        from lens_merge.lens.stream import run_blocks

        h = x
        if self.input_scale != 1.0:  # as Gemma2's forward: a tensor of the states' dtype
            h = h * torch.tensor(self.input_scale, dtype=h.dtype)
        h = run_blocks(self.layers, h, mask, position_ids(mask), self.config, self.rotary_emb)
        return self.norm(h)


def load_top_stack(model_dir: str | Path, top_k: int, dtype: str = "fp32",
                   device: str = "cpu") -> tuple[TopStack, nn.Module]:
    """The top K blocks, final norm and rotary embedding of a checkpoint, nothing else.

    Args:
        model_dir: the model directory (safetensors weights).
        top_k: K.
        dtype: dtype of the materialized weights (fp32: the master weights of bf16 training).
        device: where they live.

    Returns:
        (the stack, the model it belongs to: every other tensor of it on the meta device;
        its ``named_parameters`` name the stack's weights as the checkpoint does).
    """
    from lens_merge.architectures import for_config
    from lens_merge.lens.stream import input_scale_of
    from lens_merge.models import empty_model, torch_dtype
    from lens_merge.weights.blocks import BlockLoader

    model = empty_model(model_dir, dtype)
    decoder = model.base_model
    n = len(decoder.layers)
    if not 0 < top_k <= n:
        raise ValueError(f"top_k={top_k} does not fit a model of {n} blocks")
    names = {id(m): name for name, m in model.named_modules()}
    loader = BlockLoader(model_dir, torch_dtype(dtype), device)
    for layer in list(decoder.layers)[n - top_k:]:
        loader.load(model, names[id(layer)])
    loader.load(model, names[id(decoder.norm)])
    decoder.rotary_emb.to(device)
    scale = input_scale_of(model.config, for_config(model.config.to_dict()))
    return TopStack(model, top_k, scale), model


class FrozenHead:
    """The frozen output head: final states -> next-token log-probabilities.

    Args:
        weight: [V, d] the lm_head weight (no gradient flows to it).
        softcap: the model's ``final_logit_softcapping`` (Gemma 2), None when it has none.
    """

    def __init__(self, weight: torch.Tensor, softcap: float | None = None) -> None:
        self.weight = weight.detach().requires_grad_(False)
        self.softcap = softcap

    def to(self, device: str | torch.device) -> FrozenHead:
        """The head on ``device``."""
        return FrozenHead(self.weight.to(device), self.softcap)

    def log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """fp32 log-probabilities [B, V] of final states ``z`` [B, d], as the model's forward
        computes its logits (the head's dtype, then the soft cap)."""
        logits = torch.nn.functional.linear(z.to(self.weight.dtype), self.weight).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, -1)


def head_tensor_name(model_dir: str | Path) -> str:
    """The checkpoint tensor the output head reads: ``lm_head`` or, when the model ties its
    embeddings and stores no head, the embedding matrix.

    Raises:
        ModelError: when the checkpoint holds neither.
    """
    from lens_merge.architectures import for_config
    from lens_merge.errors import ModelError
    from lens_merge.weights.checkpoint import Checkpoint

    ck = Checkpoint.open(model_dir)
    config = ck.config()
    arch = for_config(config)
    if arch.lm_head in ck.index:
        return arch.lm_head
    if config.get("tie_word_embeddings", True) and arch.embed in ck.index:
        return arch.embed
    raise ModelError(f"{ck.root}: no {arch.lm_head!r} in the checkpoint and the embeddings "
                     f"are not tied (tie_word_embeddings false): the KL term needs the head")


def load_head(model_dir: str | Path, dtype: str | None = "fp32",
              device: str | torch.device = "cpu") -> FrozenHead:
    """Read the output head of a checkpoint (one tensor) for ``FrozenHead``.

    Args:
        model_dir: the model directory (safetensors weights).
        dtype: its dtype (``fp32``/``bf16``/``fp16``; None: as stored).
        device: where it lives.
    """
    from lens_merge.models import torch_dtype
    from lens_merge.weights.blocks import read_tensors
    from lens_merge.weights.checkpoint import Checkpoint

    name = head_tensor_name(model_dir)
    w = read_tensors(model_dir, [name], torch_dtype(dtype) if dtype else None)[name]
    cap = Checkpoint.open(model_dir).config().get("final_logit_softcapping")
    return FrozenHead(w.to(device), float(cap) if cap else None)
