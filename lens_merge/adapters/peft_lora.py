"""A Lens delta as a PEFT LoRA adapter folder, and its parity check.

``export_peft_lora`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (the layout
``PeftModel.from_pretrained`` loads) and ``lens_merge_adapter.json`` (provenance: the base
tensors' sha256s, rank and relative error per tensor, what was carried or dropped). Each
linear weight becomes ``lora_A``/``lora_B`` from ``adapters.factor`` with ``lora_alpha`` equal
to its rank (scale exactly 1; ``rank_pattern``/``alpha_pattern`` hold the per-tensor ranks).
1-D tensors no LoRA pair can hold are carried where PEFT can, as their full value (base + dW,
so only with the base): a bias of a LoRA target through ``bias="lora_only"``, a norm's weight
through ``modules_to_save``; the rest is dropped and listed.

``verify_peft_lora`` (``adapters._peft_verify``) compares ``PeftModel.from_pretrained(base,
DIR)`` with the folded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.adapters._peft_layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PARITY_FILE,
    PROVENANCE,
    AdapterProvenance,
    adapter_config,
    build_adapter,
    check_base,
    read_provenance,
)
from lens_merge.adapters._peft_verify import verify_peft_lora
from lens_merge.adapters.factor import arch_of_delta, factor_delta

if TYPE_CHECKING:
    from lens_merge.weights.delta import LensDelta

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PARITY_FILE", "PROVENANCE", "AdapterProvenance",
           "check_base", "export_peft_lora", "read_provenance", "verify_peft_lora"]


def _base_name(delta: LensDelta, base: str | Path | None) -> str:
    from lens_merge.default_model import BASE_MODEL_ID

    ref = str(base) if base is not None else str((delta.meta.get("base") or {}).get("ref", ""))
    return BASE_MODEL_ID if ref == "default" else ref


def export_peft_lora(delta_dir_or_delta: LensDelta | str | Path, out_dir: str | Path, *,
                     rank: int | None = None, energy: float | None = None,
                     base: str | Path | None = None, overwrite: bool = False,
                     carry: bool = True) -> dict[str, Any]:
    """Write a PEFT LoRA adapter folder for a Lens delta.

    Args:
        delta_dir_or_delta: the delta directory or a ``LensDelta``.
        out_dir: the adapter folder to create.
        rank, energy: the rank choice (see ``factor_delta``; neither: full rank, exact).
        base: ``default`` or the base checkpoint: checked against the delta's recorded hashes
            and needed to carry norms through ``modules_to_save``.
        overwrite: replace an existing folder.
        carry: carry 1-D tensors PEFT can hold (norms, biases); False drops them all (what a
            llama.cpp adapter can hold).

    Returns:
        The provenance written (``lens_merge_adapter.json``) plus ``path``, ``config``.

    Raises:
        AdapterError: see ``factor_delta``; a base that is not the delta's.
        OutputError: an output that is an input, or exists without ``overwrite``.
    """
    from safetensors.torch import save_file

    from lens_merge.files import atomic_dir, write_json_atomic
    from lens_merge.guard import check_output, check_writable_parent, cleanup_stale_temps
    from lens_merge.provenance import build_time, tool_info
    from lens_merge.weights._source import resolve_base, resolve_delta
    from lens_merge.weights.delta import DELTA_WEIGHTS

    delta = resolve_delta(delta_dir_or_delta)
    base_dir = resolve_base(base) if base is not None else None
    out = Path(out_dir)
    check_output(out, {"delta": delta.path, "base": base_dir}, overwrite=overwrite)
    check_writable_parent(out)
    cleanup_stale_temps(out)
    records = (delta.meta.get("tensors") or {})
    if base_dir is not None:
        check_base(base_dir, records, f"delta {delta.path or ''}".strip())
    arch = arch_of_delta(delta)
    fac = factor_delta(delta, rank, energy, arch=arch)
    tensors, fields, carried, dropped = build_adapter(fac, delta, base_dir, carry)
    config = adapter_config(fac, fields, _base_name(delta, base), arch)
    stored = delta.path / DELTA_WEIGHTS if delta.path else None
    delta_bytes = stored.stat().st_size if stored is not None and stored.is_file() else \
        sum(t.numel() * 4 for t in delta.tensors.values())
    prov = AdapterProvenance(
        base=dict(delta.meta.get("base") or {}), base_tensors=records,
        delta={"path": str(delta.path.resolve()) if delta.path else None,
               "languages": delta.languages, "top_k": delta.meta.get("top_k"),
               "blocks": delta.meta.get("blocks")},
        request={"rank": rank, "energy": energy, "carry": carry}, max_rank=fac.max_rank,
        tensors=fac.records()["tensors"], carried=carried, dropped=dropped,
        tool=tool_info(), created=build_time())
    with atomic_dir(out, overwrite=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json_atomic(tmp / ADAPTER_CONFIG, config)
        adapter_bytes = (tmp / ADAPTER_WEIGHTS).stat().st_size
        prov.sizes = {"adapter_bytes": adapter_bytes, "delta_bytes": delta_bytes,
                      "ratio": adapter_bytes / delta_bytes if delta_bytes else None}
        write_json_atomic(tmp / PROVENANCE, prov)
    return {**prov.model_dump(mode="json"), "path": str(out), "config": config}
