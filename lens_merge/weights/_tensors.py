"""Tensor helpers shared by the fold's input checks (``_source``) and its write path
(``_write``): stored bytes, the W +- dW arithmetic, finiteness, CRC-32 and the delta's
fingerprint.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import TYPE_CHECKING

from lens_merge.errors import FoldError, ModelError
from lens_merge.weights.checkpoint import TensorEntry
from lens_merge.weights.shard_writer import COPY_CHUNK

if TYPE_CHECKING:
    import torch

    from lens_merge.weights.delta import LensDelta

# safetensors dtype -> torch dtype name, for the float types a delta can change.
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def st_dtype(t: torch.Tensor) -> str:
    """The safetensors dtype name of a tensor.

    Raises:
        FoldError: for a dtype safetensors (as written here) cannot hold.
    """
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    if t.dtype not in names:
        raise FoldError(f"tensor dtype {t.dtype} cannot be written to safetensors by lens-merge")
    return names[t.dtype]


def tensor_bytes(t: torch.Tensor):
    """The little-endian bytes of a tensor (a numpy view; no copy when contiguous)."""
    import torch

    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


def apply(w: torch.Tensor, d: torch.Tensor, sign: float, name: str) -> tuple[torch.Tensor, float]:
    """cast(W + sign*dW) computed in fp32 (fp64 for fp64 tensors); returns it and the cast error.

    Exactly the arithmetic of ``lens_merge.weights.delta.apply_delta``, so a fold reproduces the
    in-memory application bit for bit. ``w`` is consumed: when it is already in the compute
    dtype the sum is taken in place, to hold one copy of the tensor instead of two.

    Raises:
        FoldError: ``w`` is not a float tensor, or the result holds NaN/Inf.
    """
    import torch

    if not w.is_floating_point():
        raise FoldError(f"tensor {name}: dtype {w.dtype} is not floating point; a delta can "
                        "only change float tensors")
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    exact = w.to(compute)  # w itself when it is already in the compute dtype
    exact.add_(d.to(compute), alpha=sign)  # sign is +-1: exact scaling, same sum as W + sign*dW
    out = exact.to(w.dtype)
    if not all_finite(out):
        bad = int((~torch.isfinite(out)).sum())
        raise FoldError(f"tensor {name}: W {'+' if sign > 0 else '-'} dW has {bad} NaN/Inf "
                        f"values in {str(w.dtype).split('.')[-1]}; refusing to write it")
    if out.dtype == compute or not out.numel():  # no cast happened
        return out, 0.0
    return out, float(out.to(compute).sub_(exact).abs_().max())


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    Fast path: a NaN or Inf anywhere makes the fp32 (fp64) sum non-finite, so a finite sum
    proves the tensor finite; only a non-finite sum (possibly an overflow of finite values)
    needs the elementwise check.
    """
    import torch

    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def crc32(data) -> str:
    """CRC-32 of a bytes-like object, as 8 hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def crc32_entry(entry: TensorEntry) -> str:
    """CRC-32 of a tensor's stored bytes, read in chunks.

    Raises:
        ModelError: the shard ends inside the tensor.
    """
    crc = 0
    with open(entry.shard, "rb") as fh:
        fh.seek(entry.begin)
        left = entry.nbytes
        while left:
            chunk = fh.read(min(COPY_CHUNK, left))
            if not chunk:
                raise ModelError(f"{entry.shard}: truncated at tensor {entry.name}")
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return f"{crc & 0xFFFFFFFF:08x}"


def delta_fingerprint(delta: LensDelta) -> str:
    """Identity of a delta's contents, independent of where it is stored.

    sha256 of the sorted lines ``"<name> <shape> <CRC-32 of the fp32 bytes>"``, one per tensor
    (CRC-32 runs about eight times faster than sha256; this guards against mix-ups, not
    against forgery, for which the base hashes recorded in the delta are the check).
    """
    lines = []
    for name in sorted(delta.tensors):
        t = delta.tensors[name].detach().float().contiguous().cpu()
        lines.append(f"{name} {list(t.shape)} {crc32(tensor_bytes(t))}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
