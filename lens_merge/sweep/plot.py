"""The sweep's Pareto picture: English KL (log axis) against the target-language gain.

Drawn with the model card's helpers (``lens_merge.release.plots``: Agg backend, atomic write).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lens_merge.release.plots import _pyplot, _save_atomic
from lens_merge.sweep.grid import format_value
from lens_merge.sweep.record import SweepRecord

_OFFSETS = ((5, 4), (5, -11), (-12, 4), (-12, -11))  # label offsets, cycled (points crowd)
KL_FLOOR = 1e-8  # a KL of 0 (an unchanged model) is drawn here on the log axis
_GAIN_NAMES = {"first_token_mass": "mean first-token target mass, lens - base",
               "lpr": "mean target LPR, lens - base",
               "fidelity": "mean target fidelity, lens - base"}


def short_label(overrides: dict[str, Any]) -> str:
    """``lr=0.0001 lambda_kl=1``: the overrides with the section prefix dropped."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in overrides.items())


def plot_pareto(rec: SweepRecord, out_png: str | Path) -> dict[str, Any]:
    """Draw every point at (English KL, target gain), the Pareto front joined and marked, each
    point labelled with its number and overrides.

    Args:
        rec: the sweep record (``pareto`` flags already set).
        out_png: the picture to write.

    Returns:
        ``{"path", "points": [(index, kl, gain, on_front)], "missing": [index]}``: the
        numbers drawn, and the points left out for lack of a KL or a gain.
    """
    drawn, missing = [], []
    for p in rec.points:
        kl, g = p.metrics.english_kl, p.metrics.target_gain
        if kl is None or g is None:
            missing.append(p.index)
        else:
            drawn.append((p.index, max(kl, KL_FLOOR), g, p.pareto, short_label(p.overrides)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    try:
        for n, (i, kl, g, front, _) in enumerate(drawn):
            ax.scatter(kl, g, s=60 if front else 36, zorder=3,
                       color="#d62728" if front else "#1f77b4",
                       marker="D" if front else "o")
            ax.annotate(str(i + 1), (kl, g), textcoords="offset points",
                        xytext=_OFFSETS[n % len(_OFFSETS)], fontsize=8,
                        fontweight="bold" if front else "normal")
        front_pts = sorted((kl, g) for _, kl, g, front, _ in drawn if front)
        if front_pts:
            xs, ys = zip(*front_pts, strict=True)
            ax.plot(xs, ys, color="#d62728", lw=1.2, ls="--", zorder=2)
        ax.scatter([], [], color="#d62728", marker="D", label="Pareto front")
        ax.scatter([], [], color="#1f77b4", label="dominated")
        key = "\n".join(f"{i + 1}: {label}" for i, _, _, _, label in drawn)
        ax.text(1.02, 1.0, key, transform=ax.transAxes, va="top", ha="left", fontsize=7,
                family="monospace")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("English next-token KL(base || lens), nats (log)")
        ax.set_ylabel(_GAIN_NAMES.get(rec.gain_metric or "", "target-language gain"))
        ax.set_title(f"Sweep of {rec.recipe}: {len(drawn)} points "
                     "(upper left is better)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
        path = _save_atomic(fig, Path(out_png))
    finally:
        plt.close(fig)
    return {"path": path, "points": [(i, kl, g, f) for i, kl, g, f, _ in drawn],
            "missing": missing}
