"""What a ``BenchReport`` looks like to a reader: table rows (CLI), the card's ``model-index``
entries (``huggingface_hub.EvalResult``) and the card's markdown section."""

from __future__ import annotations

from typing import Any

from lens_merge.bench.record import BenchReport, BenchScore

LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
TASK_TYPE = "text-generation"  # the Hub's task type for causal LMs scored by lm-eval


def value(x: float | None, err: float | None = None) -> str:
    """``0.4375 ± 0.0512``, ``0.4375`` or ``n/a``."""
    if x is None:
        return "n/a"
    return f"{x:.4f}" + (f" ± {err:.4f}" if err is not None else "")


def signed(x: float | None) -> str:
    """``+0.0125`` / ``-0.0300`` / ``n/a``."""
    return "n/a" if x is None else f"{x:+.4f}"


def table_rows(report: BenchReport) -> list[list[str]]:
    """``[task, metric, base, lens, diff]`` per task and metric, formatted (a metric where
    lower is better says so)."""
    return [[task, metric + (" (lower is better)" if s.higher_is_better is False else ""),
             value(s.base, s.stderr.get("base")),
             value(s.lens, s.stderr.get("lens")), signed(s.diff)]
            for task, metric, s in report.rows()]


def _metric_name(metric: str) -> tuple[str, str]:
    name, _, filt = metric.partition(",")
    return name, f"{name} ({filt})" if filt else name


def eval_results(report: BenchReport) -> list[Any]:
    """The Lens model's scores as ``huggingface_hub.EvalResult`` (one per task and metric).

    ``dataset_type`` and ``dataset_name`` are the lm-eval task name, ``metric_type`` the
    lm-eval metric (``acc``), ``metric_value`` the Lens score; metrics without a Lens score
    (no delta) are left out.
    """
    from huggingface_hub import EvalResult

    out = []
    for task, metric, s in report.rows():
        if s.lens is None:
            continue
        info = report.tasks[task]
        mtype, mname = _metric_name(metric)
        shots = info.num_fewshot if info.num_fewshot is not None else report.num_fewshot
        out.append(EvalResult(
            task_type=TASK_TYPE, task_name=task,
            dataset_type=task, dataset_name=task, dataset_split=info.split,
            dataset_args={"num_few_shot": shots} if shots is not None else None,
            metric_type=mtype, metric_name=mname, metric_value=round(s.lens, 4),
            source_name=f"lm-evaluation-harness {report.lm_eval_version}".strip(),
            source_url=LM_EVAL_URL))
    return out


def _setting(report: BenchReport) -> str:
    bits = [f"version {report.lm_eval_version}"]
    shots = {t.num_fewshot for t in report.tasks.values() if t.num_fewshot is not None}
    if shots:
        bits.append(", ".join(f"{k}-shot" for k in sorted(shots)))
    if report.limit is not None:
        bits.append(f"limit {report.limit:g} per task")
    bits.append(f"{report.dtype or 'checkpoint dtype'} on {report.device}")
    return "; ".join(bits)


def markdown(report: BenchReport | None) -> list[str]:
    """The card's ``## Benchmarks`` section (empty when there is no report)."""
    if report is None or not report.tasks:
        return []
    lines = ["## Benchmarks", "",
             f"Base and Lens scored on the same tasks with [lm-evaluation-harness]({LM_EVAL_URL})"
             f" ({_setting(report)}); ± is the standard error lm-eval reports. The Lens scores "
             "are also in this card's `model-index`.", "",
             "| Task | Metric | Base | Lens | Lens - base |", "|---|---|---|---|---|"]
    for row in table_rows(report):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return [*lines, ""]


def worse(report: BenchReport) -> list[tuple[str, str, BenchScore]]:
    """Metrics where Lens is worse than the base by more than the larger stderr (a lower
    score, or a higher one where lower is better); metrics without a stderr are left out."""
    out = []
    for task, metric, s in report.rows():
        d = s.diff
        errs = [e for e in s.stderr.values() if e is not None]
        if d is None or not errs:
            continue
        err = max(errs)
        sign = -1 if s.higher_is_better is False else 1
        if sign * d < -err:
            out.append((task, metric, s))
    return out
