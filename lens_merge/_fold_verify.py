"""Parity check of a fold: base + delta applied in memory vs the folded checkpoint reloaded.

Public entry point: ``lens_merge.fold.verify_fold`` (re-exported from here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.errors import VerificationError
from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    from lens_merge.delta import LensDelta


def _default_prompts(languages: list[str], n_per_language: int) -> list[tuple[str, str]]:
    from lens_merge.data import load_prompts

    ps = load_prompts("default", languages, split="heldout", max_samples=n_per_language)
    return [(lang, row[lang]) for lang in languages for row in ps.rows]


def verify_fold(
    base: str | Path,
    delta: LensDelta | str | Path,
    folded: str | Path,
    languages: list[str] | None = None,
    prompts: Sequence[str] | None = None,
    tolerance: float | None = None,
    progress: Progress = NULL,
    *,
    n_per_language: int = 2,
    max_length: int = 64,
    batch_size: int = 8,
    allow_pickle: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Compare base + delta (applied in memory) with the folded checkpoint on real prompts.

    Both models run in the checkpoint's stored dtype with plain transformers. Logits are
    compared at every real (non-padding) position of every prompt.

    Args:
        base: ``default`` or the base model directory.
        delta: the ``LensDelta`` or its path.
        folded: the folded checkpoint directory.
        languages: languages to prompt in; default: the delta's languages.
        prompts: explicit prompt texts (then ``languages`` only labels the report).
        tolerance: max allowed |logit difference|; default by dtype (fp32 1e-4, fp16 1e-2,
            bf16 5e-2).
        progress: progress reporter.
        n_per_language: held-out prompts per language from the default data set.
        max_length: max prompt tokens.
        batch_size: prompts per forward pass.
        allow_pickle: accept a pickle base (see ``fold``).
        device: torch device.

    Returns:
        dict with ``max_abs_logit_diff``, ``top1_agreement``, ``n_prompts``, ``n_positions``,
        ``tolerance``, ``passed``, ``dtype``, ``languages`` and ``per_language``.

    Raises:
        VerificationError: when the difference exceeds the tolerance or the dtypes differ
            (``.report`` holds the dict above).
        DeltaError: when the base is not the checkpoint the delta was made for.
    """
    import torch

    from lens_merge.delta import apply_delta
    from lens_merge.fold import (
        TOLERANCES,
        _check_inputs,
        _open_source,
        _resolve_base,
        _resolve_delta,
    )
    from lens_merge.hidden import batches, encode
    from lens_merge.models import load_model, load_tokenizer

    base_dir, folded_dir = _resolve_base(base), _resolve_base(folded)
    d = _resolve_delta(delta)
    _check_inputs(_open_source(base_dir, allow_pickle), d, {n: d.base_hash(n) for n in d.tensors})
    langs = list(languages or d.languages or ["en"])
    if prompts is None:
        items = _default_prompts(langs, n_per_language)
    else:
        items = [("given", p) for p in prompts]
    tok = load_tokenizer(folded_dir)
    ref = load_model(base_dir, dtype=None, device=device)
    apply_delta(ref, d)
    new = load_model(folded_dir, dtype=None, device=device)
    ref_dtype, new_dtype = next(ref.parameters()).dtype, next(new.parameters()).dtype
    dtype = str(new_dtype).split(".")[-1]
    tol = float(tolerance) if tolerance is not None else TOLERANCES.get(dtype, 1e-4)
    per_lang: dict[str, dict[str, float]] = {}
    worst, agree, positions = 0.0, 0, 0
    with torch.no_grad(), progress.task("verify fold", len(items)) as task:
        for chunk in batches(items, batch_size):
            enc = {k: v.to(device) for k, v in
                   encode(tok, [t for _, t in chunk], max_length).items()}
            a = ref(**enc).logits.float()
            b = new(**enc).logits.float()
            mask = enc["attention_mask"].bool()
            diff = (a - b).abs().amax(-1)  # [B, T]
            same = a.argmax(-1) == b.argmax(-1)
            for i, (lang, _) in enumerate(chunk):
                m = mask[i]
                di, si = float(diff[i][m].max()), same[i][m]
                s = per_lang.setdefault(lang, {"max_abs_logit_diff": 0.0, "agree": 0, "n": 0})
                s["max_abs_logit_diff"] = max(s["max_abs_logit_diff"], di)
                s["agree"] += int(si.sum())
                s["n"] += int(m.sum())
                worst = max(worst, di)
                agree += int(si.sum())
                positions += int(m.sum())
            task.advance(len(chunk))
    report = {
        "max_abs_logit_diff": worst,
        "top1_agreement": agree / max(positions, 1),
        "n_prompts": len(items),
        "n_positions": positions,
        "tolerance": tol,
        "dtype": dtype,
        "base_dtype": str(ref_dtype).split(".")[-1],
        "languages": langs,
        "per_language": {k: {"max_abs_logit_diff": v["max_abs_logit_diff"],
                             "top1_agreement": v["agree"] / max(v["n"], 1)}
                         for k, v in per_lang.items()},
        "base": str(base),
        "folded": str(folded_dir),
    }
    report["passed"] = bool(worst <= tol and ref_dtype == new_dtype)
    if ref_dtype != new_dtype:
        raise VerificationError(f"{folded_dir}: weights are {new_dtype}, the base is {ref_dtype}; "
                                "a fold must keep the base dtype", report)
    if not report["passed"]:
        raise VerificationError(f"{folded_dir}: max |logit difference| {worst:.3g} exceeds the "
                                f"tolerance {tol:.3g} ({dtype}; top-1 agreement "
                                f"{report['top1_agreement']:.4f})", report)
    return report
