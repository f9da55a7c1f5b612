"""Run a sweep: probe once, then train and evaluate every grid point on one training cache.

Layout of the sweep folder ``out``::

    probe/subspace/           the probe (run once, reused while its inputs are unchanged)
    probe/sweep_probe.json    ProbeRecord, written after the subspace
    work/cache/<key16>/       the training cache every point shares (built once per cache key)
    points/<key16>/           one point: train_log.jsonl, report/, [delta/], point.json (last)
    sweep.json sweep.md sweep_pareto.png sweep_log.jsonl

A point's key hashes its whole recipe (grid values and every other value that changes a point),
the base model, the train and eval data and the probe's subspace: a finished point (its
``point.json`` present, written last) is reused while that holds; a point folder without it is
removed and run again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lens_merge.config import Recipe
from lens_merge.errors import ConfigError, LensMergeError
from lens_merge.files import write_json_atomic, write_text_atomic
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import canonical_hash, now_iso, tool_info
from lens_merge.sweep.grid import Point, expand_grid
from lens_merge.sweep.metrics import pareto_front, report_metrics
from lens_merge.sweep.record import ProbeRecord, SweepPoint, SweepRecord
from lens_merge.sweep.table import render_table

POINT_FILE = "point.json"
PROBE_FILE = "sweep_probe.json"
LOG_FILE = "sweep_log.jsonl"
KEY_VERSION = 1


@dataclass
class SweepEvent:
    """What the sweep just did, for the caller to show (the library prints nothing)."""

    kind: Literal["probe", "point"]
    status: Literal["ran", "reused"]
    index: int  # the point's index (0 for the probe)
    total: int  # points in this run
    label: str  # the point's overrides, or "probe"
    seconds: float
    cache: Literal["built", "reused"] | None


@dataclass
class SweepResult:
    """The record and the files written."""

    record: SweepRecord
    json_path: Path
    table_path: Path
    plot_path: Path
    table: str


class _Fingerprints:
    """Base model and data-source hashes, computed once per sweep."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], str] = {}

    def get(self, kind: str, ref: str) -> str:
        from lens_merge.release.stages import base_fingerprint, source_fingerprint

        if (kind, ref) not in self._seen:
            fn = base_fingerprint if kind == "base" else source_fingerprint
            self._seen[kind, ref] = fn(ref)
        return self._seen[kind, ref]


def probe_key(r: Recipe, fp: _Fingerprints) -> str:
    """What the sweep's probe depends on (base, languages, probing data and settings)."""
    return canonical_hash({"base": fp.get("base", r.base), "languages": r.languages,
                           "data": fp.get("data", r.data.probe), "probe": r.probe.model_dump(),
                           "max_length": r.data.max_length,
                           "max_samples": r.data.max_probe_samples, "dtype": r.train.dtype,
                           "device": r.device, "version": KEY_VERSION})


def point_key(r: Recipe, fp: _Fingerprints, subspace_sha256: str) -> str:
    """What a point depends on: its recipe (grid values included; name, output and export
    settings excluded), the base, the train/eval data and the probe's subspace."""
    sections = {"base", "languages", "device", "data", "probe", "train", "eval"}
    return canonical_hash({"recipe": r.model_dump(mode="json", include=sections),
                           "base": fp.get("base", r.base),
                           "data": {k: fp.get("data", getattr(r.data, k))
                                    for k in ("train", "eval")},
                           "subspace": subspace_sha256, "version": KEY_VERSION})


def _read_point(path: Path) -> SweepPoint | None:
    """A finished point's record, or None (absent or unreadable: the point runs again)."""
    if not path.is_file():
        return None
    try:
        return SweepPoint.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _cache_path(r: Recipe, work: Path) -> Path:
    from lens_merge.data import load_prompts
    from lens_merge.lens.train.loop import cache_path_for
    from lens_merge.models import resolve_model

    prompts = load_prompts(r.data.train, r.languages, split="train",
                           max_samples=r.data.max_train_samples)
    return cache_path_for(work, resolve_model(r.base, progress=True), prompts, r.train,
                          r.data.max_length, r.probe.chat_template)


def _probe(first: Recipe, out: Path, fp: _Fingerprints, progress: Progress):
    """Run the probe (sharing its pass with the first point's cache) or reuse it."""
    from lens_merge.lens.probe import Subspace
    from lens_merge.lens.run import run_probe
    from lens_merge.lens.train.store import is_complete

    key = probe_key(first, fp)
    folder, rec_path = out / "probe" / "subspace", out / "probe" / PROBE_FILE
    try:
        prev = ProbeRecord.model_validate(json.loads(rec_path.read_text(encoding="utf-8")))
        sub = Subspace.load(folder)
        if prev.key == key and prev.subspace_sha256 == sub.sha256:
            return sub, prev.model_copy(update={"status": "reused"})
    except (OSError, ValueError, LensMergeError):
        pass
    rec_path.unlink(missing_ok=True)
    cache = _cache_path(first, out / "work")
    before = is_complete(cache)
    t0 = time.perf_counter()
    sub = run_probe(first, folder, progress, work_dir=out / "work")
    rec = ProbeRecord(key=key, subspace_sha256=sub.sha256, seconds=time.perf_counter() - t0,
                      cache_built=not before and is_complete(cache))
    write_json_atomic(rec_path, rec)
    return sub, rec


def _run_point(pt: Point, key: str, sub, out: Path, folder: Path, progress: Progress,
               keep_deltas: bool) -> SweepPoint:
    """Train and evaluate one point into ``folder``; ``point.json`` is written last."""
    from lens_merge.lens.run import run_eval, run_train

    if folder.exists():  # an unfinished point: start it again from nothing
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    res = run_train(pt.recipe, sub, out / "work", progress)
    if res.delta is None:
        raise ConfigError("lens-merge sweep runs in one process (not under accelerate launch)")
    shutil.copy2(res.log_path, folder / "train_log.jsonl")
    if keep_deltas:
        res.delta.save(folder / "delta", overwrite=True)
    t1 = time.perf_counter()
    report = run_eval(pt.recipe, res.delta, sub, folder / "report", progress)
    point = SweepPoint(index=pt.index, key=key, overrides=pt.overrides,
                       final_losses={k: float(v) for k, v in res.final_losses.items()},
                       steps=res.steps, cache="reused" if res.cache_reused else "built",
                       cache_key=res.cache_path.name, metrics=report_metrics(report),
                       train_seconds=t1 - t0, eval_seconds=time.perf_counter() - t1)
    write_json_atomic(folder / POINT_FILE, point)
    return point


def run_sweep(recipe: Recipe, grid: dict[str, list[Any]], out_dir: str | Path,
              progress: Progress = NULL, max_points: int | None = None,
              keep_deltas: bool = False,
              on_event: Callable[[SweepEvent], None] | None = None) -> SweepResult:
    """Probe once, then train and evaluate each grid point on one shared training cache.

    Args:
        recipe: the sweep's recipe (every value the grid does not set).
        grid: ``{dotted key: [values]}`` (``parse_grid``); validated before any work.
        out_dir: the sweep folder (see the module docstring); reruns resume in it.
        progress: progress reporter for the probe, training and eval.
        max_points: run only the first N points of the grid (the rest on a later run).
        keep_deltas: also save each point's delta (``points/<key16>/delta``).
        on_event: called after the probe and after each point.

    Returns:
        ``SweepResult``: the record (``sweep.json``) and the table (``sweep.md``), with the
        Pareto picture ``sweep_pareto.png``.

    Raises:
        ConfigError: a bad grid key or value (named), before any work.
    """
    points = expand_grid(recipe, grid)
    if max_points is not None and max_points < 1:
        raise ConfigError(f"--points {max_points}: expected at least 1")
    todo = points[:max_points] if max_points else points
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = _Fingerprints()

    def emit(ev: SweepEvent) -> None:
        with open(out / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": now_iso(), **ev.__dict__}) + "\n")
        if on_event:
            on_event(ev)

    sub, probe_rec = _probe(todo[0].recipe, out, fp, progress)
    emit(SweepEvent("probe", probe_rec.status, 0, len(todo), "probe",
                    probe_rec.seconds if probe_rec.status == "ran" else 0.0,
                    "built" if probe_rec.cache_built and probe_rec.status == "ran" else None))
    done: list[SweepPoint] = []
    for pt in todo:
        key = point_key(pt.recipe, fp, sub.sha256)
        folder = out / "points" / key[:16]
        prev = _read_point(folder / POINT_FILE)
        if prev is not None and prev.key == key:
            point = prev.model_copy(update={"index": pt.index, "overrides": pt.overrides,
                                            "status": "reused"})
        else:
            point = _run_point(pt, key, sub, out, folder, progress, keep_deltas)
        done.append(point)
        emit(SweepEvent("point", point.status, pt.index, len(todo), pt.label,
                        point.train_seconds + point.eval_seconds, point.cache))
    return write_outputs(recipe, grid_values(points), len(points), probe_rec, done, out)


def grid_values(points: list[Point]) -> dict[str, list[Any]]:
    """The validated values of each grid key, in grid order."""
    keys = list(points[0].overrides) if points else []
    return {k: list(dict.fromkeys(p.overrides[k] for p in points)) for k in keys}


def write_outputs(recipe: Recipe, grid: dict[str, list[Any]], grid_points: int,
                  probe: ProbeRecord, done: list[SweepPoint], out: Path) -> SweepResult:
    """Mark the Pareto front and write ``sweep.json``, ``sweep.md`` and ``sweep_pareto.png``."""
    from lens_merge.sweep.plot import plot_pareto

    flags = pareto_front([(p.metrics.english_kl, p.metrics.target_gain) for p in done])
    done = [p.model_copy(update={"pareto": f}) for p, f in zip(done, flags, strict=True)]

    def common(attr: str) -> str | None:
        vals = [getattr(p.metrics, attr) for p in done if getattr(p.metrics, attr)]
        return max(set(vals), key=vals.count) if vals else None

    rec = SweepRecord(recipe=recipe.name, grid=grid, grid_points=grid_points, probe=probe,
                      cache_builds=int(probe.cache_built) + sum(p.cache == "built" for p in done),
                      points=done, up_metric=common("up_metric"),
                      gain_metric=common("gain_metric"), tool=tool_info())
    write_json_atomic(out / "sweep.json", rec)
    table = render_table(rec)
    write_text_atomic(out / "sweep.md", f"# Lens sweep: {recipe.name}\n\n{table}\n"
                      "![Pareto front](sweep_pareto.png)\n")
    plot = plot_pareto(rec, out / "sweep_pareto.png")
    return SweepResult(rec, out / "sweep.json", out / "sweep.md", plot["path"], table)
