"""The model card's pictures: language mean states in 2-D, and the training loss terms.

Both are drawn with matplotlib's Agg backend (no display needed) and written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lens_merge.errors import DataError
from lens_merge.files import ordinary_permissions

LOSS_TERMS = ("loss", "retain", "separate", "align")
CENTRAL = "en"


def read_mean_states(path: str | Path) -> tuple[Any, Any, list[str]]:
    """Read ``mean_states.safetensors``: tensors ``base`` and ``lens`` [L, d], languages.

    Returns:
        (base as float64 numpy [L, d], lens as float64 numpy [L, d], language codes).

    Raises:
        DataError: when the file, a tensor or the ``languages`` metadata is missing or the
            shapes disagree.
    """
    import numpy as np
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: mean states file not found")
    with safe_open(str(p), framework="numpy") as fh:
        keys = set(fh.keys())
        meta = fh.metadata() or {}
        missing = {"base", "lens"} - keys
        if missing:
            raise DataError(f"{p}: tensor(s) {sorted(missing)} missing (expected 'base' and "
                            "'lens', each [languages, hidden])")
        base = np.asarray(fh.get_tensor("base"), dtype=np.float64)
        lens = np.asarray(fh.get_tensor("lens"), dtype=np.float64)
    langs = [x for x in (meta.get("languages") or "").split(",") if x]
    if base.ndim != 2 or base.shape != lens.shape:
        raise DataError(f"{p}: 'base' {base.shape} and 'lens' {lens.shape} must both be "
                        "[languages, hidden]")
    if len(langs) != base.shape[0]:
        raise DataError(f"{p}: metadata 'languages' names {len(langs)} languages but the "
                        f"tensors have {base.shape[0]} rows")
    return base, lens, langs


def project_states(base, lens) -> tuple[Any, Any, list[float]]:
    """PCA to 2-D, fitted on the base and Lens means together.

    Args:
        base: [L, d] mean states of the base model.
        lens: [L, d] mean states after Lens.

    Returns:
        (base [L, 2], lens [L, 2], explained variance ratio of the two components).
    """
    import numpy as np

    x = np.concatenate([np.asarray(base, np.float64), np.asarray(lens, np.float64)])
    centred = x - x.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    xy = centred @ comps.T
    if xy.shape[1] < 2:  # fewer than two directions of variation
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    var = s ** 2
    total = float(var.sum()) or 1.0
    ratio = [float(v / total) for v in var[:2]] + [0.0] * max(0, 2 - len(var))
    n = len(base)
    return xy[:n], xy[n:], ratio


def _save_atomic(fig, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.stem}.", suffix=".png", dir=out_png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        ordinary_permissions(tmp)
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_states(mean_states_path: str | Path, out_png: str | Path) -> dict[str, Any]:
    """Draw each language's top-layer mean state before and after Lens, projected to 2-D.

    PCA is fitted on the base and Lens means together; an arrow goes from each language's
    base point to its Lens point, and English (the central language) is highlighted.

    Args:
        mean_states_path: ``report/mean_states.safetensors``.
        out_png: the picture to write.

    Returns:
        ``{"path", "languages", "base_xy", "lens_xy", "explained_variance"}`` (coordinates as
        lists, the numbers that were drawn).
    """
    base, lens, langs = read_mean_states(mean_states_path)
    b2, l2, ratio = project_states(base, lens)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    try:
        for i, lang in enumerate(langs):
            central = lang == CENTRAL
            colour = "#d62728" if central else "#1f77b4"
            ax.annotate("", xy=tuple(l2[i]), xytext=tuple(b2[i]),
                        arrowprops={"arrowstyle": "->", "color": colour,
                                    "lw": 2.2 if central else 1.2})
            ax.scatter(*b2[i], s=90 if central else 40, facecolors="none", edgecolors=colour,
                       marker="*" if central else "o", zorder=3)
            ax.scatter(*l2[i], s=160 if central else 50, color=colour,
                       marker="*" if central else "o", zorder=3)
            ax.annotate(lang, tuple(l2[i]), textcoords="offset points", xytext=(5, 5),
                        fontsize=11 if central else 9,
                        fontweight="bold" if central else "normal", color=colour)
        ax.scatter([], [], facecolors="none", edgecolors="grey", label="base model")
        ax.scatter([], [], color="grey", label="after Lens")
        ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
        ax.set_title("Mean top-layer state per language (PCA, base and Lens fitted together)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        path = _save_atomic(fig, Path(out_png))
    finally:
        plt.close(fig)
    return {"path": path, "languages": langs, "base_xy": b2.tolist(), "lens_xy": l2.tolist(),
            "explained_variance": ratio}


def read_train_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read ``train_log.jsonl`` into ``{term: [(step, value), ...]}`` for the loss terms.

    Raises:
        DataError: when the file is missing, a line is not JSON or lacks ``step``, or no line
            holds any loss term.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: training log not found")
    series: dict[str, list[tuple[int, float]]] = {t: [] for t in LOSS_TERMS}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: not JSON ({exc})") from exc
        if "step" not in rec:
            raise DataError(f"{p}:{n}: field 'step' missing")
        for t in LOSS_TERMS:
            if isinstance(rec.get(t), int | float):
                series[t].append((int(rec["step"]), float(rec[t])))
    series = {t: v for t, v in series.items() if v}
    if not series:
        raise DataError(f"{p}: no line holds any of {list(LOSS_TERMS)}")
    return series


def plot_losses(train_log_jsonl: str | Path, out_png: str | Path) -> dict[str, Any]:
    """Draw the training loss terms (retain, separate, align and the total) against the step.

    Args:
        train_log_jsonl: ``report/train_log.jsonl`` (one JSON object per optimizer step).
        out_png: the picture to write.

    Returns:
        ``{"path", "series": {term: [(step, value), ...]}}``.
    """
    series = read_train_log(train_log_jsonl)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = {"loss": {"color": "black", "lw": 2.0}, "retain": {"color": "#2ca02c"},
              "separate": {"color": "#1f77b4"}, "align": {"color": "#ff7f0e"}}
    try:
        for term, pts in series.items():
            steps, vals = zip(*pts, strict=True)
            ax.plot(steps, vals, marker="." if len(pts) < 40 else None,
                    label="total" if term == "loss" else term, **styles.get(term, {}))
        if all(v > 0 for pts in series.values() for _, v in pts):
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("Lens training loss terms", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = _save_atomic(fig, Path(out_png))
    finally:
        plt.close(fig)
    return {"path": path, "series": series}
