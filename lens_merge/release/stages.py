"""The stages of ``lens-merge run``, each one ``Stage``: probe -> train -> eval -> bench -> fold
-> verify -> gguf -> onnx -> adapters -> card -> push.

A stage names its outputs (``ReleaseLayout`` fields), says what its inputs are (a dict that is
hashed: when it and the outputs are unchanged, the runner skips the stage) and runs. Stages
talk to the library only; ``lens_merge.release.pipeline`` runs them and keeps the state.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_merge.config import Recipe
from lens_merge.files import file_sha256, write_json_atomic
from lens_merge.progress import Progress
from lens_merge.provenance import canonical_hash
from lens_merge.records import ParitySet, ReleaseLayout
from lens_merge.release import adapter_stage


@dataclass
class StageResult:
    """What one stage did: ``ran``, ``skipped``, ``disabled`` or ``failed``."""

    name: str
    status: str
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    peak_rss_mb: float | None = None  # the stage's own peak resident memory (lens_merge.memory)


@dataclass
class Context:
    """What a stage sees: the recipe, the release layout, the pipeline state."""

    recipe: Recipe
    layout: ReleaseLayout
    progress: Progress
    state: dict[str, Any]
    push: bool

    def p(self, name: str) -> Path:
        """Absolute path of a layout entry (``ctx.p("model")``)."""
        return self.layout.path(name)

    def out_hash(self, stage: str) -> str:
        return self.state.get("stages", {}).get(stage, {}).get("output_hash", "")

    @property
    def model_name(self) -> str:
        return self.recipe.release.model_name or self.recipe.name


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its outputs (layout fields), input fingerprint, run, and switch."""

    name: str
    outputs: tuple[str, ...]
    inputs: Callable[[Context], dict]
    run: Callable[[Context], dict]
    enabled: Callable[[Context], bool] = lambda ctx: True


# ----------------------------------------------------------------------------- fingerprints

def files_under(paths: list[Path]) -> list[Path]:
    """Every file of the given files and directories, sorted."""
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
    return out


def source_fingerprint(source: str) -> str:
    """Content hash of a data source (``default`` = the embedded file)."""
    from lens_merge.data import DEFAULT, default_data_path

    p = default_data_path() if source == DEFAULT else Path(source)
    return canonical_hash({str(f.relative_to(p) if p.is_dir() else f.name): file_sha256(f)
                           for f in files_under([p])})


def base_fingerprint(ref: str) -> str:
    """Identity of the base model: its config and weight files (names, sizes, mtimes)."""
    from lens_merge.models import resolve_model

    d = resolve_model(ref, progress=True)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    weights = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.iterdir())
               if f.suffix in (".safetensors", ".bin", ".json")}
    return canonical_hash({"config": cfg, "weights": weights})


# ----------------------------------------------------------------------------- lens

def _probe_inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {"base": base_fingerprint(r.base), "languages": r.languages,
            "data": source_fingerprint(r.data.probe), "probe": r.probe.model_dump(),
            "max_length": r.data.max_length, "max_samples": r.data.max_probe_samples}


def _probe_run(ctx: Context) -> dict:
    from lens_merge.lens.run import run_probe

    sub = run_probe(ctx.recipe, ctx.p("subspace"), ctx.progress, work_dir=ctx.p("work"))
    return {"layers": sub.meta["num_layers"], "rank": sub.meta["rank"],
            "samples/lang": min(sub.meta["sample_counts"].values())}


def _train_inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {"base": base_fingerprint(r.base), "probe": ctx.out_hash("probe"),
            "data": source_fingerprint(r.data.train), "train": r.train.model_dump(),
            "max_length": r.data.max_length, "max_samples": r.data.max_train_samples,
            "chat_template": r.probe.chat_template}


def _train_run(ctx: Context) -> dict:
    from lens_merge.lens.probe import Subspace
    from lens_merge.lens.run import run_train

    res = run_train(ctx.recipe, Subspace.load(ctx.p("subspace")), ctx.p("work"), ctx.progress)
    res.delta.save(ctx.p("delta"), overwrite=True)
    shutil.copy2(res.log_path, ctx.p("train_log"))
    return {"steps": res.steps, "cache": "reused" if res.cache_reused else "built",
            **{k: res.final_losses.get(k) for k in ("loss", "separate", "align", "retain")}}


def _eval_inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {"train": ctx.out_hash("train"), "probe": ctx.out_hash("probe"),
            "data": source_fingerprint(r.data.eval), "eval": r.eval.model_dump(),
            "max_length": r.data.max_length, "max_samples": r.data.max_eval_samples}


def _eval_run(ctx: Context) -> dict:
    from lens_merge.lens.probe import Subspace
    from lens_merge.lens.run import record_effect, run_eval
    from lens_merge.weights.delta import LensDelta

    report = run_eval(ctx.recipe, LensDelta.load(ctx.p("delta")),
                      Subspace.load(ctx.p("subspace")), ctx.p("report"), ctx.progress)
    record_effect(ctx.p("delta"), report)
    s = report["summary"]
    return {"agnostic_cos": f"{s['agnostic_cosine']['base']:.3f}->"
                            f"{s['agnostic_cosine']['lens']:.3f}",
            "fidelity": f"{s['fidelity']['base']:.2f}->{s['fidelity']['lens']:.2f}",
            "en_kl": s["english_kl"]}


def _bench_inputs(ctx: Context) -> dict:
    from lens_merge.bench.run import lm_eval_version

    b = ctx.recipe.bench
    inc = files_under([Path(b.include_path)] if b.include_path else [])
    return {"base": base_fingerprint(ctx.recipe.base), "delta": ctx.out_hash("train"),
            "bench": b.model_dump(), "device": ctx.recipe.device, "lm_eval": lm_eval_version(),
            "include": {str(f): file_sha256(f) for f in inc}}


def _bench_run(ctx: Context) -> dict:
    from lens_merge.bench.run import run_bench

    b = ctx.recipe.bench
    rep = run_bench(ctx.recipe.base, ctx.p("delta"), b.tasks, include_path=b.include_path,
                    limit=b.limit, num_fewshot=b.num_fewshot, batch_size=b.batch_size,
                    device=ctx.recipe.device, dtype=b.dtype, out=ctx.p("bench_report"),
                    progress=ctx.progress)
    return {f"{t}/{m}": f"{s.base:.3f}->{s.lens:.3f}" for t, m, s in rep.rows()[:8]
            if s.base is not None and s.lens is not None}


# ----------------------------------------------------------------------------- weights

def _fold_inputs(ctx: Context) -> dict:
    return {"base": base_fingerprint(ctx.recipe.base), "delta": ctx.out_hash("train"),
            "effect": ctx.out_hash("eval"), "link": ctx.recipe.fold.link}


def _fold_run(ctx: Context) -> dict:
    from lens_merge.weights.fold import fold

    rep = fold(ctx.recipe.base, ctx.p("delta"), ctx.p("model"), link=ctx.recipe.fold.link,
               overwrite=True, progress=ctx.progress)
    return {"rewritten_shards": len(rep.rewritten), "max_cast_error": rep.max_cast_error}


def _verify_inputs(ctx: Context) -> dict:
    f = ctx.recipe.fold
    return {"model": ctx.out_hash("fold"), "delta": ctx.out_hash("train"),
            "tolerance": f.tolerance, "languages": ctx.recipe.languages}


def _checked(write_to: Path, check: Callable[[], Any]) -> ParitySet:
    """Run a verification; write its reports as a ``ParitySet`` whether it passes or not."""
    from lens_merge.errors import VerificationError

    try:
        got = check()
    except VerificationError as exc:
        write_json_atomic(write_to, as_set(exc.report).dump())
        raise
    result = as_set(got)
    write_json_atomic(write_to, result.dump())
    return result


def as_set(report: Any) -> ParitySet:
    """A ``ParitySet`` from a report, a list of reports, or a set."""
    if isinstance(report, ParitySet):
        return report
    return ParitySet(reports=list(report) if isinstance(report, list | tuple) else [report])


def _verify_run(ctx: Context) -> dict:
    from lens_merge.weights.verify import verify_fold

    res = _checked(ctx.p("fold_verify"), lambda: verify_fold(
        ctx.recipe.base, ctx.p("delta"), ctx.p("model"), languages=ctx.recipe.languages,
        tolerance=ctx.recipe.fold.tolerance, progress=ctx.progress))
    m = res.reports[0].metrics
    return {"max_abs_logit_diff": m.get("max_abs_logit_diff"), "top1": m.get("top1_agreement")}


# ----------------------------------------------------------------------------- exports

def gguf_file_name(name: str, outtype: str) -> str:
    """Conventional GGUF file name: ``<Name>-<TYPE>.gguf``."""
    return f"{name}-{outtype.upper()}.gguf"


def _gguf_inputs(ctx: Context) -> dict:
    g = ctx.recipe.export.gguf
    return {"model": ctx.out_hash("fold"), "gguf": g.model_dump() if g else None,
            "name": ctx.model_name, "languages": ctx.recipe.languages}


def _gguf_run(ctx: Context) -> dict:
    from lens_merge.errors import VerificationError
    from lens_merge.export.gguf import export_gguf, verify_gguf

    g = ctx.recipe.export.gguf
    out_dir = ctx.p("gguf")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {gguf_file_name(ctx.model_name, t) for t in g.outtypes}
    for stale in out_dir.glob("*.gguf"):
        if stale.name not in wanted:
            stale.unlink()
    reports, numbers, failed, reference = [], {}, None, _references(ctx)
    for t in g.outtypes:
        path = out_dir / gguf_file_name(ctx.model_name, t)
        export_gguf(ctx.p("model"), path, outtype=t, tokenizer_pre=g.tokenizer_pre,
                    progress=ctx.progress)
        if not g.verify:
            continue
        try:
            rep = verify_gguf(ctx.p("model"), path, languages=ctx.recipe.languages,
                              progress=ctx.progress, reference=reference)
        except VerificationError as exc:
            rep, failed = exc.report, failed or exc
        reports.append(rep)
        numbers[t] = f"top1 {rep.metrics.get('top1_agreement', float('nan')):.3f}"
    if g.verify:
        write_json_atomic(ctx.p("gguf_verify"), ParitySet(reports=reports).dump())
    if failed:
        raise failed
    return numbers


def _references(ctx: Context):
    """transformers' side of the folded model's parity checks, kept under the work dir by the
    model's hash: the GGUF check runs it, the ONNX check (and reruns) read it."""
    from lens_merge.parity.reference import References

    key = ctx.out_hash("fold")[:16]
    return References(ctx.p("model"), ctx.p("work") / "reference" / key if key else None)


def _onnx_inputs(ctx: Context) -> dict:
    o = ctx.recipe.export.onnx
    return {"model": ctx.out_hash("fold"), "onnx": o.model_dump() if o else None,
            "languages": ctx.recipe.languages}


def _onnx_run(ctx: Context) -> dict:
    from lens_merge.export.onnx import export_onnx, verify_onnx

    o = ctx.recipe.export.onnx
    export_onnx(ctx.p("model"), ctx.p("onnx"), dtype=o.dtype, quantize=o.quantize,
                int8_method=o.int8_method, exporter=o.exporter, overwrite=True,
                progress=ctx.progress)
    if not o.verify:
        return {}
    res = _checked(ctx.p("onnx_verify"), lambda: verify_onnx(
        ctx.p("model"), ctx.p("onnx"), languages=ctx.recipe.languages, tolerance=o.tolerance,
        progress=ctx.progress, reference=_references(ctx)))
    m = res.reports[0].metrics
    return {"max_abs_logit_diff": m.get("max_abs_logit_diff"),
            "generation_match": m.get("generation_match")}


# ----------------------------------------------------------------------------- release

def _card_inputs(ctx: Context) -> dict:
    stages = ("probe", "train", "eval", "bench", "fold", "verify", "gguf", "onnx", "adapters")
    return {s: ctx.out_hash(s) for s in stages} | {"recipe": ctx.recipe.model_dump()}


def _card_run(ctx: Context) -> dict:
    from lens_merge.release.card import write_card

    path = write_card(ctx.layout.root, recipe=ctx.recipe.model_dump())
    return {"card": path.name}


def _push_inputs(ctx: Context) -> dict:
    return {"card": ctx.out_hash("card"), "release": ctx.recipe.release.model_dump(),
            "all": [ctx.out_hash(s) for s in ("train", "fold", "gguf", "onnx", "adapters")]}


def _push_run(ctx: Context) -> dict:
    from lens_merge.release.push import push

    rel = ctx.recipe.release
    res = push(ctx.layout.root, rel.repo_id, private=rel.private, revision=rel.revision,
               create_pr=rel.create_pr)
    return {"repo": rel.repo_id, "commit": res.get("commit_url") or res.get("oid")}


STAGES: tuple[Stage, ...] = (
    Stage("probe", ("subspace",), _probe_inputs, _probe_run),
    Stage("train", ("delta_weights", "train_log"), _train_inputs, _train_run),
    Stage("eval", ("eval_report", "mean_states", "delta_meta"), _eval_inputs, _eval_run),
    Stage("bench", ("bench_report",), _bench_inputs, _bench_run,
          lambda ctx: bool(ctx.recipe.bench.tasks)),
    Stage("fold", ("model",), _fold_inputs, _fold_run),
    Stage("verify", ("fold_verify",), _verify_inputs, _verify_run,
          lambda ctx: ctx.recipe.fold.verify),
    Stage("gguf", ("gguf", "gguf_verify"), _gguf_inputs, _gguf_run,
          lambda ctx: bool(ctx.recipe.export.gguf and ctx.recipe.export.gguf.outtypes)),
    Stage("onnx", ("onnx", "onnx_verify"), _onnx_inputs, _onnx_run,
          lambda ctx: bool(ctx.recipe.export.onnx and ctx.recipe.export.onnx.enabled)),
    Stage("adapters", ("adapters", "adapters_verify", "cv_effect"), adapter_stage.inputs,
          adapter_stage.run, adapter_stage.enabled),
    Stage("card", ("card", "states_png", "losses_png"), _card_inputs, _card_run),
    Stage("push", (), _push_inputs, _push_run,
          lambda ctx: bool(ctx.push and ctx.recipe.release.repo_id)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
