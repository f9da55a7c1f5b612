"""Score the base and the Lens model with lm-evaluation-harness (``lm_eval``, extra ``bench``).

One model is loaded; the base is scored, the delta is added to its weights in memory
(``lens_merge.weights.delta.apply_delta``: fp32 compute, cast back, nothing written to disk)
and the same tasks are scored again. Both runs go through ``lm_eval.simple_evaluate`` with an
``HFLM`` wrapping the loaded model, so any lm-eval task name works, and local YAML tasks are
found through ``include_path`` (``TaskManager(include_path=...)``).

Real multilingual tasks read their datasets from the Hub, so they need network and are meant
for a GPU machine (``HF_HUB_OFFLINE`` unset)::

    lens-merge bench default --delta out/SmolLM2-135M-Instruct-Lens/delta \\
        --tasks belebele_zho_Hans,belebele_jpn_Jpan,belebele_kor_Hang,belebele_arb_Arab,\\
    belebele_ben_Beng,belebele_swh_Latn,xcopa_zh,xcopa_sw,xstorycloze_zh,xstorycloze_ar,\\
    xstorycloze_sw,xwinograd_zh,belebele_eng_Latn,xstorycloze_en \\
        --device cuda --dtype bf16 --batch-size 32 --out out/bench.json

(``--limit 200`` for a quick pass; the Lens paper scores XCOPA, XStoryCloze, XWinograd and
M-MMLU zero-shot; ``global_mmlu_{lang}`` and ``mgsm_direct_{lang}`` work the same way, MGSM is
a generation task and much slower.)
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.bench.record import BenchReport, BenchScore, BenchTask
from lens_merge.errors import ConfigError
from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    from lens_merge.weights.delta import LensDelta

BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics only; acc/acc_norm stderr is analytic
_NOT_METRICS = {"alias", "name", "sample_len", "samples", " ", ""}


def lm_eval_version() -> str | None:
    """The installed lm-eval version, or None when the ``bench`` extra is not installed."""
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def _require_lm_eval() -> str:
    version = lm_eval_version()
    if version is None:
        raise ConfigError("bench needs lm-evaluation-harness: pip install 'lens-merge[bench]'")
    return version


def task_list(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> unique task names in order.

    Raises:
        ConfigError: when no task is named.
    """
    raw = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for item in raw for t in str(item).split(",") if t.strip()]
    if not names:
        raise ConfigError("bench: no task named (give lm-eval task names, e.g. "
                          "belebele_zho_Hans,xcopa_zh)")
    return list(dict.fromkeys(names))


def task_manager(names: list[str], include_path: str | Path | None = None):
    """An ``lm_eval`` ``TaskManager`` that knows every name (local YAML tasks first).

    When ``include_path`` defines every task, lm-eval's own ~15k task configs are not indexed
    (10 s saved).

    Raises:
        ConfigError: the include path is not a directory, or a task name is unknown (close
            names suggested).
    """
    from lm_eval.tasks import TaskManager

    inc = None
    if include_path is not None:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"bench include_path {p}: not a directory (expected a folder of "
                              "lm-eval task YAML files)")
        inc = str(p.resolve())
        tm = TaskManager(include_path=inc, include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    tm = TaskManager(include_path=inc)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, tm.all_tasks, n=3, cutoff=0.6)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" or in {inc}" if inc else ""
        raise ConfigError(f"bench: unknown lm-eval task(s) {'; '.join(hints)}: not among "
                          f"lm-eval's {len(tm.all_tasks)} tasks{where}")
    return tm


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def metrics_of(row: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """lm-eval's result row (``"acc,none": v, "acc_stderr,none": s``) -> ``{metric: (v, s)}``."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for key, value in row.items():
        name, _, filt = key.partition(",")
        if not filt or name in _NOT_METRICS or name.endswith("_stderr"):
            continue
        metric = name if filt == "none" else f"{name},{filt}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue  # lm-eval writes "N/A" where it has no number
        out[metric] = (_number(value), _number(row.get(f"{name}_stderr,{filt}")))
    return out


def _task_info(res: dict[str, Any], name: str) -> dict[str, Any]:
    cfg = (res.get("configs") or {}).get(name) or {}
    n = (res.get("n-samples") or {}).get(name) or {}
    return {"num_fewshot": (res.get("n-shot") or {}).get(name), "samples": n.get("effective"),
            "output_type": cfg.get("output_type"), "dataset_path": cfg.get("dataset_path"),
            "dataset_name": cfg.get("dataset_name"),
            "split": cfg.get("test_split") or cfg.get("validation_split"),
            "config_source": (cfg.get("metadata") or {}).get("config_source")}


def merge_results(base: dict[str, Any], lens: dict[str, Any] | None) -> dict[str, BenchTask]:
    """Two ``simple_evaluate`` results -> ``{task: BenchTask}`` (``lens`` may be None)."""
    tasks: dict[str, BenchTask] = {}
    for name, row in (base.get("results") or {}).items():
        lens_row = metrics_of(((lens or {}).get("results") or {}).get(name) or {})
        better = (base.get("higher_is_better") or {}).get(name) or {}
        scores = {}
        for metric, (value, err) in metrics_of(row).items():
            lv, ls = lens_row.get(metric, (None, None))
            hib = better.get(metric.partition(",")[0])
            scores[metric] = BenchScore(base=value, lens=lv, stderr={"base": err, "lens": ls},
                                        higher_is_better=hib if isinstance(hib, bool) else None)
        tasks[name] = BenchTask(metrics=scores, **_task_info(base, name))
    return tasks


def _evaluate(net, tok, names: list[str], tm, *, limit, num_fewshot, batch_size,
              device: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=net, tokenizer=tok, batch_size=batch_size, device=device)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=False,
                                  bootstrap_iters=BOOTSTRAP_ITERS)
    if res is None:  # only on non-zero ranks of a distributed run
        raise ConfigError("bench: lm-eval returned no results (run it in a single process)")
    return res


def run_bench(
    model: str | Path,
    delta: str | Path | LensDelta | None = None,
    tasks: str | Sequence[str] = (),
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    dtype: str | None = "fp32",
    out: str | Path | None = None,
    progress: Progress = NULL,
) -> BenchReport:
    """Score the base and (with a delta) the Lens model on lm-eval tasks.

    Args:
        model: ``default`` or a local Hugging Face directory (``models.resolve_model``).
        delta: the Lens delta (folder or object); None scores the base alone.
        tasks: lm-eval task or group names (``"a,b"`` or a list).
        include_path: a folder of local task YAML files (``TaskManager(include_path=...)``).
        limit: documents per task (an int), or a fraction of each task (< 1.0).
        num_fewshot: few-shot examples; None keeps each task's own setting.
        batch_size: lm-eval batch size (an int, or ``auto``).
        device: torch device.
        dtype: ``fp32``/``bf16``/``fp16``, or None for the checkpoint's.
        out: write the report there as JSON (``bench.json``) when given.
        progress: progress reporter (one step per model scored).

    Returns:
        The ``BenchReport`` (``.model_dump()`` is the JSON written to ``out``).

    Raises:
        ConfigError: no task, an unknown task, a bad include path or limit, or lm-eval is
            not installed.
        ModelError: the model reference is not usable.
        DeltaError: the delta was made for another checkpoint (tensor hashes differ).
    """
    from lens_merge.files import file_sha256, write_json_atomic
    from lens_merge.models import load_model, load_tokenizer, resolve_model
    from lens_merge.provenance import stamp, tool_info
    from lens_merge.weights._source import check_inputs, open_source, resolve_delta
    from lens_merge.weights.delta import DELTA_WEIGHTS, apply_delta

    names = task_list(tasks)
    version = _require_lm_eval()
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"bench limit {limit!r}: expected a positive count or a fraction")
    model_dir = resolve_model(model, progress=True)
    d = resolve_delta(delta) if delta is not None else None
    if d is not None:
        check_inputs(open_source(model_dir, False), d, {n: d.base_hash(n) for n in d.tensors})
    tm = task_manager(names, include_path)
    tok = load_tokenizer(model_dir)
    net = load_model(model_dir, dtype=dtype, device=device)
    kw = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "device": device}
    seconds: dict[str, float] = {}
    with progress.task("bench", total=2 if d is not None else 1) as task:
        t0 = time.perf_counter()
        base_res = _evaluate(net, tok, names, tm, **kw)
        seconds["base"] = round(time.perf_counter() - t0, 2)
        task.advance()
        lens_res = None
        if d is not None:
            t0 = time.perf_counter()
            apply_delta(net, d)
            lens_res = _evaluate(net, tok, names, tm, **kw)
            seconds["lens"] = round(time.perf_counter() - t0, 2)
            task.advance()
    del net
    weights = d.path / DELTA_WEIGHTS if d is not None and d.path is not None else None
    report = BenchReport(
        model=str(model), model_dir=str(model_dir),
        delta=str(d.path) if d is not None and d.path is not None else None,
        delta_sha256=file_sha256(weights) if weights is not None and weights.is_file() else None,
        tasks=merge_results(base_res, lens_res), requested=names,
        include_path=str(include_path) if include_path is not None else None,
        limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, device=device,
        dtype=dtype, seconds=seconds, lm_eval_version=version,
        tool=tool_info(), created=stamp().get("created"))
    if out is not None:
        write_json_atomic(out, report)
    return report
