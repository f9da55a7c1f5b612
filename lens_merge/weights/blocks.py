"""Parts of a model, materialized one at a time from its safetensors shards.

A model built by ``lens_merge.models.empty_model`` holds no weights (accelerate's
``init_empty_weights``: every parameter on the meta device). ``BlockLoader.load`` fills one
submodule (the embeddings, a decoder block, the final norm) from the shards with safetensors'
lazy ``safe_open``, reading only that part's tensors (set as accelerate's
``set_module_tensor_to_device`` sets them); ``release`` puts them back on the meta device,
which frees their memory. Shards are opened per load and closed after it, so the pages of a
memory-mapped shard are not held while other parts run, and freed heap memory is given back
to the system after each release (``trim_heap``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from lens_merge.errors import ModelError
from lens_merge.weights.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn


class BlockLoader:
    """Fills submodules of a meta-device model from the checkpoint ``model_dir``.

    Args:
        model_dir: a Hugging Face directory with safetensors weights.
        dtype: the dtype floating-point tensors are cast to (None: as stored).
        device: where the materialized tensors live.
    """

    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.checkpoint = Checkpoint.open(model_dir)
        self.dtype = dtype
        self.device = device

    def tensor_names(self, model: nn.Module, prefix: str) -> list[str]:
        """Full names of the parameters and persistent buffers under ``prefix``."""
        module = model.get_submodule(prefix)
        return [f"{prefix}.{n}" if prefix else n for n in module.state_dict(keep_vars=True)]

    def load(self, model: nn.Module, prefix: str) -> list[str]:
        """Materialize every parameter and persistent buffer of the submodule ``prefix``.

        Args:
            model: the (meta-device) model whose submodule is filled.
            prefix: the submodule's name in ``model`` (``model.layers.3``).

        Returns:
            The full names of the tensors loaded (pass them to ``release``).

        Raises:
            ModelError: when the checkpoint lacks one of the submodule's tensors.
        """
        names = self.tensor_names(model, prefix)
        for name, value in _read(self.checkpoint, names, self.dtype, f"module {prefix!r}"):
            _set_tensor(model, name, value.to(self.device))
        return names

    def release(self, model: nn.Module, names: list[str]) -> None:
        """Put the tensors ``names`` back on the meta device (their memory is freed)."""
        for name in names:
            _set_tensor(model, name, model.get_parameter(name).to("meta")
                        if _is_parameter(model, name) else model.get_buffer(name).to("meta"))
        trim_heap()


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(owner)._parameters


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter (keeping its ``requires_grad``) or buffer by ``value``.

    As accelerate's ``set_module_tensor_to_device`` does; that one turned parameters into
    plain tensors under ``accelerate launch --multi_gpu`` on the CPU (torch 2.13,
    accelerate 1.15), which the optimizer and DDP then miss.
    """
    from torch import nn

    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = module._parameters.get(leaf)
    if old is not None:
        if tuple(old.shape) != tuple(value.shape):
            raise ModelError(f"tensor {name}: checkpoint shape {tuple(value.shape)}, the "
                             f"model's config expects {tuple(old.shape)}")
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def read_tensors(model_dir: str | Path, names: list[str],
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors ``names`` of a checkpoint (each shard opened once).

    Args:
        model_dir: a Hugging Face directory with safetensors weights.
        names: tensor names as the checkpoint stores them.
        dtype: cast floating-point tensors to this (None: as stored).

    Raises:
        ModelError: naming a tensor the checkpoint lacks.
    """
    return dict(_read(Checkpoint.open(model_dir), names, dtype, "the caller"))


def _read(ck: Checkpoint, names: list[str], dtype: torch.dtype | None,
          who: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from the shards with ``safe_open``, one shard open at a time."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = {}
    for name in names:
        if name not in ck.index:
            raise ModelError(f"{ck.root}: no tensor {name!r} in the checkpoint, which {who} "
                             "needs")
        by_shard.setdefault(ck.index[name], []).append(name)
    for shard, shard_names in by_shard.items():
        f = safe_open(str(ck.root / shard), framework="pt", device="cpu")
        try:
            for name in shard_names:
                t = f.get_tensor(name)
                yield name, (t.to(dtype) if dtype is not None and t.is_floating_point()
                             else t)
        finally:
            del f


@cache
def _malloc_trim():
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere a no-op).

    Between blocks the activations are reallocated at new places in the heap, and glibc keeps
    the freed pages: without this, resident memory grows by a few MB per block streamed
    (measured: +270 MB over 24 blocks of width 1024), which is what streaming is to avoid.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
