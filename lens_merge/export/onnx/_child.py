"""The exporter's heavy steps, each in a fresh Python process.

An exporter holds the model and the graph's weights (optimum's TorchScript path: the ONNX
protobuf and its serialized bytes too), and the process keeps much of it after it returns;
the int8 quantizer loads the whole graph. Run in children (export, then quantize), each gives
its memory back to the system when it exits: neither meets the other's copy, and the
verification that follows starts from a bare process. The child's own peak RSS is passed
to ``lens_merge.memory.note_child_peak``: a stage's reported peak includes it.

``run_in_child(job, **kwargs)`` runs one of ``JOBS`` (JSON in, JSON out) and returns its
result; ``python -m lens_merge.export.onnx._child REQUEST RESULT`` is the child's side.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lens_merge.errors import ExportError

# job name -> "module:function"; the function takes and returns JSON-able values
JOBS = {"export_graph": "lens_merge.export.onnx.export:export_graph",
        "quantize_graph": "lens_merge.export.onnx.export:quantize_graph"}


def run_in_child(job: str, **kwargs: Any) -> tuple[Any, int]:
    """Run ``JOBS[job](**kwargs)`` in a fresh Python process.

    Args:
        job: a name of ``JOBS``.
        **kwargs: JSON-able arguments of the job.

    Returns:
        (the job's JSON-able result, the child's peak RSS in bytes; 0 when unknown).

    Raises:
        ExportError: an unknown job, the job's own ExportError, or a child that died (its
            exit status and the end of its stderr named).
    """
    from lens_merge.memory import note_child_peak

    if job not in JOBS:
        raise ExportError(f"unknown child job {job!r}; jobs: {', '.join(sorted(JOBS))}")
    pkg_root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="lens-merge-child-") as d:
        req, res = Path(d) / "request.json", Path(d) / "result.json"
        req.write_text(json.dumps({"job": job, "kwargs": kwargs}), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", __name__, str(req), str(res)], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False)
        out = json.loads(res.read_text(encoding="utf-8")) if res.is_file() else {}
    if out.get("peak_rss"):
        note_child_peak(out["peak_rss"])
    if "error" in out:
        raise ExportError(out["error"])
    if proc.returncode != 0 or "result" not in out:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])[-800:]
        raise ExportError(f"the {job} process exited with status {proc.returncode} and no "
                          f"result (killed for memory?): {tail or 'no output'}")
    return out["result"], int(out.get("peak_rss") or 0)


def _main(argv: list[str]) -> int:
    """The child: read the request, run the job, write its result (or error) and peak."""
    from lens_merge.memory import own_peak_rss

    req, res = Path(argv[0]), Path(argv[1])
    spec = json.loads(req.read_text(encoding="utf-8"))
    module, name = JOBS[spec["job"]].split(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        out: dict[str, Any] = {"result": fn(**spec["kwargs"])}
    except ExportError as exc:
        out = {"error": str(exc)}
    out["peak_rss"] = own_peak_rss()
    res.write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
