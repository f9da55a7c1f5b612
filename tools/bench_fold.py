#!/usr/bin/env python
"""Benchmark ``lens-merge fold`` against ``cp -r`` and a PEFT-style merge.

Builds a random Llama checkpoint of at least 1 GB (fp32, at least 4 shards) from a config, a
random Lens delta on its top blocks, then runs each method in its own subprocess and measures
wall time and peak RSS:

- ``cp``: ``cp -r BASE OUT`` (the floor: a fold must at least copy the checkpoint);
- ``fold``: ``lens_merge.weights.fold.fold`` (streamed, one tensor at a time);
- ``peft``: "load the whole model, add the deltas, save_pretrained" (what PEFT's
  ``merge_and_unload`` + ``save_pretrained`` amounts to);
- ``baseline``: a process that only imports torch, safetensors and lens_merge.weights.fold (the
  interpreter's own RSS, for reference).

Usage: ``python tools/bench_fold.py [--json out.json] [--workdir DIR] [--repeat 2]``.
Everything is written under a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ~277M parameters: 1.11 GB in fp32.
CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 18,
    "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
SHARD_SIZE = "300MB"
TOP_K = 2


def _maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def child(method: str, base: str, delta: str, out: str) -> None:
    """Run one method in this process and print one JSON line with its numbers."""
    sys.path.insert(0, str(ROOT))
    if method == "build":
        from lens_merge.testing import build_random_model, random_delta

        build_random_model(CONFIG, base, dtype="fp32", max_shard_size=SHARD_SIZE)
        random_delta(base, top_k=TOP_K, scale=0.01).save(delta)
        print(json.dumps({"ok": True}))
        return
    if method == "cp":
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", base, out], check=True)
        secs = time.perf_counter() - t0
        print(json.dumps({"seconds": secs, "cpu_seconds": _cpu_s(resource.RUSAGE_CHILDREN),
                          "maxrss_mb": _maxrss_mb(resource.RUSAGE_CHILDREN)}))
        return
    import safetensors  # noqa: F401
    import torch  # noqa: F401

    from lens_merge.weights.fold import fold

    t0, c0 = time.perf_counter(), _cpu_s(resource.RUSAGE_SELF)
    extra = {}
    if method == "fold":
        extra["check_seconds"] = fold(base, delta, out).check_seconds
    elif method == "peft":
        from lens_merge.models import load_model
        from lens_merge.weights.delta import LensDelta, apply_delta

        model = load_model(base, "fp32")
        apply_delta(model, LensDelta.load(delta))
        model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD_SIZE)
    elif method != "baseline":
        raise SystemExit(f"unknown method {method}")
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "cpu_seconds": _cpu_s(resource.RUSAGE_SELF) - c0,
                      "maxrss_mb": _maxrss_mb(resource.RUSAGE_SELF), **extra}))


def _run_child(method: str, base: Path, delta: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(base), str(delta),
                           str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall
    return res


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: tmp)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per method (min time is kept)")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "BASE", "DELTA", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_fold-", dir=args.workdir))
    try:
        base, delta, out = work / "base", work / "delta", work / "out"
        t0 = time.perf_counter()
        _run_child("build", base, delta, out)
        build_s = time.perf_counter() - t0
        shards = sorted(base.glob("*.safetensors"))
        size = sum(s.stat().st_size for s in shards)
        largest = max(s.stat().st_size for s in shards)
        delta_size = _dir_size(delta)
        assert size >= 1e9 and len(shards) >= 4, (size, len(shards))
        for f in base.iterdir():  # warm the page cache once so every method reads from it
            subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)

        results: dict[str, dict] = {}
        for method in ("baseline", "cp", "fold", "peft"):
            runs = []
            for _ in range(args.repeat if method != "baseline" else 1):
                runs.append(_run_child(method, base, delta, out))
                if out.exists():
                    shutil.rmtree(out)
            results[method] = {
                "seconds": min(r["seconds"] for r in runs),
                "cpu_seconds": min(r["cpu_seconds"] for r in runs),
                "process_seconds": min(r["process_seconds"] for r in runs),
                "maxrss_mb": max(r["maxrss_mb"] for r in runs),
                **({"check_seconds": min(r["check_seconds"] for r in runs)}
                   if method == "fold" else {}),
                "runs": runs,
            }
        target_mb = (largest + delta_size) / 2**20 * 1.2
        r = results
        summary = {
            "checkpoint_bytes": size, "shards": len(shards), "largest_shard_bytes": largest,
            "delta_bytes": delta_size, "build_seconds": build_s,
            "fold_over_cp_seconds": r["fold"]["seconds"] / r["cp"]["seconds"],
            "fold_over_cp_process_seconds": (r["fold"]["process_seconds"]
                                             / r["cp"]["process_seconds"]),
            "fold_over_cp_cpu_seconds": r["fold"]["cpu_seconds"] / r["cp"]["cpu_seconds"],
            "fold_over_peft_seconds": r["fold"]["seconds"] / r["peft"]["seconds"],
            "fold_over_peft_rss": r["fold"]["maxrss_mb"] / r["peft"]["maxrss_mb"],
            "rss_target_mb": target_mb,
            "fold_rss_within_target": r["fold"]["maxrss_mb"] <= target_mb,
            "fold_no_slower_than_cp": r["fold"]["seconds"] <= r["cp"]["seconds"],
        }
        report = {"config": CONFIG, "shard_size": SHARD_SIZE, "top_k": TOP_K,
                  "cpus": os.cpu_count(), "load_average": os.getloadavg(), "methods": results,
                  "summary": summary}
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(shards)} shards (largest "
              f"{largest / 2**20:.0f} MiB), delta {delta_size / 2**20:.0f} MiB on the top {TOP_K} "
              f"blocks; built in {build_s:.0f} s")
        print(f"{'method':<10}{'seconds':>10}{'CPU s':>8}{'process s':>11}{'peak RSS MiB':>14}")
        for m in ("baseline", "cp", "fold", "peft"):
            x = r[m]
            print(f"{m:<10}{x['seconds']:>10.2f}{x['cpu_seconds']:>8.2f}"
                  f"{x['process_seconds']:>11.2f}{x['maxrss_mb']:>14.0f}")
        print(f"fold/cp time: {summary['fold_over_cp_seconds']:.2f} (in-process), "
              f"{summary['fold_over_cp_process_seconds']:.2f} (whole process), "
              f"{summary['fold_over_cp_cpu_seconds']:.2f} (CPU seconds); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"fold: {r['fold']['check_seconds']:.2f} s of it checking the base tensors' "
              "sha256 before anything is written")
        print(f"fold/peft time: {summary['fold_over_peft_seconds']:.2f}; "
              f"fold/peft peak RSS: {summary['fold_over_peft_rss']:.2f}")
        print(f"fold peak RSS {r['fold']['maxrss_mb']:.0f} MiB vs target (largest shard + delta "
              f"+ 20%) {target_mb:.0f} MiB: "
              f"{'within' if summary['fold_rss_within_target'] else 'ABOVE'}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
