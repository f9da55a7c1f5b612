"""``lens-merge run RECIPE``: probe -> train -> eval -> fold -> verify -> gguf -> onnx -> card
-> push, into one release folder.

Each stage records the content hash of its inputs (recipe sections, data, the base model and
the output hashes of the stages it reads) and of its outputs in ``.lens_merge/state.json``. On a
rerun, a stage whose inputs hash the same and whose outputs are still in place (same size and
mtime as recorded) is skipped; ``force`` redoes the named stages and everything downstream of
them is then rerun because its inputs changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lens_merge import __version__
from lens_merge.checkpoint import file_sha256
from lens_merge.config import Recipe
from lens_merge.errors import ConfigError, LensMergeError
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import canonical_hash, now_iso, write_json_atomic

STATE_FILE = ".lens_merge/state.json"
RUN_TABLE = "report/run.json"


@dataclass
class StageResult:
    name: str
    status: str  # ran | skipped | disabled | failed
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Context:
    recipe: Recipe
    root: Path
    progress: Progress
    state: dict[str, Any]
    push: bool

    def p(self, rel: str) -> Path:
        return self.root / rel

    def out_hash(self, stage: str) -> str:
        return self.state.get("stages", {}).get(stage, {}).get("output_hash", "")


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: tuple[str, ...]  # files or directories under the release folder
    inputs: Callable[[Context], dict]
    run: Callable[[Context], dict]
    enabled: Callable[[Context], bool] = lambda ctx: True


# ----------------------------------------------------------------------------- fingerprints

def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
    return out


def _stat_fp(files: list[Path]) -> dict[str, list[int]]:
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def source_fingerprint(source: str) -> str:
    """Content hash of a data source (``default`` = the embedded file)."""
    from lens_merge.data import DEFAULT, default_data_path

    p = default_data_path() if source == DEFAULT else Path(source)
    files = _files([p])
    return canonical_hash({str(f.relative_to(p) if p.is_dir() else f.name): file_sha256(f)
                           for f in files})


def base_fingerprint(ref: str) -> str:
    """Identity of the base model: its config and weight files (names, sizes, mtimes)."""
    from lens_merge.models import resolve_model

    d = resolve_model(ref, progress=True)
    cfg = json.loads((d / "config.json").read_text())
    weights = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.iterdir())
               if f.suffix in (".safetensors", ".bin", ".json")}
    return canonical_hash({"config": cfg, "weights": weights})


# ----------------------------------------------------------------------------- stages

def _probe_inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {"base": base_fingerprint(r.base), "languages": r.languages,
            "data": source_fingerprint(r.data.probe), "probe": r.probe.model_dump(),
            "max_length": r.data.max_length, "max_samples": r.data.max_probe_samples}


def _probe_run(ctx: Context) -> dict:
    from lens_merge.stages import run_probe

    sub = run_probe(ctx.recipe, ctx.p("report/subspace"), ctx.progress, work_dir=ctx.p(".work"))
    return {"layers": sub.meta["num_layers"], "rank": sub.meta["rank"],
            "samples/lang": min(sub.meta["sample_counts"].values())}


def _train_inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {"base": base_fingerprint(r.base), "probe": ctx.out_hash("probe"),
            "data": source_fingerprint(r.data.train), "train": r.train.model_dump(),
            "max_length": r.data.max_length, "max_samples": r.data.max_train_samples,
            "chat_template": r.probe.chat_template}


def _train_run(ctx: Context) -> dict:
    from lens_merge.probe import Subspace
    from lens_merge.stages import run_train

    res = run_train(ctx.recipe, Subspace.load(ctx.p("report/subspace")), ctx.p(".work"),
                    ctx.progress)
    res.delta.save(ctx.p("delta"), overwrite=True)
    import shutil

    shutil.copy2(res.log_path, ctx.p("report/train_log.jsonl"))
    return {"steps": res.steps, "cache": "reused" if res.cache_reused else "built",
            **{k: res.final_losses.get(k) for k in ("loss", "separate", "align", "retain")}}


def _eval_inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {"train": ctx.out_hash("train"), "probe": ctx.out_hash("probe"),
            "data": source_fingerprint(r.data.eval), "eval": r.eval.model_dump(),
            "max_length": r.data.max_length, "max_samples": r.data.max_eval_samples}


def _eval_run(ctx: Context) -> dict:
    from lens_merge.delta import LensDelta
    from lens_merge.probe import Subspace
    from lens_merge.stages import record_effect, run_eval

    report = run_eval(ctx.recipe, LensDelta.load(ctx.p("delta")),
                      Subspace.load(ctx.p("report/subspace")), ctx.p("report"), ctx.progress)
    record_effect(ctx.p("delta"), report)
    s = report["summary"]
    return {"agnostic_cos": f"{s['agnostic_cosine']['base']:.3f}->"
                            f"{s['agnostic_cosine']['lens']:.3f}",
            "fidelity": f"{s['fidelity']['base']:.2f}->{s['fidelity']['lens']:.2f}",
            "en_kl": s["english_kl"]}


def _fold_inputs(ctx: Context) -> dict:
    return {"base": base_fingerprint(ctx.recipe.base), "delta": ctx.out_hash("train"),
            "effect": ctx.out_hash("eval"), "link": ctx.recipe.fold.link}


def _fold_run(ctx: Context) -> dict:
    from lens_merge.fold import fold

    rep = fold(ctx.recipe.base, ctx.p("delta"), ctx.p("model"), link=ctx.recipe.fold.link,
               overwrite=True, progress=ctx.progress)
    return {"rewritten_shards": len(rep.rewritten), "max_cast_error": rep.max_cast_error}


def _verify_inputs(ctx: Context) -> dict:
    f = ctx.recipe.fold
    return {"model": ctx.out_hash("fold"), "delta": ctx.out_hash("train"),
            "tolerance": f.tolerance, "languages": ctx.recipe.languages}


def _verify_run(ctx: Context) -> dict:
    from lens_merge.errors import VerificationError
    from lens_merge.fold import verify_fold

    try:
        rep = verify_fold(ctx.recipe.base, ctx.p("delta"), ctx.p("model"),
                          languages=ctx.recipe.languages, tolerance=ctx.recipe.fold.tolerance,
                          progress=ctx.progress)
    except VerificationError as exc:
        write_json_atomic(ctx.p("report/fold_verify.json"), exc.report)
        raise
    write_json_atomic(ctx.p("report/fold_verify.json"), rep)
    return {"max_abs_logit_diff": rep["max_abs_logit_diff"],
            "top1": rep["top1_agreement"]}


def gguf_file_name(name: str, outtype: str) -> str:
    """Conventional GGUF file name: ``<Name>-<TYPE>.gguf``."""
    return f"{name}-{outtype.upper()}.gguf"


def _gguf_inputs(ctx: Context) -> dict:
    g = ctx.recipe.export.gguf
    return {"model": ctx.out_hash("fold"), "gguf": g.model_dump() if g else None,
            "name": _model_name(ctx), "languages": ctx.recipe.languages}


def _gguf_run(ctx: Context) -> dict:
    from lens_merge.errors import VerificationError
    from lens_merge.export.gguf import export_gguf, verify_gguf

    g = ctx.recipe.export.gguf
    out_dir = ctx.p("gguf")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {gguf_file_name(_model_name(ctx), t) for t in g.outtypes}
    for stale in out_dir.glob("*.gguf"):
        if stale.name not in wanted:
            stale.unlink()
    results, numbers, failed, reference = {}, {}, None, {}
    for t in g.outtypes:
        path = out_dir / gguf_file_name(_model_name(ctx), t)
        exp = export_gguf(ctx.p("model"), path, outtype=t, tokenizer_pre=g.tokenizer_pre,
                          progress=ctx.progress)
        results[t] = {"export": exp, "file": path.name, "size": path.stat().st_size}
        if g.verify:
            try:
                results[t]["verify"] = verify_gguf(ctx.p("model"), path,
                                                   languages=ctx.recipe.languages,
                                                   progress=ctx.progress, reference=reference)
            except VerificationError as exc:
                results[t]["verify"] = exc.report
                failed = failed or exc
            v = results[t]["verify"]
            numbers[t] = f"top1 {v.get('top1_agreement', float('nan')):.3f}"
    write_json_atomic(ctx.p("report/gguf_verify.json"), results)
    if failed:
        raise failed
    return numbers


def _onnx_inputs(ctx: Context) -> dict:
    o = ctx.recipe.export.onnx
    return {"model": ctx.out_hash("fold"), "onnx": o.model_dump() if o else None,
            "languages": ctx.recipe.languages}


def _onnx_run(ctx: Context) -> dict:
    from lens_merge.errors import VerificationError
    from lens_merge.export.onnx import export_onnx, verify_onnx

    o = ctx.recipe.export.onnx
    exp = export_onnx(ctx.p("model"), ctx.p("onnx"), dtype=o.dtype, quantize=o.quantize,
                      int8_method=o.int8_method, overwrite=True, progress=ctx.progress)
    result: dict[str, Any] = {"export": exp}
    numbers: dict[str, Any] = {}
    if o.verify:
        try:
            result["verify"] = verify_onnx(ctx.p("model"), ctx.p("onnx"),
                                           languages=ctx.recipe.languages,
                                           tolerance=o.tolerance, progress=ctx.progress)
        except VerificationError as exc:
            result["verify"] = exc.report
            write_json_atomic(ctx.p("report/onnx_verify.json"), result)
            raise
        v = result["verify"]
        numbers = {"max_abs_logit_diff": v.get("max_abs_logit_diff"),
                   "generation_match": v.get("generation_match", v.get("generations_match"))}
    write_json_atomic(ctx.p("report/onnx_verify.json"), result)
    return numbers


def _card_inputs(ctx: Context) -> dict:
    return {s: ctx.out_hash(s) for s in ("probe", "train", "eval", "fold", "verify", "gguf",
                                         "onnx")} | {"recipe": ctx.recipe.model_dump()}


def _card_run(ctx: Context) -> dict:
    from lens_merge.hub.card import write_card

    path = write_card(ctx.root, recipe=ctx.recipe.model_dump())
    return {"card": path.name}


def _push_inputs(ctx: Context) -> dict:
    return {"card": ctx.out_hash("card"), "release": ctx.recipe.release.model_dump(),
            "all": [ctx.out_hash(s) for s in ("train", "fold", "gguf", "onnx")]}


def _push_run(ctx: Context) -> dict:
    from lens_merge.hub.push import push

    rel = ctx.recipe.release
    res = push(ctx.root, rel.repo_id, private=rel.private, revision=rel.revision,
               create_pr=rel.create_pr)
    return {"repo": rel.repo_id, "commit": res.get("commit_url") or res.get("oid")}


def _model_name(ctx: Context) -> str:
    return ctx.recipe.release.model_name or ctx.recipe.name


STAGES: tuple[Stage, ...] = (
    Stage("probe", ("report/subspace",), _probe_inputs, _probe_run),
    Stage("train", ("delta/lens_delta.safetensors", "report/train_log.jsonl"),
          _train_inputs, _train_run),
    Stage("eval", ("report/lens_report.json", "report/mean_states.safetensors",
                   "delta/lens_delta.json"), _eval_inputs, _eval_run),
    Stage("fold", ("model",), _fold_inputs, _fold_run),
    Stage("verify", ("report/fold_verify.json",), _verify_inputs, _verify_run,
          lambda ctx: ctx.recipe.fold.verify),
    Stage("gguf", ("gguf", "report/gguf_verify.json"), _gguf_inputs, _gguf_run,
          lambda ctx: bool(ctx.recipe.export.gguf and ctx.recipe.export.gguf.outtypes)),
    Stage("onnx", ("onnx", "report/onnx_verify.json"), _onnx_inputs, _onnx_run,
          lambda ctx: bool(ctx.recipe.export.onnx and ctx.recipe.export.onnx.enabled)),
    Stage("card", ("README.md", "report/states_2d.png", "report/losses.png"), _card_inputs,
          _card_run),
    Stage("push", (), _push_inputs, _push_run,
          lambda ctx: bool(ctx.push and ctx.recipe.release.repo_id)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def _load_state(root: Path) -> dict:
    p = root / STATE_FILE
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _up_to_date(stage: Stage, ctx: Context, in_hash: str) -> bool:
    rec = ctx.state.get("stages", {}).get(stage.name)
    if not rec or rec.get("status") != "done" or rec.get("input_hash") != in_hash:
        return False
    files = _files([ctx.p(o) for o in stage.outputs])
    if stage.outputs and not files:
        return False
    return _stat_fp(files) == rec.get("outputs")


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
    root = recipe.release_dir
    root.mkdir(parents=True, exist_ok=True)
    (root / "report").mkdir(exist_ok=True)
    recipe_yaml = yaml.safe_dump(recipe.model_dump(), sort_keys=False, allow_unicode=True)
    if not (root / "recipe.yaml").is_file() or (root / "recipe.yaml").read_text() != recipe_yaml:
        (root / "recipe.yaml").write_text(recipe_yaml)
    state = _load_state(root)
    state.setdefault("stages", {})
    ctx = Context(recipe, root, progress, state, push)
    results: list[StageResult] = []

    def save_state() -> None:
        state["tool_version"] = __version__
        state["updated"] = now_iso()
        write_json_atomic(root / STATE_FILE, state)
        write_json_atomic(root / RUN_TABLE, [r.__dict__ for r in results])

    for stage in STAGES:
        if only and stage.name not in only:
            continue
        if not stage.enabled(ctx):
            results.append(StageResult(stage.name, "disabled"))
            if on_stage:
                on_stage(results[-1])
            continue
        in_hash = canonical_hash({"inputs": stage.inputs(ctx), "tool": __version__})
        if stage.name not in force and _up_to_date(stage, ctx, in_hash):
            rec = state["stages"][stage.name]
            results.append(StageResult(stage.name, "skipped", 0.0, rec.get("numbers", {})))
            if on_stage:
                on_stage(results[-1])
            continue
        t0 = time.perf_counter()
        state["stages"][stage.name] = {"status": "running", "input_hash": in_hash}
        try:
            numbers = stage.run(ctx) or {}
        except (LensMergeError, Exception) as exc:
            state["stages"][stage.name]["status"] = "failed"
            results.append(StageResult(stage.name, "failed", time.perf_counter() - t0,
                                       error=str(exc)))
            save_state()
            if on_stage:
                on_stage(results[-1])
            raise
        files = _files([ctx.p(o) for o in stage.outputs])
        out_hash = canonical_hash({str(f.relative_to(root)): file_sha256(f) for f in files})
        secs = time.perf_counter() - t0
        state["stages"][stage.name] = {"status": "done", "input_hash": in_hash,
                                       "output_hash": out_hash, "outputs": _stat_fp(files),
                                       "numbers": numbers, "seconds": secs,
                                       "finished": now_iso()}
        results.append(StageResult(stage.name, "ran", secs, numbers))
        save_state()
        if on_stage:
            on_stage(results[-1])
    save_state()
    return results
