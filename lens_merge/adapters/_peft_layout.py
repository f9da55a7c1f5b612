"""The files of a PEFT LoRA adapter lens-merge writes: names, config, provenance, base check.

Used by ``adapters.peft_lora`` (writing) and ``adapters._peft_verify`` (reading back). The
tensor keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r], ``base_model.model.<module>.base_layer.bias`` (the full bias
of a LoRA target, ``bias="lora_only"``) and ``base_model.model.<module>.<param>`` for a
``modules_to_save`` module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from lens_merge.adapters.factor import Factorization
from lens_merge.errors import AdapterError, ModelError, RecordError

if TYPE_CHECKING:
    import torch

    from lens_merge.architectures import Architecture
    from lens_merge.weights.delta import LensDelta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "lens_merge_adapter.json"
PARITY_FILE = "lens_merge_parity.json"
FORMAT = "lens-merge-adapter"
PREFIX = "base_model.model."


class AdapterProvenance(BaseModel):
    """``lens_merge_adapter.json`` beside a PEFT adapter."""

    model_config = ConfigDict(extra="allow")

    format: str = Field(FORMAT, pattern=f"^{FORMAT}$")
    format_version: int = Field(1, ge=1)
    adapter: str = "peft-lora"
    base: dict[str, Any] = Field(default_factory=dict)
    base_tensors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    delta: dict[str, Any] = Field(default_factory=dict)
    request: dict[str, Any] = Field(default_factory=dict)
    max_rank: int = Field(ge=1)
    tensors: dict[str, dict[str, Any]]
    carried: dict[str, dict[str, Any]] = Field(default_factory=dict)
    dropped: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sizes: dict[str, Any] = Field(default_factory=dict)


def read_provenance(adapter_dir: str | Path) -> AdapterProvenance:
    """Read ``lens_merge_adapter.json`` of an adapter folder.

    Raises:
        AdapterError: missing or malformed, naming the file and field.
    """
    from lens_merge.records import read_record

    try:
        return read_record(Path(adapter_dir) / PROVENANCE, AdapterProvenance)
    except RecordError as exc:
        raise AdapterError(f"{exc} (not an adapter lens-merge wrote?)") from None


def check_base(base_dir: Path, records: dict[str, dict[str, Any]], what: str) -> None:
    """Every recorded base tensor exists in ``base_dir`` with its shape and sha256.

    Raises:
        AdapterError: naming the tensor, the file and both hashes (a different base).
    """
    from lens_merge.weights.checkpoint import Checkpoint, hash_entry

    try:
        ck = Checkpoint.open(base_dir)
    except ModelError as exc:
        raise AdapterError(f"base {base_dir}: {exc}") from None
    for name, rec in records.items():
        if name not in ck.index:
            raise AdapterError(f"{what} was made for a base with tensor {name}; {base_dir} has "
                               "none (a different model)")
        e = ck.entry(name)
        if list(e.shape) != list(rec.get("shape", e.shape)):
            raise AdapterError(f"{what}: tensor {name} is {list(e.shape)} in {base_dir}, "
                               f"expected {rec['shape']} (a different model)")
    for name, rec in records.items():
        got = hash_entry(ck.entry(name))
        if got != rec.get("base_sha256"):
            raise AdapterError(f"{what} was made for another base: tensor {name} in {base_dir} "
                               f"has sha256 {got}, the delta records {rec.get('base_sha256')}")


def _layers_pattern(arch: Architecture | None) -> str | None:
    if arch is None:
        return None
    m = re.search(r"([A-Za-z_]+)\.\{bid\}\.$", arch.block_prefix)
    return m.group(1) if m else None


def _targets(fac: Factorization, arch: Architecture | None) -> dict[str, Any]:
    """``target_modules`` (+ ``layers_to_transform``) naming exactly the factored modules."""
    leaves = sorted({f.module.rsplit(".", 1)[-1] for f in fac.factors.values()})
    pattern, blocks = _layers_pattern(arch), fac.blocks
    if arch is not None and pattern and all(f.block is not None for f in fac.factors.values()):
        table = [s[: -len(".weight")] for s in arch.block_tensors if s.endswith(".weight")]
        per_leaf = {leaf: [s for s in table if s.rsplit(".", 1)[-1] == leaf] for leaf in leaves}
        wanted = {arch.block_prefix.format(bid=b) + s for b in blocks
                  for leaf in leaves for s in per_leaf[leaf]}
        if all(len(v) == 1 for v in per_leaf.values()) and \
                wanted == {f.module for f in fac.factors.values()}:
            return {"target_modules": leaves, "layers_to_transform": blocks,
                    "layers_pattern": pattern}
    alt = "|".join(re.escape(f.module) for f in fac.factors.values())
    return {"target_modules": f"({alt})", "layers_to_transform": None, "layers_pattern": None}


def _base_params(base_dir: Path, module: str) -> dict[str, torch.Tensor]:
    """Every stored parameter of ``module`` (``module.<param>``) in the base, as fp32."""
    import torch
    from safetensors import safe_open

    from lens_merge.weights.checkpoint import Checkpoint

    ck = Checkpoint.open(base_dir)
    out = {}
    for name, shard in ck.index.items():
        if name.startswith(module + ".") and "." not in name[len(module) + 1:]:
            with safe_open(str(ck.root / shard), framework="pt") as fh:
                out[name] = fh.get_tensor(name).to(torch.float32)
    return out


def build_adapter(fac: Factorization, delta: LensDelta, base_dir: Path | None,
                  carry: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                               dict[str, dict], dict[str, dict]]:
    """The adapter's tensors and config fields, and what was carried and dropped.

    A carried 1-D tensor is stored as its full value, base + dW (PEFT replaces the base's):
    a bias of a LoRA target as ``<module>.base_layer.bias`` (``bias="lora_only"``, which
    ``merge_and_unload`` keeps), any other (a norm's weight) through ``modules_to_save``.
    Both need ``base_dir``; without it, or with ``carry`` False, they are dropped.

    Returns:
        (tensors by PEFT key, config fields, carried {name: row}, dropped {name: row})
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for f in fac.factors.values():
        tensors[f"{PREFIX}{f.module}.lora_A.weight"] = f.A.contiguous()
        tensors[f"{PREFIX}{f.module}.lora_B.weight"] = f.B.contiguous()
    modules = {f.module for f in fac.factors.values()}
    carried: dict[str, dict] = {}
    dropped: dict[str, dict] = {}
    to_save: dict[str, dict[str, torch.Tensor]] = {}
    lora_only = False
    for name, d in fac.dropped.items():
        row = {"shape": list(d.shape), "norm": d.norm}
        module, _, leaf = name.rpartition(".")
        if not carry or len(d.shape) != 1 or (module in modules and leaf != "bias"):
            dropped[name] = {**row, "reason": d.reason}
        elif base_dir is None:
            dropped[name] = {**row, "reason": f"{d.reason}; PEFT could carry it as its full "
                             "value, which needs the base (pass --base)"}
        elif module in modules:
            base_b = _base_params(base_dir, module).get(name)
            if base_b is None:
                raise AdapterError(f"base {base_dir} has no tensor {name}")
            full = base_b + delta.tensors[name]
            tensors[f"{PREFIX}{module}.base_layer.bias"] = full.contiguous()
            carried[name] = {**row, "how": "bias of a LoRA target, full value (bias=lora_only)"}
            lora_only = True
        else:
            to_save.setdefault(module, {})[name] = delta.tensors[name]
            carried[name] = {**row, "how": "modules_to_save, full value (base + dW)"}
    for module, parts in to_save.items():
        params = _base_params(base_dir, module)  # type: ignore[arg-type]
        if missing := sorted(set(parts) - set(params)):
            raise AdapterError(f"base {base_dir} has no tensor {missing[0]}")
        for pname, w in params.items():
            tensors[PREFIX + pname] = (w + parts.get(pname, torch.zeros_like(w))).contiguous()
    r = fac.max_rank
    ranks = {re.escape(f.module): f.rank for f in fac.factors.values() if f.rank != r}
    fields = {"r": r, "lora_alpha": r, "rank_pattern": ranks, "alpha_pattern": dict(ranks),
              "bias": "lora_only" if lora_only else "none", "lora_bias": False,
              "modules_to_save": sorted(to_save) or None}
    return tensors, fields, carried, dropped


def adapter_config(fac: Factorization, fields: dict[str, Any], base_name: str,
                   arch: Architecture | None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict (the fields ``LoraConfig`` reads; writing it needs no
    PEFT, ``peft_version`` is recorded when PEFT is installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        peft_version: str | None = version("peft")
    except PackageNotFoundError:
        peft_version = None
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "peft_version": peft_version,
            "base_model_name_or_path": base_name, "revision": None, "inference_mode": True,
            **_targets(fac, arch), **fields, "lora_dropout": 0.0, "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "exclude_modules": None}


def _alpha_for(module: str, config: dict[str, Any]) -> float:
    """``lora_alpha`` of one module: the first matching ``alpha_pattern`` key (PEFT's rule,
    ``(.*\\.)?(key)$``), else the global one."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(alpha)
    return float(config["lora_alpha"])


def apply_adapter_files(model, adapter_dir: str | Path) -> list[str]:
    """Add what an adapter folder holds to a loaded model, in place, without PEFT.

    ``W += alpha / r * B @ A`` (fp32) per LoRA pair, and each full-value tensor
    (``base_layer.bias``, ``modules_to_save``) put in place: this module's reading of the files,
    which the verifier holds PEFT's loading to.

    Returns:
        Problems (a key naming no parameter of the model).
    """
    import torch
    from safetensors import safe_open

    from lens_merge.records import read_json

    d = Path(adapter_dir)
    config = read_json(d / ADAPTER_CONFIG)
    params = dict(model.named_parameters())
    problems: list[str] = []
    with safe_open(str(d / ADAPTER_WEIGHTS), framework="pt") as fh:
        keys = list(fh.keys())
        get = fh.get_tensor
        with torch.no_grad():
            for key in keys:
                if not key.startswith(PREFIX):
                    problems.append(f"{ADAPTER_WEIGHTS}: key {key} lacks the {PREFIX} prefix")
                    continue
                name = key[len(PREFIX):]
                if name.endswith(".lora_A.weight"):
                    module = name[: -len(".lora_A.weight")]
                    A, B = get(key).float(), get(f"{PREFIX}{module}.lora_B.weight").float()
                    scale = _alpha_for(module, config) / A.shape[0]
                    w = params.get(module + ".weight")
                    if w is None:
                        problems.append(f"LoRA module {module} is not in the model")
                        continue
                    w.copy_((w.float() + scale * (B @ A)).to(w.dtype))
                elif ".lora_" not in name:
                    pname = name.replace(".base_layer.", ".")
                    p = params.get(pname)
                    if p is None:
                        problems.append(f"{ADAPTER_WEIGHTS}: {key} names no parameter of the "
                                        "model")
                        continue
                    p.copy_(get(key).to(p.dtype))
    return problems
