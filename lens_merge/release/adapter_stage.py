"""The ``adapters`` stage of ``lens-merge run``: the Lens edit without new weights.

Into ``adapters/`` of the release: a PEFT LoRA adapter (``adapters/peft/``), a llama.cpp LoRA
GGUF (``<Name>-LoRA-<TYPE>.gguf``) and one llama.cpp control vector per language
(``<Name>-cv-<lang>.gguf``), as the recipe's ``export.lora``, ``export.gguf_lora`` and
``export.control_vectors`` ask. Checks land in ``report/adapters_verify.json`` as a ParitySet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lens_merge.files import write_json_atomic

if TYPE_CHECKING:
    from lens_merge.release.stages import Context

PEFT_DIR = "peft"


def enabled(ctx: Context) -> bool:
    e = ctx.recipe.export
    return bool(e.lora or e.gguf_lora or e.control_vectors)


def inputs(ctx: Context) -> dict:
    e = ctx.recipe.export
    return {"delta": ctx.out_hash("train"), "probe": ctx.out_hash("probe"),
            "model": ctx.out_hash("fold"), "name": ctx.model_name,
            "languages": ctx.recipe.languages, "top_k": ctx.recipe.train.top_k,
            **{k: (getattr(e, k).model_dump() if getattr(e, k) else None)
               for k in ("lora", "gguf_lora", "control_vectors")}}


def run(ctx: Context) -> dict:
    from lens_merge.errors import VerificationError
    from lens_merge.memory import release_memory
    from lens_merge.records import ParitySet

    e = ctx.recipe.export
    out = ctx.p("adapters")
    out.mkdir(parents=True, exist_ok=True)
    reports, numbers, failed = [], {}, None
    for kind, job in (("lora", _peft), ("gguf_lora", _gguf_lora), ("cv", _control_vectors)):
        cfg = {"lora": e.lora, "gguf_lora": e.gguf_lora, "cv": e.control_vectors}[kind]
        if cfg is None:
            continue
        try:
            got, nums = job(ctx, cfg)
        except VerificationError as exc:
            got, nums, failed = [exc.report], {}, failed or exc
        reports += got
        numbers |= nums
        release_memory()  # what one check freed goes back before the next one loads
    write_json_atomic(ctx.p("adapters_verify"), ParitySet(reports=reports).dump())
    bad = [r for r in reports if not r.passed]
    if failed or bad:
        raise failed or VerificationError(
            "adapter verification failed: " + "; ".join(
                f"{r.kind} {r.variant or ''}: {', '.join(r.failures)}" for r in bad),
            ParitySet(reports=reports))
    return numbers


def _peft(ctx: Context, cfg: Any) -> tuple[list, dict]:
    from lens_merge.adapters.peft_lora import export_peft_lora, verify_peft_lora

    d = ctx.p("adapters") / PEFT_DIR
    rep = export_peft_lora(ctx.p("delta"), d, rank=cfg.rank, energy=cfg.energy,
                           base=ctx.recipe.base, overwrite=True)
    nums = {"peft_bytes": (rep.get("sizes") or {}).get("adapter_bytes")}
    if not cfg.verify:
        return [], nums
    v = verify_peft_lora(ctx.recipe.base, d, ctx.p("model"), languages=ctx.recipe.languages,
                         raise_on_failure=True, write_report=False, progress=ctx.progress)
    return [v], nums | {"peft_max_abs_logit_diff": v.metrics.get("max_abs_logit_diff")}


def _base_gguf(ctx: Context, outtype: str):
    """The base model as a GGUF of ``outtype`` in the work dir (built once per run)."""
    from lens_merge.export.gguf import export_gguf
    from lens_merge.models import resolve_model

    work = ctx.p("work") / "adapters"
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"base-{outtype}.gguf"
    if not path.is_file():
        pre = ctx.recipe.export.gguf.tokenizer_pre if ctx.recipe.export.gguf else None
        export_gguf(resolve_model(ctx.recipe.base), path, outtype=outtype, tokenizer_pre=pre,
                    overwrite=True)
    return path


def _gguf_lora(ctx: Context, cfg: Any) -> tuple[list, dict]:
    from lens_merge.adapters.gguf_lora import export_gguf_lora

    path = ctx.p("adapters") / f"{ctx.model_name}-LoRA-{cfg.outtype.upper()}.gguf"
    export_gguf_lora(ctx.p("delta"), ctx.recipe.base, path, rank=cfg.rank, energy=cfg.energy,
                     outtype=cfg.outtype, overwrite=True)
    if not cfg.verify:
        return [], {}
    from lens_merge.adapters._lora_check import verify_gguf_lora
    from lens_merge.export.gguf import export_gguf

    base_gguf = _base_gguf(ctx, cfg.outtype)
    folded_gguf = base_gguf.with_name(f"folded-{cfg.outtype}.gguf")
    pre = ctx.recipe.export.gguf.tokenizer_pre if ctx.recipe.export.gguf else None
    export_gguf(ctx.p("model"), folded_gguf, outtype=cfg.outtype, tokenizer_pre=pre,
                overwrite=True)
    v = verify_gguf_lora(base_gguf, path, folded_gguf, languages=ctx.recipe.languages,
                         progress=ctx.progress)
    return [v], {"gguf_lora_top1": v.metrics.get("top1_agreement")}


def _control_vectors(ctx: Context, cfg: Any) -> tuple[list, dict]:
    """One vector per language; with ``verify``, the first checked against transformers hooks
    on the base f16 GGUF, and for each the share of replies in its language measured at
    ``effect_scales`` (written to ``report/control_vector_effect.json``)."""
    from lens_merge.adapters.control_vector import (
        control_vector_effects,
        export_control_vector,
        verify_control_vector,
    )

    langs = cfg.languages or [x for x in ctx.recipe.languages if x != "en"]
    paths = {}
    for lang in langs:
        paths[lang] = ctx.p("adapters") / f"{ctx.model_name}-cv-{lang}.gguf"
        export_control_vector(ctx.p("subspace"), paths[lang], lang, layers=cfg.layers,
                              scale=cfg.scale, overwrite=True)
    nums: dict[str, Any] = {"control_vectors": len(langs)}
    if not cfg.verify:
        return [], nums
    base_gguf = _base_gguf(ctx, "f16")
    # llama.cpp applies every vector file the same way, so one vector checked against the
    # hooks pins the layer numbering and scale for all (each check reloads both models: about
    # a minute on 2 cores); on English prompts, where a user applies it, and its own language
    lang = langs[0]
    reports = [verify_control_vector(
        ctx.recipe.base, base_gguf, paths[lang], languages=["en", lang],
        prompts_per_language=2, raise_on_failure=False, progress=ctx.progress)]
    if cfg.effect_scales:
        effect = control_vector_effects(
            base_gguf, paths, scales=tuple(cfg.effect_scales), checkpoint=ctx.recipe.base,
            n_prompts=cfg.effect_prompts, max_new_tokens=cfg.effect_tokens,
            progress=ctx.progress)
        write_json_atomic(ctx.p("cv_effect"), {"kind": "control_vector_effect",
                                               "scales": list(cfg.effect_scales),
                                               "languages": effect})
        nums["cv_effect"] = {lang: {str(r["scale"]): r["share_in_language"]
                                    for r in e["rows"]} for lang, e in effect.items()}
    nums["cv_top1_min"] = min(r.metrics.get("top1_agreement", 0.0) for r in reports)
    return reports, nums
