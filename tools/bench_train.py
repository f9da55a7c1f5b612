"""Benchmark: the cached Lens trainer vs the reference-style loop (full forward + frozen copy).

Both train the same top K blocks of the same model on the same prompts with the same loss.
Each method runs in its own subprocess (peak RSS is the child's own maximum resident size):

- ``1 epoch``: one training run from scratch (the cached trainer builds its cache first);
- ``sweep``: 4 runs that differ only in loss weights; the cached trainer reuses its cache.

Usage: python tools/bench_train.py [--base default] [--rows 48] [--langs en,zh,ja,ko]
       [--json out.json]
Prints one table of wall times, steps/s, peak RSS and the ratios naive / cached.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = [(1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (2.0, 0.5, 1.0)]


def _common(args):
    from lens_merge.config import TrainConfig
    from lens_merge.data import load_prompts
    from lens_merge.lens.probe import probe
    from lens_merge.models import load_model, load_tokenizer, resolve_model

    langs = args.langs.split(",")
    model_dir = resolve_model(args.base)
    prompts = load_prompts("default", langs, split="train", max_samples=args.rows)
    tok = load_tokenizer(model_dir)
    sub_dir = Path(args.work) / "subspace"
    if not (sub_dir / "subspace.json").is_file():
        model = load_model(model_dir)
        probe(model, tok, {lang: prompts.texts(lang) for lang in langs}).save(sub_dir)
    from lens_merge.lens.probe import Subspace

    cfg = TrainConfig(top_k=2, lr=1e-4, epochs=1, batch_size=args.batch, grad_accum=1,
                      warmup_ratio=0.05)
    return model_dir, prompts, tok, Subspace.load(sub_dir), cfg, langs


def child(args) -> dict:
    import torch

    from lens_merge.lens.train import train
    from lens_merge.lens.train.losses import LossWeights

    # the reference-style step is a test oracle (tests/oracles), importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.oracles.naive_train import naive_losses

    model_dir, prompts, tok, sub, cfg, langs = _common(args)
    times, steps = [], []
    for r in range(args.runs):
        lr_, ls_, la_ = SWEEP[r % len(SWEEP)]
        c = cfg.model_copy(update={"lambda_retain": lr_, "lambda_separate": ls_,
                                   "lambda_align": la_})
        t0 = time.perf_counter()
        if args.child == "cached":
            res = train(model_dir, sub, prompts, c, Path(args.work) / "cached", cpu=True)
            steps.append(res.steps)
        else:
            from transformers import get_cosine_schedule_with_warmup

            from lens_merge.models import load_model

            model = load_model(model_dir)
            ref = copy.deepcopy(model)
            n = model.config.num_hidden_layers
            for name, p in model.named_parameters():
                p.requires_grad_(any(name.startswith(f"model.layers.{b}.")
                                     for b in range(n - c.top_k, n)))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
            total = math.ceil(len(prompts) / c.batch_size)
            sched = get_cosine_schedule_with_warmup(opt, math.ceil(c.warmup_ratio * total), total)
            g = torch.Generator().manual_seed(c.seed)
            order = torch.randperm(len(prompts), generator=g).tolist()
            w = LossWeights(c.lambda_retain, c.lambda_separate, c.lambda_align)
            for i in range(0, len(order), c.batch_size):
                rows = [prompts.rows[j] for j in order[i:i + c.batch_size]]
                loss = naive_losses(model, ref, tok, rows, langs, sub, w, 128)["loss"]
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            steps.append(total)
            del model, ref
        times.append(time.perf_counter() - t0)
    return {"times": times, "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(method: str, runs: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--runs", str(runs), "--work", args.work,
           "--base", args.base, "--rows", str(args.rows), "--langs", args.langs,
           "--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--langs", default="en,zh,ja,ko")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["cached", "naive"])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_train-") as work:
        args.work = work
        _common(args)  # probe once, outside the timings
        res = {}
        for method in ("cached", "naive"):
            one = run_child(method, 1, args)
            # the sweep starts from an empty cache too: remove the one epoch's cache first
            import shutil

            shutil.rmtree(Path(work) / "cached", ignore_errors=True)
            sweep = run_child(method, len(SWEEP), args)
            shutil.rmtree(Path(work) / "cached", ignore_errors=True)
            res[method] = {"epoch_s": one["times"][0], "steps": one["steps"][0],
                           "steps_per_s": one["steps"][0] / one["times"][0],
                           "epoch_rss_mb": one["peak_rss_mb"], "sweep_s": sum(sweep["times"]),
                           "sweep_runs_s": sweep["times"], "sweep_rss_mb": sweep["peak_rss_mb"]}
    c, n = res["cached"], res["naive"]
    ratios = {"epoch_time_naive_over_cached": n["epoch_s"] / c["epoch_s"],
              "sweep_time_naive_over_cached": n["sweep_s"] / c["sweep_s"],
              "epoch_rss_naive_over_cached": n["epoch_rss_mb"] / c["epoch_rss_mb"]}
    print(f"bench_train: base={args.base} rows={args.rows} langs={args.langs} "
          f"batch={args.batch} (1 epoch = {c['steps']} optimizer steps)")
    print(f"{'method':8} {'1 epoch s':>10} {'steps/s':>8} {'peak RSS MB':>12} "
          f"{'4-run sweep s':>14} {'sweep RSS MB':>13}")
    for m in ("cached", "naive"):
        r = res[m]
        print(f"{m:8} {r['epoch_s']:10.1f} {r['steps_per_s']:8.3f} {r['epoch_rss_mb']:12.0f} "
              f"{r['sweep_s']:14.1f} {r['sweep_rss_mb']:13.0f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"results": res, "ratios": ratios,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
