"""Parity check of a fold: base + delta applied in memory vs the folded checkpoint reloaded.

Public entry point: ``verify_fold`` (also re-exported by ``lens_merge.weights.fold``). It
returns a ``records.ParityReport`` (kind ``fold``, variant = the folded checkpoint's dtype)
whose limits come from ``parity.thresholds.THRESHOLDS["fold"]``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lens_merge.errors import VerificationError
from lens_merge.parity.metrics import DistinctContexts, kl_per_position, max_abs_diff, top1_same
from lens_merge.parity.prompts import parity_prompts
from lens_merge.parity.thresholds import checks_for, thresholds_for
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import now_iso
from lens_merge.records import ParityReport, parity_report
from lens_merge.weights._source import check_inputs, open_source, resolve_base, resolve_delta

if TYPE_CHECKING:
    from lens_merge.weights.delta import LensDelta

KIND = "fold"


def fold_limits(dtype: str, tolerance: float | None = None) -> tuple[dict[str, float], list[str]]:
    """The limits a fold in ``dtype`` is held to, and a problem when the table has none.

    Args:
        dtype: torch dtype name of the folded weights (``float32``, ``bfloat16``, ...).
        tolerance: overrides the table's ``max_abs_logit_diff`` limit.

    Returns:
        (metric -> limit, problems)
    """
    try:
        limits = thresholds_for(KIND, dtype)
    except KeyError as exc:
        limits = {}
        if tolerance is None:
            return limits, [f"{exc.args[0]}; pass a tolerance"]
    if tolerance is not None:
        limits["max_abs_logit_diff"] = float(tolerance)
    return limits, []


class LogitTally:
    """Running numbers of one group of prompts (all of them, or one language)."""

    def __init__(self) -> None:
        self.top1 = DistinctContexts()
        self.worst = 0.0
        self.kl: list[float] = []
        self.n_prompts = 0

    def add(self, ids: list[int], diff: float, same: list[bool], kl: list[float]) -> None:
        self.top1.add(ids, same)
        self.worst = max(self.worst, diff)
        self.kl.extend(kl)
        self.n_prompts += 1

    def metrics(self) -> dict[str, float | int]:
        return {"max_abs_logit_diff": self.worst, "top1_agreement": self.top1.agreement,
                "top1_agreement_all_positions": self.top1.agreement_all_positions,
                "kl_mean": sum(self.kl) / len(self.kl) if self.kl else 0.0,
                "kl_max": max(self.kl, default=0.0),
                "n_contexts": self.top1.n, "n_positions": self.top1.n_all}


def _comparer(items: list[tuple[str, str]], want: list, total: LogitTally,
              per_lang: dict[str, LogitTally], rows: list[dict]):
    """A ``prompt_logits`` visitor comparing each prompt's logits with the kept ``want``."""

    def compare(i: int, ids: list[int], rb) -> None:
        (lang, text), ra = items[i], want[i][1]
        diff, same, kl = max_abs_diff(ra, rb), top1_same(ra, rb), kl_per_position(ra, rb)
        total.add(ids, diff, same, kl)
        per_lang.setdefault(lang, LogitTally()).add(ids, diff, same, kl)
        rows.append({"language": lang, "prompt": text, "n_tokens": len(ids),
                     "max_abs_logit_diff": diff,
                     "top1_agreement": sum(same) / max(len(same), 1)})

    return compare


def _dtype(model) -> str:
    return str(next(model.parameters()).dtype).split(".")[-1]


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
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare base + delta (applied in memory) with the folded checkpoint on real prompts.

    Both models run in the checkpoint's stored dtype with plain transformers, one at a time
    (``parity.logits.prompt_logits``: base + delta's logits are kept, the model is freed, then
    the folded model's are compared as they come): the peak is one model. Logits are
    compared at every real (non-padding) position of every prompt; top-1 agreement counts
    each distinct context once (``parity.metrics.DistinctContexts``).

    Args:
        base: ``default`` or the base model directory.
        delta: the ``LensDelta`` or its path.
        folded: the folded checkpoint directory.
        languages: languages to prompt in; default: the delta's languages.
        prompts: explicit prompt texts (labelled ``custom``; ``languages`` then only labels
            the report).
        tolerance: max allowed |logit difference|; default: ``THRESHOLDS["fold"][dtype]``
            (fp32 1e-4, fp16 1e-2, bf16 5e-2).
        progress: progress reporter.
        n_per_language: held-out prompts per language from the default data set.
        max_length: max prompt tokens.
        batch_size: prompts per forward pass.
        allow_pickle: accept a pickle base (see ``fold``).
        device: torch device.
        raise_on_failure: raise when the report fails (else return it).

    Returns:
        A ``ParityReport``: kind ``fold``, variant the folded dtype; metrics
        ``max_abs_logit_diff``, ``top1_agreement`` (distinct contexts),
        ``top1_agreement_all_positions``, ``kl_mean``, ``kl_max``, ``n_contexts``,
        ``n_positions``; ``per_language`` the same per language; a dtype that differs from
        the base's is a problem; ``details``: ``base``, ``base_dtype`` and one row per prompt
        (``prompts``).

    Raises:
        VerificationError: (with ``raise_on_failure``) a check or problem fails the report;
            ``.report`` holds it.
        DeltaError: when the base is not the checkpoint the delta was made for.
    """
    from lens_merge.memory import release_memory
    from lens_merge.models import load_model, load_tokenizer
    from lens_merge.parity.logits import prompt_logits
    from lens_merge.weights.delta import apply_delta

    t0 = time.perf_counter()
    base_dir, folded_dir = resolve_base(base), resolve_base(folded)
    d = resolve_delta(delta)
    check_inputs(open_source(base_dir, allow_pickle), d, {n: d.base_hash(n) for n in d.tensors})
    langs = list(languages or d.languages or ["en"])
    items = parity_prompts(langs, per_language=n_per_language, prompts=prompts, by_row=False)
    tok = load_tokenizer(folded_dir)
    total, per_lang, rows = LogitTally(), {}, []

    # one model in memory at a time: the reference's logits are kept, the model freed; the
    # folded model's logits are compared prompt by prompt as they come
    with progress.task("verify fold", 2 * len(items)) as task:
        ref = load_model(base_dir, dtype=None, device=device)
        apply_delta(ref, d)
        base_dtype = _dtype(ref)
        want = prompt_logits(ref, tok, items, max_length, batch_size, device, task)
        del ref
        release_memory()
        new = load_model(folded_dir, dtype=None, device=device)
        dtype = _dtype(new)
        prompt_logits(new, tok, items, max_length, batch_size, device, task,
                      visit=_comparer(items, want, total, per_lang, rows))
        del new, want
        release_memory()
    limits, problems = fold_limits(dtype, tolerance)
    if base_dtype != dtype:
        problems.append(f"weights are {dtype}, the base is {base_dtype}; a fold must keep the "
                        "base dtype")
    if not items:
        problems.append("no prompts to compare")
    metrics = total.metrics()
    report = parity_report(
        KIND, folded_dir, f"{base_dir} + delta", checks=checks_for(limits, metrics),
        problems=problems, variant=dtype, metrics=metrics, languages=langs,
        per_language={k: v.metrics() for k, v in per_lang.items()}, n_prompts=len(rows),
        verified_at=now_iso(), seconds=round(time.perf_counter() - t0, 3),
        details={"base": str(base), "base_dtype": base_dtype, "prompts": rows})
    if not report.passed and raise_on_failure:
        raise VerificationError(f"{folded_dir}: fold verification failed ({dtype}): "
                                f"{'; '.join(report.failures)}", report)
    return report

