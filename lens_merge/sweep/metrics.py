"""A sweep row's numbers from a ``lens_report.json``, and the Pareto front of the rows.

The report schema grows (format_version 2 adds ``lpr``, ``first_token_mass``, ``echo`` and
``english_identical_replies``); every key is optional here, so a version 1 report (``fidelity``,
``english_kl``, ``english_top1_agreement``) gives a row too.
"""

from __future__ import annotations

import math
from typing import Any

from lens_merge.sweep.record import BaseLens, SweepMetrics

# preference order for the target-language gain and "languages up": the continuous measure
# first (small edits move it), then LPR (echoes fail), then the whole-reply fidelity
TARGET_METRICS = ("first_token_mass", "lpr", "fidelity")


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, NaN, not a number)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _share(x: Any) -> float | None:
    """A rate given as a number or as ``{"lens": r}`` / ``{"rate": r}``."""
    if isinstance(x, dict):
        return _num(x.get("lens", x.get("rate")))
    return _num(x)


def _base_lens(x: Any) -> BaseLens:
    if not isinstance(x, dict):
        return BaseLens()
    return BaseLens(base=_num(x.get("base")), lens=_num(x.get("lens")))


def report_metrics(report: dict[str, Any]) -> SweepMetrics:
    """The sweep row of one report.

    Args:
        report: a parsed ``lens_report.json``.

    Returns:
        ``SweepMetrics``; missing keys are None.
    """
    s = report.get("summary") or {}
    per = report.get("per_language") or {}
    langs = list(report.get("languages") or per)
    targets = langs[1:]
    m = SweepMetrics(english_kl=_num(s.get("english_kl")),
                     english_top1=_num(s.get("english_top1_agreement")),
                     english_identical=_share(s.get("english_identical_replies")),
                     lpr=_base_lens(s.get("lpr")),
                     first_token_mass=_base_lens(s.get("first_token_mass")),
                     fidelity=_base_lens(s.get("fidelity")),
                     languages_total=len(targets),
                     n_prompts=report.get("n_prompts"))
    for key in TARGET_METRICS:
        gain = getattr(m, key).gain
        if gain is not None:
            m.target_gain, m.gain_metric = gain, key
            break
    for key in TARGET_METRICS:
        pairs = [(_num((per.get(lang) or {}).get(f"{key}_base")),
                  _num((per.get(lang) or {}).get(f"{key}_lens"))) for lang in targets]
        if targets and all(b is not None and lv is not None for b, lv in pairs):
            m.languages_up = sum(lv > b for b, lv in pairs)
            m.up_metric = key
            break
    return m


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """Which points no other point beats on both axes: lower English KL, higher target gain.

    Args:
        points: ``(english_kl, target_gain)`` per point; a point missing either is never on
            the front (and never dominates).

    Returns:
        One flag per point. Ties (the same two numbers) are all on the front.
    """
    ok = [kl is not None and g is not None for kl, g in points]
    out = []
    for i, (kl, g) in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[j] and j != i and points[j][0] <= kl and points[j][1] >= g
                        and (points[j][0] < kl or points[j][1] > g)
                        for j in range(len(points)))
        out.append(not dominated)
    return out
