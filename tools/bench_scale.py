"""Benchmark: peak RSS and wall time of the Lens stages as the model grows, beside the plan.

Builds random llama-architecture checkpoints of one width (hidden 2048, intermediate 5632,
16 heads, 8 KV heads, vocab 49152, tied embeddings, bf16 safetensors shards of about 1 GB,
written tensor by tensor so building a 2B model needs about one shard of RAM) with the
default model's tokenizer (or ``lens_merge.testing.build_tiny_tokenizer`` when the default
model is not installed), and runs, each in its own subprocess (``lens-merge run --only
STAGE``, so the peak RSS is that child's own):

- ``probe+cache``: the probe stage, which builds the training cache in the same pass;
- ``train``: top_k 2, two languages (en, zh), a dozen rows, on the cache;
- ``eval``: base vs Lens on 4 held-out rows, 8 new tokens;
- ``fold``: the delta into a standalone checkpoint.

Prints one table: measured peak RSS and wall time, the plan's predicted peak
(``lens_merge.plan``), measured/planned, and RSS ratios vs the smallest model.

Usage: OMP_NUM_THREADS=1 python tools/bench_scale.py --layers 8 18 36 [--json out.json]
       [--workdir /tmp/lens-bench-scale] [--threads 1] [--stages probe train eval fold]
       [--tiny] [--recipe recipes/default.yaml]
``--tiny`` adds the same recipe on the tiny random llama3 of ``lens_merge.testing``;
``--recipe`` measures a recipe's own stages (into the work dir) against its plan.
Checkpoints are kept in the work dir (default /tmp/lens-bench-scale) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

WIDTH = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
         "num_key_value_heads": 8, "vocab_size": 49152}
SHARD_BYTES = 1 << 30
STAGES = ("probe", "train", "eval", "fold")
ROW_OF = {"probe": "probe+cache", "train": "train", "eval": "eval", "fold": "fold"}


def config_for(layers: int) -> dict:
    """A Llama config.json of the benchmark's width and ``layers`` blocks (bf16, tied)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **WIDTH,
            "num_hidden_layers": layers, "head_dim": 128, "max_position_embeddings": 2048,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "initializer_range": 0.02, "use_cache": True}


def _tensors(cfg: dict):
    """(name, shape, is_norm) of every tensor of a tied llama checkpoint, in file order."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, d), False
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,), True
        yield p + "self_attn.q_proj.weight", (q, d), False
        yield p + "self_attn.k_proj.weight", (kv, d), False
        yield p + "self_attn.v_proj.weight", (kv, d), False
        yield p + "self_attn.o_proj.weight", (d, q), False
        yield p + "post_attention_layernorm.weight", (d,), True
        yield p + "mlp.gate_proj.weight", (f, d), False
        yield p + "mlp.up_proj.weight", (f, d), False
        yield p + "mlp.down_proj.weight", (d, f), False
    yield "model.norm.weight", (d,), True


def _tokenizer_dir(work: Path) -> Path:
    """The default model's tokenizer files (vocab 49152), else the tiny test tokenizer."""
    from lens_merge.testing import TOKENIZER_FILES, build_tiny_tokenizer

    out = work / "tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    try:
        from lens_merge.models import resolve_model

        src = resolve_model("default")
        out.mkdir(parents=True, exist_ok=True)
        for name in (*TOKENIZER_FILES, "vocab.json", "merges.txt", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
    except Exception as exc:  # noqa: BLE001 - no default model: the tiny tokenizer fits too
        print(f"default tokenizer unavailable ({exc}); building the tiny one", file=sys.stderr)
        build_tiny_tokenizer(out)
    return out


def build_checkpoint(layers: int, work: Path, seed: int = 0) -> Path:
    """Write a random bf16 checkpoint of ``layers`` blocks under ``work`` (reused if there)."""
    import torch
    from safetensors.torch import save_file

    out = work / f"llama-{layers}L"
    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = work / f".building-{layers}L"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = config_for(layers)
    g = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape, norm in _tensors(cfg):
        if norm:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g).mul_(cfg["initializer_range"])
        current[name] = t.to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            save_file(current, str(tmp / f"part-{len(shards)}"), metadata={"format": "pt"})
            current, size = {}, 0
    if current:
        shards.append(current)
        save_file(current, str(tmp / f"part-{len(shards)}"), metadata={"format": "pt"})
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        (tmp / f"part-{i}").rename(tmp / fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * 2
    shards.clear()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = _tokenizer_dir(work)
    for f in tok.iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def recipe_for(model: Path, out: Path) -> dict:
    """The benchmark recipe: top 2, en+zh, a dozen rows, no exports."""
    return {"name": "bench", "base": str(model), "languages": ["en", "zh"],
            "output_dir": str(out),
            "data": {"max_length": 64, "max_train_samples": 12, "max_probe_samples": 12,
                     "max_eval_samples": 4},
            "train": {"top_k": 2, "epochs": 1, "batch_size": 4, "grad_accum": 1,
                      "lr": 1e-4, "dtype": "fp32"},
            "eval": {"max_new_tokens": 8, "batch_size": 8},
            "fold": {"verify": False}, "export": {"gguf": None, "onnx": None},
            "plan": {"check": False}}


def measure(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, int]:
    """(peak RSS bytes of that child alone, wall seconds, exit status) of one command; its
    output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        p = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    p.returncode = rc
    if rc:
        print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, wall, rc


def planned(recipe_path: Path) -> dict[str, int]:
    """The plan's peak per row for a recipe (CPU, this machine's RAM)."""
    from lens_merge.config import load_recipe
    from lens_merge.plan import plan_recipe

    return {s.name: s.device_peak for s in plan_recipe(load_recipe(recipe_path)).stages}


def measure_recipe(recipe: Path, label: str, out: Path, stages: list[str],
                   env: dict[str, str]) -> list[dict]:
    """Run each stage of a recipe in its own process (``run --only``) into ``out``."""
    from lens_merge.config import load_recipe
    from lens_merge.plan import plan_recipe

    plan = plan_recipe(load_recipe(recipe))
    peaks = {s.name: s.device_peak for s in plan.stages}
    rows = []
    for stage in stages:
        cmd = [sys.executable, "-m", "lens_merge.cli", "run", str(recipe), "--only", stage,
               "--no-push", "--output-dir", str(out / "release")]
        rss, wall, rc = measure(cmd, env, out / f"{stage}.log")
        rows.append({"model": label, "params": plan.shape.params, "stage": stage, "rss": rss,
                     "seconds": wall, "rc": rc,
                     "planned": peaks.get(ROW_OF[stage]) or peaks.get(stage)})
        print(f"{label:>10} {stage:<6} rss {rss / 2**30:6.2f} GiB  {wall:7.1f} s  "
              f"plan {(rows[-1]['planned'] or 0) / 2**30:6.2f} GiB  rc {rc}", flush=True)
        if rc:
            break
    return rows


def _fresh(out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def _build_in_child(layers: int, work: Path) -> Path:
    """``build_checkpoint`` in a spawned process: Linux carries a parent's peak RSS into every
    child it forks (``ru_maxrss`` survives exec), so the parent must never hold a big model."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=build_checkpoint, args=(layers, work))
    proc.start()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"building the {layers}-layer checkpoint failed (exit {proc.exitcode})")
    return work / f"llama-{layers}L"


def run_model(layers: int, work: Path, stages: list[str], env: dict[str, str]) -> list[dict]:
    """Build (or reuse) one benchmark checkpoint and measure each stage."""
    import yaml

    model = _build_in_child(layers, work)
    out = _fresh(work / f"run-{layers}L")
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(model, out / "release")))
    return measure_recipe(recipe, f"{layers}L", out, stages, env)


def run_tiny(work: Path, stages: list[str], env: dict[str, str]) -> list[dict]:
    """The same recipe on ``lens_merge.testing``'s tiny llama3 (fp32, vocab 2048)."""
    import yaml

    from lens_merge.testing import TINY_CONFIGS, build_random_model, build_tiny_tokenizer

    model = work / "tiny-llama3"
    if not (model / "config.json").is_file():
        tok = build_tiny_tokenizer(work / "tiny-tokenizer")
        build_random_model(TINY_CONFIGS["llama3"], model, tokenizer_from=tok)
    out = _fresh(work / "run-tiny")
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(model, out / "release")))
    return measure_recipe(recipe, "tiny", out, stages, env)


def table(rows: list[dict]) -> str:
    """Markdown table: measured vs planned, ratios vs the smallest model per stage."""
    first = {}
    for r in sorted(rows, key=lambda r: r["params"]):
        first.setdefault(r["stage"], r)
    lines = ["| model | stage | peak RSS | planned | measured/planned | wall s | "
             "RSS vs smallest | wall vs smallest |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = first[r["stage"]]
        plan = r["planned"] or 0
        lines.append(f"| {r['model']} | {r['stage']} | {r['rss'] / 2**30:.2f} GiB | "
                     f"{plan / 2**30:.2f} GiB | {r['rss'] / plan if plan else float('nan'):.2f} "
                     f"| {r['seconds']:.1f} | {r['rss'] / f['rss']:.2f} | "
                     f"{r['seconds'] / f['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[8, 18, 36])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lens-bench-scale"))
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each child")
    ap.add_argument("--tiny", action="store_true", help="also the tiny random llama3")
    ap.add_argument("--recipe", type=Path, action="append", default=[],
                    help="also measure this recipe's stages (its own settings; repeatable)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = []
    if args.tiny:
        rows += run_tiny(args.workdir, args.stages, env)
    for layers in sorted(args.layers):
        rows += run_model(layers, args.workdir, args.stages, env)
    for recipe in args.recipe:
        out = _fresh(args.workdir / f"recipe-{recipe.stem}")
        rows += measure_recipe(recipe.resolve(), recipe.stem, out, args.stages, env)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
