"""The Lens trainer: cached top-K training on accelerate (DDP/FSDP/DeepSpeed via ``launch``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_merge.architectures import for_config
from lens_merge.config import TrainConfig
from lens_merge.data import PromptSet
from lens_merge.errors import DataError
from lens_merge.lens.probe import Subspace
from lens_merge.lens.train.cache import build_cache
from lens_merge.lens.train.losses import LossWeights, lens_losses
from lens_merge.lens.train.store import own_columns
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import canonical_hash
from lens_merge.weights.checkpoint import Checkpoint, hash_entry
from lens_merge.weights.delta import LensDelta

LOG_NAME = "train_log.jsonl"
SHOWN = ("loss", "retain", "separate", "align", "retain_last", "kl", "kl_tokens",  # bar
         "kl_replies")


@dataclass
class TrainResult:
    delta: LensDelta | None  # None on non-main processes
    log_path: Path
    final_losses: dict[str, float]
    cache_path: Path
    cache_reused: bool
    steps: int
    cache_rows: list[int]  # the rows this process built (empty when reused)


def cache_key(model_dir: Path, prompts: PromptSet, cfg: TrainConfig, max_length: int,
              chat_template: bool) -> str:
    """Everything that determines the cache (not loss weights, lr or schedule).

    Key versions: 1 hashed the same fields for caches without the base's English
    log-probabilities (store format 1); 2 (today) for store format 2. The ``dtype`` field is
    present only when it is not fp32, so fp32 keys kept the shape of the first version;
    ``replies`` (the English reply length) only when the cache holds the base's replies.
    """
    ck = Checkpoint.open(model_dir)
    return canonical_hash({
        "config": ck.config(), "weights": {n: ck.index[n] for n in sorted(ck.index)},
        "weights_meta": [str(s.stat().st_size) + s.name for s in ck.shards],
        "rows": list(prompts.rows), "languages": list(prompts.languages), "top_k": cfg.top_k,
        "max_length": max_length, "chat_template": chat_template, "version": 2,
        # the frozen pass runs in the training dtype; fp32 keys are those of earlier versions
        **({"dtype": cfg.dtype} if cfg.dtype != "fp32" else {}),
        **({"replies": reply_tokens(cfg)} if reply_tokens(cfg) else {}),
    })


def reply_tokens(cfg: TrainConfig) -> int:
    """The English reply length the cache holds: ``cfg.reply_tokens`` when the reply KL is on."""
    return cfg.reply_tokens if cfg.lambda_kl_replies else 0


def cache_path_for(work_dir: str | Path, model_dir: Path, prompts: PromptSet, cfg: TrainConfig,
                   max_length: int, chat_template: bool) -> Path:
    """Where the cache of these prompts and settings lives under ``work_dir``."""
    key = cache_key(model_dir, prompts, cfg, max_length, chat_template)
    return Path(work_dir) / "cache" / key[:16]


def train(
    model_dir: str | Path,
    subspace: Subspace,
    prompts: PromptSet,
    cfg: TrainConfig,
    work_dir: str | Path,
    max_length: int = 128,
    chat_template: bool = True,
    base_ref: str | None = None,
    cpu: bool | None = None,
    progress: Progress = NULL,
) -> TrainResult:
    """Train the top K blocks with the Lens losses and return the delta.

    Args:
        model_dir: the base model directory (already resolved).
        subspace: probe output; its last layer is used.
        prompts: parallel training prompts, languages in the subspace's order.
        cfg: training hyperparameters and loss weights.
        work_dir: holds the cache (the folder ``cache/<key16>/``, see
            ``lens_merge.lens.train.store``) and ``train_log.jsonl``.
        max_length, chat_template: prompt encoding.
        base_ref: how the user named the base (``default`` or a path), for provenance.
        cpu: force CPU (default: accelerate decides; ``accelerate launch --cpu`` works).
        progress: progress reporter (loss terms are shown beside the bar).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from transformers import get_cosine_schedule_with_warmup

    from lens_merge.lens.train.protect import project_
    from lens_merge.lens.train.protect import summary as protection_summary
    from lens_merge.lens.train.stack import load_head, load_top_stack
    from lens_merge.lens.train.store import DiskCache, is_complete
    from lens_merge.models import load_tokenizer
    from lens_merge.weights.blocks import read_tensors, trim_heap

    model_dir, work_dir = Path(model_dir), Path(work_dir)
    if list(prompts.languages) != list(subspace.languages):
        raise DataError(f"training languages {list(prompts.languages)} differ from the probed "
                        f"languages {subspace.languages}")
    acc = Accelerator(cpu=bool(cpu),
                      mixed_precision="bf16" if cfg.dtype == "bf16" else "no",
                      gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed)

    cache_path = cache_path_for(work_dir, model_dir, prompts, cfg, max_length, chat_template)
    reused = is_complete(cache_path)
    built: list[int] = []
    if not reused:  # each process streams only the rows its share of epoch 0 visits
        built = _epoch_share(len(prompts), cfg.batch_size, cfg.seed, acc.num_processes,
                             acc.process_index)
        _build_shards(acc, cache_path, built, lambda rows: build_cache(
            model_dir, load_tokenizer(model_dir), prompts, cfg.top_k, max_length,
            cfg.cache_batch_size, chat_template, cfg.dtype, str(acc.device),
            progress if acc.is_main_process else NULL,
            rows=None if acc.num_processes == 1 else rows, reply_tokens=reply_tokens(cfg)))
    cache = DiskCache(cache_path)  # read per batch from the mapped shards

    # only the top K blocks, the final norm and the rotary embedding: fp32 master weights
    stack, model = load_top_stack(model_dir, cfg.top_k, "fp32", "cpu")
    arch = for_config(model.config.to_dict())
    first = model.config.num_hidden_layers - cfg.top_k
    names = [n for n, p in model.named_parameters()
             if (b := arch.block_of(n)) is not None and b >= first
             and not (cfg.freeze_norms and p.ndim == 1)]
    if cfg.freeze_norms:  # norms and biases keep the base's values: the delta is all-linear
        for p in stack.parameters():
            if p.ndim == 1:
                p.requires_grad_(False)
    ck = Checkpoint.open(model_dir)
    base_hashes = {n: hash_entry(ck.entry(n)) for n in names}

    sub = subspace.layer(-1)
    deltas = torch.stack([subspace.delta_of(lang) for lang in prompts.languages[1:]]).float()
    weights = LossWeights(cfg.lambda_retain, cfg.lambda_separate, cfg.lambda_align,
                          cfg.separate_scale, cfg.lambda_retain_last, cfg.lambda_kl,
                          cfg.lambda_kl_tokens, cfg.align_anchor, cfg.lambda_kl_replies)
    # the frozen head (tied: the embedding matrix), in the training dtype, only for the KL
    head = (load_head(model_dir, cfg.dtype, acc.device)
            if cfg.lambda_kl or cfg.lambda_kl_tokens or cfg.lambda_kl_replies else None)
    # the base's top K blocks, frozen, for the per-token English KL reference
    reference = (_frozen_copy(stack, acc.device)
                 if cfg.lambda_kl_tokens or cfg.lambda_kl_replies or cfg.protect_english
                 else None)
    protection = _english_protection(cfg, stack, reference, cache, len(prompts.languages),
                                     acc.device)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(list(range(len(cache))), batch_size=cfg.batch_size,
                                         shuffle=True, generator=g, collate_fn=cache.collate)
    params = [p for p in stack.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stack, opt, loader = acc.prepare(stack, opt, loader)
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total_steps),
                                            total_steps)
    L = len(prompts.languages)
    log_path = work_dir / LOG_NAME
    logf = open(log_path, "w") if acc.is_main_process else None
    step, acc_terms, last, step_rows = 0, {}, {}, []
    try:
        with (progress if acc.is_main_process else NULL).task("train (top blocks)",
                                                              total=total_steps) as task:
            for epoch in range(cfg.epochs):
                for batch in loader:
                    with acc.accumulate(stack):
                        terms = _step_losses(stack, batch, L, sub, deltas, weights,
                                             acc.device, head, reference)
                        acc.backward(terms["loss"])
                        if acc.sync_gradients and cfg.max_grad_norm:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        if protection and acc.sync_gradients:
                            project_(params, *protection)
                    for k, v in terms.items():
                        acc_terms.setdefault(k, []).append(v.detach())
                    step_rows += batch["index"].tolist()
                    if acc.sync_gradients:
                        sched.step()
                        step += 1
                        trim_heap()  # activations of the step: freed memory back to the system
                        last = {k: float(acc.reduce(torch.stack(v).mean(), "mean"))
                                for k, v in acc_terms.items()}
                        acc_terms = {}
                        # the cache rows each process read in this step: [[rank 0], [rank 1]...]
                        rows_read = gather_object([step_rows])
                        step_rows = []
                        rec = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                               **last, "cache_rows": rows_read}
                        if logf:
                            logf.write(json.dumps(rec) + "\n")
                            logf.flush()
                        task.advance(1, **{k: last[k] for k in SHOWN if k in last})
    finally:
        if logf:
            logf.close()
    acc.wait_for_everyone()
    trained = {n: t.detach().float().cpu() for n, t in _named(model, names).items()}
    delta = None
    if acc.is_main_process:
        meta = {
            "base": {"ref": base_ref or str(model_dir), "path": str(model_dir),
                     "model_type": model.config.model_type, "architecture": arch.name,
                     "num_hidden_layers": model.config.num_hidden_layers,
                     "config_sha256": canonical_hash(Checkpoint.open(model_dir).config())},
            "languages": list(prompts.languages), "top_k": cfg.top_k,
            "blocks": list(range(first, model.config.num_hidden_layers)),
            "loss_weights": {"retain": cfg.lambda_retain, "separate": cfg.lambda_separate,
                             "align": cfg.lambda_align, "separate_scale": cfg.separate_scale,
                             "retain_last": cfg.lambda_retain_last, "kl": cfg.lambda_kl,
                             "kl_tokens": cfg.lambda_kl_tokens,
                             "kl_replies": cfg.lambda_kl_replies,
                             "align_anchor": cfg.align_anchor},
            "hyperparameters": cfg.model_dump() | {"max_length": max_length,
                                                   "chat_template": chat_template,
                                                   "optimizer_steps": step,
                                                   "num_processes": acc.num_processes},
            "final_losses": last,
            **({"english_protection": protection_summary(protection[1])} if protection else {}),
            "subspace_sha256": subspace.sha256,
            "data": {"source": prompts.source, "rows": len(prompts)},
        }
        # the base values are read back from the shards (fp32, as the stack was loaded)
        # instead of kept beside the trained copy through training
        base_state = read_tensors(model_dir, names, torch.float32)
        delta = LensDelta.from_weights(base_state, trained, base_hashes, meta)
    return TrainResult(delta, log_path, last, cache_path, reused, step, built)


def _epoch_share(n: int, batch_size: int, seed: int, num_processes: int,
                 rank: int) -> list[int]:
    """The rows process ``rank`` visits in the first epoch, in order of first visit.

    The trainer's loader (``shuffle`` with a generator seeded ``seed``) prepared by
    accelerate gives process r the batches r, r+P, r+2P... of the shuffled order, looping
    back to the start to even the last ones (``BatchSamplerShard``); this replays that.
    """
    import torch
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, DataLoader

    if num_processes == 1:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    order = [i for b in DataLoader(list(range(n)), batch_size=batch_size, shuffle=True,
                                   generator=g, collate_fn=list) for i in b]
    shard = BatchSamplerShard(BatchSampler(order, batch_size, False), num_processes, rank,
                              split_batches=False, even_batches=True)
    return list(dict.fromkeys(i for b in shard for i in b))


def _build_shards(acc, folder: Path, rows: list[int], build) -> None:
    """Build the cache folder with every process writing the shard of its own ``rows``.

    Process 0 makes a temporary sibling and, once every shard is in it, writes the meta and
    renames it into place; an interrupted build never looks complete.
    """
    import shutil

    from accelerate.utils import broadcast_object_list, gather_object

    from lens_merge.files import ordinary_permissions, replace_dir, temp_sibling
    from lens_merge.lens.train.store import Shard, shard_name, write_meta, write_shard

    P, r = acc.num_processes, acc.process_index
    tmp = [None]
    if acc.is_main_process:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = [str(temp_sibling(folder))]
        Path(tmp[0]).mkdir()
    tmp = Path(broadcast_object_list(tmp)[0])
    try:
        cache = build(rows)
        write_shard(cache, tmp / shard_name(r, P))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shards = gather_object([Shard(file=shard_name(r, P), rows=rows, rank=r).model_dump()])
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_meta(tmp, cache, int(cache.meta["n_rows"]), [Shard(**s) for s in shards])
        ordinary_permissions(tmp)
        replace_dir(tmp, folder, overwrite=True)
    acc.wait_for_everyone()


def _named(model, names: list[str]) -> dict[str, Any]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}


def _frozen_copy(stack, device):
    """A frozen copy of the stack with the base's weights (before any step)."""
    import copy

    ref = copy.deepcopy(stack).to(device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _english_protection(cfg: TrainConfig, stack, reference, cache, languages: int, device):
    """``(base weights by id, projectors by id)`` when ``cfg.protect_english``, else None:
    the projectors from the English rows of the whole cache, run through the frozen base."""
    if not cfg.protect_english:
        return None
    from lens_merge.lens.train.protect import english_projectors

    n, bs = len(cache), cfg.batch_size
    batches = (cache.collate(list(range(i, min(i + bs, n)))) for i in range(0, n, bs))
    projectors = english_projectors(reference, stack, batches, languages,
                                    cfg.protect_english, device)
    ref = dict(reference.named_parameters())
    base = {id(p): ref[name] for name, p in stack.named_parameters() if id(p) in projectors}
    return base, projectors


def _step_losses(stack, batch, L: int, sub, deltas, weights: LossWeights, device,
                 head=None, reference=None):
    """Every loss term of one batch (``lens_losses``); ``head`` (a ``FrozenHead``) gives the
    KL term, which is absent without it; ``reference`` (the frozen base stack) with ``head``
    gives the per-token English KL, and the reply KL when the batch holds replies.

    Each language's rows run at their own length (the columns that are padding in every row
    of the language are dropped: a batch pads to its longest language, Bengali's 96 tokens
    against English's 51 on the default data)."""
    import torch

    x = batch["x"].to(device)
    mask = batch["mask"].to(device)
    ref_last = batch["ref_last"].to(device)
    B = ref_last.shape[0]
    parts = [own_columns(x[i * B:(i + 1) * B], mask[i * B:(i + 1) * B]) for i in range(L)]
    outs = [stack(xi, mi) for xi, mi in parts]  # [B, T_l, d] per language
    z = torch.stack([h[:, -1, :] for h in outs])  # [L, B, d]
    (x_en, mask_en), h_en = parts[0], outs[0]
    kl = {}
    if head is not None:
        kl = {"logp_en": head.log_probs(z[0]),
              "ref_logp_en": batch["ref_logp_en"].to(device)}
        if reference is not None:
            with torch.no_grad():
                kl["ref_logp_tokens"] = head.log_probs(reference(x_en, mask_en))
            kl["logp_tokens"] = head.log_probs(h_en)
        if reference is not None and "x_reply" in batch:
            kl |= _reply_log_probs(stack, reference, head, batch, device)
    return lens_losses(
        h_en, mask_en, z[0], z[1:].transpose(0, 1), batch["ref_mean_en"].to(device),
        ref_last[:, 1:], deltas.to(device), sub, weights, ref_z_en=ref_last[:, 0], **kl)


def _reply_log_probs(stack, reference, head, batch, device) -> dict:
    """Trained and base next-token log-probabilities [n, V] at the positions that produced
    the base's English replies (only those go through the head)."""
    import torch

    from lens_merge.lens.train.replies import reply_positions

    xr, mr = batch["x_reply"].to(device), batch["mask_reply"].to(device)
    at = reply_positions(batch["mask_reply"], batch["reply_len"]).to(device)
    with torch.no_grad():
        ref = head.log_probs(reference(xr, mr)[at])
    return {"logp_replies": head.log_probs(stack(xr, mr)[at]), "ref_logp_replies": ref}
