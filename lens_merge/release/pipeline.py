"""``lens-merge run RECIPE``: every stage of ``lens_merge.release.stages`` into one release
folder, skipping what is up to date.

Each stage records the content hash of its inputs (recipe sections, data, the base model and
the output hashes of the stages it reads) and of its outputs in ``.lens_merge/state.json``. On a
rerun, a stage whose inputs hash the same and whose outputs are still in place (same size and
mtime as recorded) is skipped; ``force`` redoes the named stages and everything downstream of
them is then rerun because its inputs changed. The release's ``recipe.yaml`` is (re)written
only once every stage before the card has succeeded, so a failed run leaves the recipe of the
last good release in place.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

import lens_merge.release.manifest as manifest
from lens_merge import __version__
from lens_merge.config import Recipe
from lens_merge.errors import ConfigError
from lens_merge.files import TEMP_MARK, file_sha256, write_json_atomic, write_text_atomic
from lens_merge.guard import cleanup_stale_temps
from lens_merge.memory import peak_rss, release_memory, reset_peak
from lens_merge.plan import check_plan
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import canonical_hash, now_iso
from lens_merge.records import ReleaseLayout, RunTable, StageRecord
from lens_merge.release.stages import (
    STAGE_NAMES,
    STAGES,
    Context,
    Stage,
    StageResult,
    files_under,
)

__all__ = ["STAGE_NAMES", "run_recipe"]


def _stat_fp(files: list[Path]) -> dict[str, list[int]]:
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def _load_state(path: Path) -> dict:
    if path.is_file():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}  # a damaged state only costs a rerun of every stage
        return state if isinstance(state, dict) else {}
    return {}


def _up_to_date(stage: Stage, ctx: Context, in_hash: str) -> bool:
    rec = ctx.state.get("stages", {}).get(stage.name)
    if not isinstance(rec, dict) or rec.get("status") != "done" \
            or rec.get("input_hash") != in_hash:
        return False
    files = files_under([ctx.p(o) for o in stage.outputs])
    if stage.outputs and not files:
        return False
    return _stat_fp(files) == rec.get("outputs")


def _write_recipe(layout: ReleaseLayout, recipe: Recipe) -> None:
    text = yaml.safe_dump(recipe.model_dump(), sort_keys=False, allow_unicode=True)
    p = layout.path("recipe")
    if not p.is_file() or p.read_text(encoding="utf-8") != text:
        write_text_atomic(p, text)
    manifest.record(layout, "recipe", [p])


def _remove_stale_temps(layout: ReleaseLayout) -> list[Path]:
    """Temporaries a killed run left in the release folder (names made by
    ``lens_merge.files.temp_sibling``), removed before any stage writes new ones; an output
    moved aside and never replaced is put back first."""
    names = {"recipe", "state", "run_table", "manifest", "delta", "model", "gguf", "onnx",
             "adapters", "report", "card"}
    names |= {o for stage in STAGES for o in stage.outputs}
    removed = []
    for name in sorted(names):
        removed += cleanup_stale_temps(layout.path(name))
    dirs = [layout.root, *(p for p in layout.root.iterdir()
                           if p.is_dir() and not p.name.startswith(TEMP_MARK))]
    for d in dirs:
        for f in list(d.iterdir()):
            if f.name.startswith(TEMP_MARK):
                if f.is_dir() and not f.is_symlink():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def _peak_mb(resettable: bool) -> float | None:
    """The stage's peak RSS in MB (None where the peak cannot be reset per stage)."""
    return round(peak_rss() / 1e6, 1) if resettable else None


def run_recipe(
    recipe: Recipe,
    force: list[str] | None = None,
    push: bool = True,
    only: list[str] | None = None,
    progress: Progress = NULL,
    on_stage: Callable[[StageResult], None] | None = None,
) -> list[StageResult]:
    """Run every enabled stage of a recipe into ``OUT/<name>/``, skipping up-to-date ones.

    Args:
        recipe: the validated recipe.
        force: stage names to redo even when up to date.
        push: allow the push stage (it also needs ``release.repo_id``).
        only: run just these stages (their inputs must exist).
        progress: progress reporter.
        on_stage: called after each stage with its result (the CLI prints live).

    Returns:
        One ``StageResult`` per stage, in order. A failing stage raises after its result is
        recorded in ``report/run.json``.
    """
    force = list(force or [])
    for n in force + list(only or []):
        if n not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {n!r}; stages: {', '.join(STAGE_NAMES)}")
    check_plan(recipe, stages=only)  # refuse before any stage when a stage does not fit
    layout = ReleaseLayout(root=recipe.release_dir)
    layout.path("report").mkdir(parents=True, exist_ok=True)
    state = _load_state(layout.path("state"))
    if not isinstance(state.get("stages"), dict):
        state["stages"] = {}
    ctx = Context(recipe, layout, progress, state, push)
    results: list[StageResult] = []
    _remove_stale_temps(layout)

    def save_state() -> None:
        state["tool_version"] = __version__
        state["updated"] = now_iso()
        write_json_atomic(layout.path("state"), state)
        table = RunTable(stages=[StageRecord(**r.__dict__) for r in results])
        write_json_atomic(layout.path("run_table"), table)

    def record(result: StageResult) -> None:
        results.append(result)
        if on_stage:
            on_stage(result)

    for stage in STAGES:
        if stage.name == "card":
            _write_recipe(layout, recipe)
        if only and stage.name not in only:
            continue
        if not stage.enabled(ctx):
            record(StageResult(stage.name, "disabled"))
            continue
        t0 = time.perf_counter()
        release_memory()  # what earlier stages freed goes back to the system first
        resettable = reset_peak()
        try:
            in_hash = canonical_hash({"inputs": stage.inputs(ctx), "tool": __version__})
            if stage.name not in force and _up_to_date(stage, ctx, in_hash):
                record(StageResult(stage.name, "skipped", 0.0,
                                   state["stages"][stage.name].get("numbers", {})))
                continue
            state["stages"][stage.name] = {"status": "running", "input_hash": in_hash}
            numbers = stage.run(ctx) or {}
        except Exception as exc:
            state["stages"].setdefault(stage.name, {})["status"] = "failed"
            results.append(StageResult(stage.name, "failed", time.perf_counter() - t0,
                                       error=str(exc), peak_rss_mb=_peak_mb(resettable)))
            save_state()
            if on_stage:
                on_stage(results[-1])
            raise
        files = files_under([ctx.p(o) for o in stage.outputs])
        out_hash = canonical_hash({str(f.relative_to(layout.root)): file_sha256(f)
                                   for f in files})
        secs, peak = time.perf_counter() - t0, _peak_mb(resettable)
        state["stages"][stage.name] = {"status": "done", "input_hash": in_hash,
                                       "output_hash": out_hash, "outputs": _stat_fp(files),
                                       "numbers": numbers, "seconds": secs,
                                       "peak_rss_mb": peak,
                                       "finished": now_iso()}
        results.append(StageResult(stage.name, "ran", secs, numbers, peak_rss_mb=peak))
        manifest.record(layout, stage.name, [ctx.p(o) for o in stage.outputs])
        save_state()
        if on_stage:
            on_stage(results[-1])
    save_state()
    return results
