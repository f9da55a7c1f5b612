"""The Lens stages as functions of a recipe: probe, train, eval (used by the CLI and the release
pipeline)."""

from __future__ import annotations

from pathlib import Path

from lens_merge.config import Recipe
from lens_merge.data import PromptSet, load_prompts
from lens_merge.files import write_json_atomic
from lens_merge.lens.evaluate import EvalResult, effect_summary, evaluate, write_report
from lens_merge.lens.probe import Subspace, probe
from lens_merge.lens.train import TrainResult, train
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import canonical_hash
from lens_merge.weights.delta import DELTA_META, LensDelta, read_meta


def run_probe(recipe: Recipe, out_dir: str | Path, progress: Progress = NULL,
              work_dir: str | Path | None = None) -> Subspace:
    """Probe the recipe's base model on its probing texts; save and return the subspace.

    The frozen model is streamed one block at a time (``lens_merge.lens.stream``), in the
    training dtype (``train.dtype``). With ``work_dir`` (the training stage's), a probe whose
    texts are among the training prompts shares that pass with the training cache, which is
    written there for the train stage to reuse (see ``_shared_pass``).
    """
    from lens_merge.models import load_tokenizer, resolve_model
    from lens_merge.weights.checkpoint import Checkpoint

    model_dir = resolve_model(recipe.base, progress=True)
    texts_set = load_prompts(recipe.data.probe, recipe.languages, split="train",
                             max_samples=recipe.data.max_probe_samples)
    tok = load_tokenizer(model_dir)
    texts = {lang: texts_set.texts(lang) for lang in recipe.languages}
    meta = {"model": {"ref": recipe.base, "path": str(model_dir),
                      "config_sha256": canonical_hash(Checkpoint.open(model_dir).config())},
            "data": {"source": texts_set.source}}
    shared = (_shared_pass(recipe, model_dir, tok, texts, Path(work_dir), progress)
              if work_dir is not None else None)
    sub = probe(model_dir, tok, texts, pooling=recipe.probe.pooling, rank=recipe.probe.rank,
                max_length=recipe.data.max_length, batch_size=recipe.probe.batch_size,
                chat_template=recipe.probe.chat_template, meta=meta, progress=progress,
                precomputed=shared, dtype=recipe.train.dtype, device=recipe.device)
    sub.save(out_dir)
    return sub


def _shared_pass(recipe: Recipe, model_dir: Path, tok, texts: dict[str, list[str]],
                 work_dir: Path, progress: Progress):
    """Build the training cache now and take the probe's pooled states from the same pass.

    Probing and caching both run the frozen model over prompts; when a language's probing
    texts are all among its training prompts (the default recipe probes the first rows of
    the training split), one pass serves both. Nothing is shared when the cache already
    exists or no language is covered.

    Returns:
        ``{lang: [n_layers, len(texts[lang]), d]}`` for the covered languages, or None.
    """
    import torch

    from lens_merge.lens.hidden import EncodedBatch, in_row_order, pool
    from lens_merge.lens.train.cache import build_cache
    from lens_merge.lens.train.loop import cache_path_for, reply_tokens
    from lens_merge.lens.train.store import is_complete

    prompts = load_prompts(recipe.data.train, recipe.languages, split="train",
                           max_samples=recipe.data.max_train_samples)
    path = cache_path_for(work_dir, model_dir, prompts, recipe.train, recipe.data.max_length,
                          recipe.probe.chat_template)
    if is_complete(path):
        return None
    where = {}
    for lang in recipe.languages:
        row_of = {t: i for i, t in enumerate(prompts.texts(lang))}
        if all(t in row_of for t in texts[lang]):
            where[lang] = [row_of[t] for t in texts[lang]]
    if not where:
        return None
    pooled: dict[str, dict[int, list[torch.Tensor]]] = {lang: {} for lang in where}
    seen: dict[str, list[EncodedBatch]] = {lang: [] for lang in where}

    def observe(batch: EncodedBatch, k: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        if batch.lang not in pooled:
            return
        if k == 0:
            seen[batch.lang].append(batch)
        else:  # layer k-1: HF hidden_states[k]
            pooled[batch.lang].setdefault(k, []).append(
                pool(hidden, mask, recipe.probe.pooling).float().cpu())

    cache = build_cache(model_dir, tok, prompts, recipe.train.top_k, recipe.data.max_length,
                        recipe.train.cache_batch_size, recipe.probe.chat_template,
                        recipe.train.dtype, recipe.device, progress, observe,
                        reply_tokens=reply_tokens(recipe.train))
    cache.save(path)
    return {lang: torch.stack([in_row_order(seen[lang], per_k[k]) for k in sorted(per_k)])
            [:, where[lang]] for lang, per_k in pooled.items()}


def run_train(recipe: Recipe, subspace: Subspace, work_dir: str | Path,
              progress: Progress = NULL) -> TrainResult:
    """Train on the recipe's parallel prompts; returns the result with the (unsaved) delta."""
    from lens_merge.models import resolve_model

    model_dir = resolve_model(recipe.base, progress=True)
    prompts = load_prompts(recipe.data.train, recipe.languages, split="train",
                           max_samples=recipe.data.max_train_samples)
    return train(model_dir, subspace, prompts, recipe.train, work_dir,
                 max_length=recipe.data.max_length, chat_template=recipe.probe.chat_template,
                 base_ref=recipe.base, cpu=recipe.device == "cpu", progress=progress)


def run_eval(recipe: Recipe, delta: LensDelta, subspace: Subspace, out_dir: str | Path,
             progress: Progress = NULL) -> dict:
    """Evaluate base vs base+delta (and the steering baseline, ``eval.steering``) on held-out
    prompts; writes the report files into out_dir.

    The training prompts give the indicative tokens of the first-token mass and the rows
    steering's alphas are chosen on (never the held-out rows).
    """
    from lens_merge.models import resolve_model

    model_dir = resolve_model(recipe.base, progress=True)
    langs = delta.languages or recipe.languages
    prompts = load_prompts(recipe.data.eval, langs, split="heldout",
                           max_samples=recipe.data.max_eval_samples)
    train_prompts = load_prompts(recipe.data.train, langs, split="train",
                                 max_samples=recipe.data.max_train_samples)
    ev = recipe.eval
    english_extra = None
    if ev.kl_prompts and ev.kl_prompts > len(prompts):
        more = load_prompts(recipe.data.eval, langs[:1], split="heldout",
                            max_samples=ev.kl_prompts)
        seen = set(prompts.texts(langs[0]))
        english_extra = PromptSet((langs[0],), tuple(r for r in more.rows
                                                     if r[langs[0]] not in seen), more.source)
    result: EvalResult = evaluate(model_dir, delta, subspace, prompts,
                                  max_length=recipe.data.max_length,
                                  batch_size=ev.batch_size,
                                  max_new_tokens=ev.max_new_tokens,
                                  chat_template=recipe.probe.chat_template,
                                  max_memory=ev.max_memory,
                                  # the model in the training dtype (bf16 for the 8B recipes:
                                  # what the memory plan assumes), on the recipe's device
                                  dtype=recipe.train.dtype, device=recipe.device,
                                  progress=progress, train_prompts=train_prompts,
                                  steering=ev.steering, steering_alphas=ev.steering_alphas,
                                  steering_rows=ev.steering_rows,
                                  steering_tokens=ev.steering_tokens,
                                  english_extra=english_extra)
    write_report(result, out_dir)
    return result.report


def record_effect(delta_dir: str | Path, report: dict) -> None:
    """Record the measured effect in a saved delta's json (rewritten atomically)."""
    p = Path(delta_dir) / DELTA_META
    meta = read_meta(p)
    meta["effect"] = effect_summary(report)
    write_json_atomic(p, meta)
