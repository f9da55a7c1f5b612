"""A Lens delta (or a PEFT LoRA folder lens-merge wrote) as a llama.cpp LoRA adapter GGUF.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp``
reads: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32),
``general.architecture`` = the base's GGUF architecture, and per linear weight a pair
``blk.N.<name>.weight.lora_a`` [rank, in] / ``.lora_b`` [out, rank] (PyTorch order: gguf-py
reverses the shape into ggml's ``ne``). Names come from gguf-py's tensor-name map, as in the
GGUF exporter, and B gets the same Q/K row permutation the base export applies to W.

llama.cpp applies ``scale * alpha / rank * B @ A`` with ``rank`` read per tensor and one alpha
per file; per-tensor ranks differ, so each B is stored times ``rank / alpha`` and the update
is exactly ``scale * B @ A`` for every tensor (alpha defaults to the largest rank).

Refused: a base architecture the GGUF exporter does not support (all of them take adapters in
llama.cpp), a delta on the embeddings or lm_head, a delta changing norms or biases (llama.cpp
adapters hold only lora_a/lora_b pairs and silently skip ``*_norm.weight``), and a base whose
tensors do not have the sha256s the delta recorded.

``verify_gguf_lora`` (``adapters._lora_check``): base GGUF + adapter in llama.cpp vs the folded
GGUF of the same type.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lens_merge.adapters._lora_check import verify_gguf_lora
from lens_merge.errors import AdapterError

if TYPE_CHECKING:
    from lens_merge.architectures import Architecture
    from lens_merge.weights.delta import LensDelta

OUTTYPES = ("f32", "f16")
__all__ = ["OUTTYPES", "export_gguf_lora", "lora_architecture", "verify_gguf_lora"]


def lora_architecture(cfg: dict, root: Path) -> Architecture:
    """The weight-name table of a base that llama.cpp LoRA export supports.

    Raises:
        AdapterError: listing the supported model types.
    """
    from lens_merge.errors import ExportError
    from lens_merge.export.gguf._writer import gguf_architecture

    try:
        return gguf_architecture(cfg, root)
    except ExportError as exc:
        raise AdapterError(f"{exc} (llama.cpp LoRA adapters are exported for the same "
                           "architectures as GGUF models)") from None


def _pairs_from_delta(delta: LensDelta, base_dir: Path, arch: Architecture,
                      rank: int | None, energy: float | None) -> tuple[list, dict[str, Any]]:
    """(hf name, A, B, rank, rel_error) per linear weight of a checked delta."""
    from lens_merge.adapters._peft_layout import check_base
    from lens_merge.adapters.factor import factor_delta

    where = f"delta {delta.path}" if delta.path else "the delta"
    glob = [n for n in delta.tensors if n in arch.global_tensors
            or n in (arch.embed, arch.lm_head)]
    if glob:
        raise AdapterError(f"{where} changes {', '.join(glob)} (embeddings / lm_head): a llama.cpp "
                           "LoRA adapter of the decoder blocks cannot carry them; export the "
                           "folded checkpoint to GGUF instead")
    not_linear = [n for n, t in delta.tensors.items() if t.ndim != 2]
    if not_linear:
        raise AdapterError(
            f"{where} changes {len(not_linear)} tensor(s) that are not linear weights (norms, "
            f"biases), e.g. {', '.join(not_linear[:3])}: llama.cpp adapters hold only "
            "lora_a/lora_b pairs (it skips *_norm.weight silently), so the adapter would not be "
            "the edit. Train with train.freeze_norms: true for an all-linear delta, or ship the "
            "folded GGUF")
    check_base(base_dir, delta.meta.get("tensors") or {}, where)
    fac = factor_delta(delta, rank, energy, arch=arch)
    if fac.dropped:  # cannot happen after the checks above; never write a partial edit
        raise AdapterError(f"{where}: {', '.join(fac.dropped)} cannot be LoRA pairs")
    pairs = [(f.name, f.A, f.B, f.rank, f.rel_error) for f in fac.factors.values()]
    return pairs, {"source": "lens-delta", "base_checked": True, "records": fac.records()}


def _pairs_from_peft(src: Path, base_dir: Path, arch: Architecture) -> tuple[list, dict]:
    """(hf name, A, B * scale, rank, None) per LoRA pair of a PEFT adapter folder."""
    import torch
    from safetensors import safe_open

    from lens_merge.adapters._peft_layout import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        PREFIX,
        PROVENANCE,
        _alpha_for,
        check_base,
        read_provenance,
    )
    from lens_merge.records import read_json

    config = read_json(src / ADAPTER_CONFIG)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{src / ADAPTER_CONFIG}: peft_type is not LORA")
    if config.get("use_dora") or config.get("modules_to_save"):
        what = "DoRA" if config.get("use_dora") else "modules_to_save (full norm weights)"
        raise AdapterError(f"{src}: uses {what}, which a llama.cpp LoRA adapter cannot hold; "
                           "export the delta itself (train.freeze_norms: true for norms)")
    checked = (src / PROVENANCE).is_file()
    if checked:
        check_base(base_dir, read_provenance(src).base_tensors, f"adapter {src}")
    pairs = []
    with safe_open(str(src / ADAPTER_WEIGHTS), framework="pt") as fh:
        keys = set(fh.keys())
        for key in sorted(keys):
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name.endswith(".lora_B.bias"):
                if bool(fh.get_tensor(key).abs().max() > 0):
                    raise AdapterError(f"{src}: {key} is a bias, which a llama.cpp adapter "
                                       "cannot hold")
                continue
            if not name.endswith(".lora_A.weight"):
                if ".lora_B." not in name:
                    raise AdapterError(f"{src}: tensor {key} is not a LoRA pair")
                continue
            module = name[: -len(".lora_A.weight")]
            A = fh.get_tensor(key).to(torch.float32)
            B = fh.get_tensor(f"{PREFIX}{module}.lora_B.weight").to(torch.float32)
            r = int(A.shape[0])
            alpha = _alpha_for(module, config)
            scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
            pairs.append((module + ".weight", A, B * scale, r, None))
    if not pairs:
        raise AdapterError(f"{src}: holds no LoRA pairs")
    for name, *_ in pairs:
        if name in arch.global_tensors or name in (arch.embed, arch.lm_head):
            raise AdapterError(f"{src}: a LoRA on {name} (embeddings / lm_head) is not supported")
    return pairs, {"source": "peft-lora", "base_checked": checked}


def _encode(pairs: list, arch: Architecture, cfg: dict, alpha: float, outtype: str
            ) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """(GGUF name, array, row) for every A and B, B permuted and scaled for llama.cpp."""
    from lens_merge.export.gguf._hparams import dims
    from lens_merge.export.gguf._tensors import gguf_name_map, gguf_tensor_name, permute_rope

    d = dims(cfg)
    tmap = gguf_name_map(arch.gguf["arch"], d.n_layer)
    heads = {"attn_q": d.n_head, "attn_k": d.n_head_kv} if arch.gguf.get("permute_qk") else {}
    dt = np.float32 if outtype == "f32" else np.float16
    out = []
    for name, A, B, r, rel in pairs:
        gname = gguf_tensor_name(tmap, name)
        if gname is None or not gname.endswith(".weight"):
            raise AdapterError(f"tensor {name}: gguf-py's name map for {arch.gguf['arch']} has no "
                               "GGUF weight of that name")
        b = B.detach().double().numpy() * (r / alpha)
        kind = gname.split(".")[-2]
        if kind in heads:
            b = permute_rope(b, heads[kind])
        a = A.detach().double().numpy()
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"tensor {name}: its LoRA factors hold NaN or Inf")
        row = {"tensor": name, "gguf": gname, "rank": int(r), "shape": [int(B.shape[0]),
               int(A.shape[1])], "rel_error": rel, "permuted": kind in heads}
        out.append((gname + ".lora_a", np.ascontiguousarray(a.astype(dt)), row))
        out.append((gname + ".lora_b", np.ascontiguousarray(b.astype(dt)), row))
    return out


def export_gguf_lora(
    delta_or_lora_dir: str | Path | LensDelta,
    base_checkpoint: str | Path,
    out_path: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    alpha: float | None = None,
    outtype: str = "f32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a llama.cpp LoRA adapter GGUF for a Lens delta (or a PEFT LoRA folder).

    Args:
        delta_or_lora_dir: a Lens delta directory (or ``LensDelta``), or a PEFT LoRA folder
            (``adapter_config.json``; its base check uses ``lens_merge_adapter.json``).
        base_checkpoint: the base the delta was trained on (``default`` or a directory);
            its tensors' sha256 must be the ones the delta records.
        out_path: the ``.gguf`` to write (atomically).
        rank, energy: the rank choice for a delta (see ``adapters.factor.factor_delta``;
            neither: full rank, exact). Not accepted with a PEFT folder.
        alpha: ``adapter.lora.alpha`` (default: the largest rank); B is stored times
            rank / alpha so the applied update is B @ A at llama.cpp's scale 1.
        outtype: ``f32`` or ``f16`` for the A/B tensors.
        overwrite: replace an existing ``out_path``.

    Returns:
        dict: path, architecture, source, base_checked, alpha, outtype, n_pairs, max_rank,
        tensors (one row per pair: gguf name, rank, shape, rel_error, permuted), bytes,
        sha256, delta_bytes (fp32 dW of the same tensors), size_ratio, seconds.

    Raises:
        AdapterError: unsupported architecture, embeddings/lm_head or norms/biases in the delta,
            a base with other tensor hashes, a rank larger than a tensor, an existing output.
        DeltaError: the input is neither a delta nor a PEFT folder.
    """
    import gguf

    from lens_merge import __version__
    from lens_merge.adapters._peft_layout import ADAPTER_CONFIG
    from lens_merge.files import atomic_file, file_sha256
    from lens_merge.guard import check_output, check_writable_parent, cleanup_stale_temps, exists
    from lens_merge.weights._source import resolve_base
    from lens_merge.weights.checkpoint import Checkpoint
    from lens_merge.weights.delta import LensDelta

    t0 = time.perf_counter()
    if outtype not in OUTTYPES:
        raise AdapterError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
        raise AdapterError(f"alpha must be a positive number, got {alpha!r}")
    base_dir = resolve_base(base_checkpoint)
    ck = Checkpoint.open(base_dir)
    cfg = ck.config()
    arch = lora_architecture(cfg, base_dir)
    src = delta_or_lora_dir.path if isinstance(delta_or_lora_dir, LensDelta) else \
        Path(delta_or_lora_dir)
    out = Path(out_path)
    check_output(out, {"base checkpoint": base_dir, "delta": src})
    check_writable_parent(out)
    cleanup_stale_temps(out)
    if exists(out) and not overwrite:
        raise AdapterError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if src is not None and (src / ADAPTER_CONFIG).is_file():
        if rank is not None or energy is not None:
            raise AdapterError(f"{src} is a LoRA folder: its ranks are fixed; --rank/--energy "
                               "apply to a delta")
        pairs, info = _pairs_from_peft(src, base_dir, arch)
    else:
        delta = delta_or_lora_dir if isinstance(delta_or_lora_dir, LensDelta) else \
            LensDelta.load(src)
        pairs, info = _pairs_from_delta(delta, base_dir, arch, rank, energy)
    max_rank = max(p[3] for p in pairs)
    a = float(alpha) if alpha is not None else float(max_rank)
    encoded = _encode(pairs, arch, cfg, a, outtype)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch.gguf["arch"])
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, a)
            w.add_string("lens_merge.version", __version__)
            w.add_string("lens_merge.source", info["source"])
            w.add_string("lens_merge.base", str(base_checkpoint))
            w.add_string("lens_merge.rank_request", "full" if rank is None and energy is None
                         else f"rank={rank}" if rank is not None else f"energy={energy}")
            for name, arr, _ in encoded:
                w.add_tensor(name, arr)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    rows = [row for name, _, row in encoded if name.endswith(".lora_a")]
    delta_bytes = sum(4 * r["shape"][0] * r["shape"][1] for r in rows)
    size = out.stat().st_size
    return {"path": str(out), "architecture": arch.gguf["arch"], "source": info["source"],
            "base_checked": info["base_checked"], "alpha": a, "outtype": outtype,
            "n_pairs": len(rows), "max_rank": max_rank, "tensors": rows,
            "max_rel_error": max((r["rel_error"] or 0.0) for r in rows), "bytes": size,
            "sha256": file_sha256(out), "delta_bytes": delta_bytes,
            "size_ratio": size / delta_bytes if delta_bytes else None,
            "seconds": round(time.perf_counter() - t0, 3)}
