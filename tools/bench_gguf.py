"""Benchmark GGUF export: wall time and peak RSS per output type, against the f16 file size.

Each export runs in a fresh Python process so its peak resident set size (ru_maxrss) is its
own; the RSS after imports (before exporting) is reported too, so the export's own share is
visible. Streaming export should need far less memory than the model it writes.

    PYTHONPATH=. python tools/bench_gguf.py --model default --outtypes f16 q8_0 q4_k_m
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(model: str, out: str, outtype: str) -> None:
    """Run one export in this process and print its numbers as JSON."""
    import gguf  # noqa: F401 - imported before the baseline, as export needs them
    import safetensors  # noqa: F401
    import transformers  # noqa: F401

    from lens_merge.export.gguf import export_gguf
    from lens_merge.models import resolve_model

    path = resolve_model(model)
    base = _rss_mib()
    t0 = time.perf_counter()
    rep = export_gguf(path, out, outtype=outtype)
    print(json.dumps({"outtype": outtype, "seconds": time.perf_counter() - t0,
                      "bytes": rep["bytes"], "baseline_rss_mib": base,
                      "peak_rss_mib": _rss_mib(), "n_params": rep["n_params"],
                      "fallbacks": len(rep["fallbacks"]), "tensor_types": rep["tensor_types"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default' or a HF model directory")
    ap.add_argument("--outtypes", nargs="+", default=["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--out-dir", default=None, help="where the GGUFs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "OUT", "OUTTYPE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_gguf-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    outtypes = list(dict.fromkeys(["f16", *args.outtypes]))  # f16 is the reference size
    rows = []
    for t in outtypes:
        out = out_dir / f"bench-{t}.gguf"
        proc = subprocess.run([sys.executable, __file__, "--worker", args.model, str(out), t],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"export {t} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out.unlink()
    f16 = next(r for r in rows if r["outtype"] == "f16")["bytes"] / 2**20
    print(f"model: {args.model}  parameters: {rows[0]['n_params']:,}  f16 file: {f16:.1f} MiB")
    print(f"{'type':8} {'file MiB':>9} {'seconds':>8} {'peak RSS MiB':>13} "
          f"{'after imports':>14} {'export share':>13} {'share / f16':>12}")
    for r in rows:
        share = r["peak_rss_mib"] - r["baseline_rss_mib"]
        r["rss_share_over_f16"] = share / f16
        print(f"{r['outtype']:8} {r['bytes'] / 2**20:9.1f} {r['seconds']:8.2f} "
              f"{r['peak_rss_mib']:13.0f} {r['baseline_rss_mib']:14.0f} {share:13.0f} "
              f"{r['rss_share_over_f16']:12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "f16_mib": f16,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
