"""The memory plan of a recipe: peak memory of every stage before any work starts.

``plan_recipe(recipe)`` computes, from the base model's ``config.json`` shapes and the
recipe's data sizes alone (no weights are loaded), each stage's peak memory on the device it
runs on and on the host, the training cache's size on disk, and whether each fits the
machine (``lens_merge.plan.formulas`` documents every formula and which terms are
estimates). ``lens-merge plan RECIPE`` prints it; ``lens-merge run`` calls ``check_plan``
first and refuses to start when a stage does not fit (recipe ``plan.check: false`` skips
the check; ``plan.memory`` / ``plan.host_memory`` state the machine's memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from lens_merge.config import Recipe
from lens_merge.errors import ConfigError, DataError, ModelError
from lens_merge.plan import formulas as F
from lens_merge.plan.machine import device_available, format_size, host_available, parse_size
from lens_merge.plan.shapes import ModelShape, load_shape, shipped_shapes

__all__ = ["MemoryPlan", "ModelShape", "PlanError", "StagePlan", "check_plan", "format_size",
           "load_shape", "parse_size", "plan_recipe", "shipped_shapes", "workload_of"]

# Rows assumed when a data file is absent and the recipe sets no maximum: the paper's
# 200 parallel training instructions and 300 probing texts per language.
ASSUMED_TRAIN_ROWS, ASSUMED_PROBE_ROWS, ASSUMED_EVAL_ROWS = 200, 300, 48


class PlanError(ConfigError):
    """The memory plan says a stage does not fit; ``.plan`` holds the whole plan."""

    def __init__(self, message: str, plan: MemoryPlan) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass
class StagePlan:
    """One row of the plan.

    Attributes:
        name: row label (``probe``, ``cache``, ``train``, ...).
        stage: the pipeline stage that does it (``cache`` runs in ``probe`` or ``train``).
        device: where it runs (the recipe's device, or ``cpu`` for the weight stages).
        device_peak: peak bytes there; host_peak: peak host bytes when the device is not the
            host (else None); cache_disk: the training cache's bytes on disk (else None).
        fits: both peaks fit the memory given or measured (None: unknown memory).
        short: where it does not fit: ``device``, ``host`` or both (empty when it fits).
        device_terms, host_terms: the named terms summed into each peak.
    """

    name: str
    stage: str
    device: str
    device_peak: int
    host_peak: int | None
    cache_disk: int | None
    fits: bool | None
    short: tuple[str, ...] = ()
    device_terms: dict[str, int] = field(default_factory=dict)
    host_terms: dict[str, int] = field(default_factory=dict)
    note: str = ""


@dataclass
class MemoryPlan:
    """Every stage's row, the shape and data sizes used, and the memory compared against."""

    recipe: str
    shape: ModelShape
    workload: F.Workload
    device: str
    device_memory: int | None
    host_memory: int | None
    stages: list[StagePlan]

    @property
    def fits(self) -> bool | None:
        """False when a stage does not fit; None when one cannot be told; else True."""
        got = [s.fits for s in self.stages]
        return False if False in got else (None if None in got else True)

    def refusal(self) -> str:
        """One line naming each stage that does not fit, its need and the memory there."""
        parts = []
        for s in self.stages:
            if "device" in s.short:
                mem = self.device_memory if _separate(s.device) else self.host_memory
                parts.append(f"{s.name} needs {format_size(s.device_peak)} on {s.device} "
                             f"(has {format_size(mem)})")
            if "host" in s.short:
                parts.append(f"{s.name} needs {format_size(s.host_peak)} of host RAM "
                             f"(has {format_size(self.host_memory)})")
        return "; ".join(parts)


def _separate(device: str) -> bool:
    """The device has its own memory (not the host's RAM)."""
    return device.split(":")[0] not in ("cpu", "mps")


def _rows(source: str, languages: list[str], split: str, n: int | None, assumed: int,
          what: str, estimated: list[str]):
    """(rows, prompts or None): counted when the data is readable, else the recipe's maximum
    (or ``assumed``) noted in ``estimated``."""
    from lens_merge.data import load_prompts

    try:
        prompts = load_prompts(source, languages, split=split, max_samples=n)
        return len(prompts), prompts
    except DataError:
        estimated.append(f"{what} rows: {source} not readable, assumed {n or assumed}")
        return n or assumed, None


def _covered(probe, train, languages: list[str]) -> bool:
    """Every language's probing texts are among its training prompts (one shared pass)."""
    return all(set(probe.texts(lang)) <= set(train.texts(lang)) for lang in languages)


def workload_of(recipe: Recipe) -> F.Workload:
    """The data sizes and settings of a recipe (rows counted when the files are there)."""
    d, langs, est = recipe.data, list(recipe.languages), []
    n_train, train = _rows(d.train, langs, "train", d.max_train_samples, ASSUMED_TRAIN_ROWS,
                           "data.train", est)
    n_probe, probe = _rows(d.probe, langs, "train", d.max_probe_samples, ASSUMED_PROBE_ROWS,
                           "data.probe", est)
    n_eval, _ = _rows(d.eval, langs, "heldout", d.max_eval_samples, ASSUMED_EVAL_ROWS,
                      "data.eval", est)
    shared = (_covered(probe, train, langs) if probe is not None and train is not None
              else d.probe == d.train and n_probe <= n_train)
    budget = getattr(recipe.eval, "max_memory", None)  # bytes; None: sized in plan_recipe
    g, o, e, b = recipe.export.gguf, recipe.export.onnx, recipe.export, recipe.bench
    cv = e.control_vectors
    return F.Workload(
        languages=len(langs), max_length=d.max_length, top_k=recipe.train.top_k,
        train_rows=n_train, probe_rows=n_probe, shared_pass=shared, eval_rows=n_eval,
        train_dtype=recipe.train.dtype, train_batch=recipe.train.batch_size,
        train_kl=recipe.train.lambda_kl > 0, train_kl_tokens=recipe.train.lambda_kl_tokens > 0,
        train_replies=(recipe.train.reply_tokens if recipe.train.lambda_kl_replies > 0 else 0),
        train_protect=recipe.train.protect_english is not None,
        cache_batch=recipe.train.cache_batch_size, probe_batch=recipe.probe.batch_size,
        eval_batch=recipe.eval.batch_size,
        eval_budget=parse_size(budget, "eval.max_memory") if budget else None,
        max_new_tokens=recipe.eval.max_new_tokens,
        gguf_outtypes=tuple(g.outtypes) if g else (), gguf_verify=bool(g and g.verify),
        onnx_dtype=o.dtype if o and o.enabled else None,
        onnx_quantize=bool(o and o.quantize), onnx_verify=bool(o and o.verify),
        onnx_exporter=o.exporter if o else "dynamo",
        bench_dtype=b.dtype if b.tasks else None, bench_batch=_bench_batch(b.batch_size),
        lora_verify=bool(e.lora and e.lora.verify),
        gguf_lora=e.gguf_lora.outtype if e.gguf_lora and e.gguf_lora.verify else None,
        cv_verify=bool(cv and cv.verify), estimated=tuple(est))


def _bench_batch(size: int | str) -> int:
    """lm-eval's batch size (``auto`` planned as the default 8)."""
    return size if isinstance(size, int) else 8


def _shape_for(recipe: Recipe, config: str | Path | ModelShape | None) -> ModelShape:
    """The shape: ``config`` when given, else the base's own config.json, else the
    recipe's ``plan.config``."""
    if isinstance(config, ModelShape):
        return config
    if config is not None:
        return load_shape(config)
    from lens_merge.models import resolve_model

    if recipe.base == "default" or Path(recipe.base).expanduser().is_dir():
        return load_shape(resolve_model(recipe.base))
    if recipe.plan.config:
        return load_shape(recipe.plan.config)
    raise ModelError(f"recipe base {recipe.base!r} is not on disk: plan with its config "
                     f"(--config PATH/config.json or a shipped shape: "
                     f"{', '.join(shipped_shapes())}; recipe key plan.config)")


def _needs(m: ModelShape, w: F.Workload, recipe: Recipe, gpu: bool):
    """(row name, stage, device, Need) for every enabled stage, in pipeline order."""
    dev = recipe.device
    if w.shared_pass:
        yield "probe+cache", "probe", dev, F.frozen_pass(m, w, w.train_rows, w.cache_batch,
                                                         w.train_rows, True, gpu)
    else:
        yield "probe", "probe", dev, F.frozen_pass(m, w, w.probe_rows, w.probe_batch,
                                                   w.probe_rows, False, gpu)
        yield "cache", "train", dev, F.frozen_pass(m, w, w.train_rows, w.cache_batch, 0,
                                                   True, gpu)
    yield "train", "train", dev, F.train_need(m, w, gpu)
    yield "eval", "eval", dev, F.eval_need(m, w, gpu)
    if w.bench_dtype:
        yield "bench", "bench", dev, F.bench_need(m, w)
    yield "fold", "fold", "cpu", F.fold_need(m, w)
    if recipe.fold.verify:
        yield "verify", "verify", "cpu", F.verify_need(m, w)
    if w.gguf_outtypes:
        yield "gguf", "gguf", "cpu", F.gguf_need(m, w)
    if w.onnx_dtype:
        yield "onnx", "onnx", "cpu", F.onnx_need(m, w)
    if recipe.export.lora or recipe.export.gguf_lora or recipe.export.control_vectors:
        yield "adapters", "adapters", "cpu", F.adapters_need(m, w)


def plan_recipe(recipe: Recipe, config: str | Path | ModelShape | None = None,
                stages: list[str] | None = None) -> MemoryPlan:
    """The memory plan of a recipe on this machine (or the memory the recipe states).

    Args:
        recipe: the validated recipe; ``device``, ``plan.memory`` (device memory, default:
            measured: free GPU memory, or available RAM for cpu/mps) and
            ``plan.host_memory`` (default: available RAM) say what it is compared against.
        config: the base's shape instead of its config.json (a shipped name such as
            ``llama3-8b``, a config.json path, or a ``ModelShape``).
        stages: plan only these pipeline stages (``run --only``).

    Returns:
        The ``MemoryPlan``: one ``StagePlan`` per enabled stage.

    Raises:
        ModelError: the base is not on disk and no config is given, or a config is unusable.
        ConfigError: a bad size in ``plan.memory``/``plan.host_memory``/``eval.max_memory``.
    """
    m = _shape_for(recipe, config)
    w = workload_of(recipe)
    gpu = _separate(recipe.device)
    p = recipe.plan
    host = parse_size(p.host_memory, "plan.host_memory") if p.host_memory else host_available()
    dev = (parse_size(p.memory, "plan.memory") if p.memory else device_available(recipe.device)
           ) if gpu else (parse_size(p.memory, "plan.memory") if p.memory else host)
    if not gpu:
        host = dev
    if w.eval_budget is None:  # eval's default budget: half the free GPU memory, or 1/4 RAM
        free = dev // 2 if gpu and dev else (host // 4 if host else None)
        w = replace(w, eval_budget=free)
    rows = []
    for name, stage, where, need in _needs(m, w, recipe, gpu):
        if stages is not None and stage not in stages:
            continue
        separate = _separate(where)
        peak, hpeak = need.device_peak, (need.host_peak if separate else None)
        mem = dev if separate else host
        checks = {"device": None if mem is None else peak <= mem}
        if separate:
            checks["host"] = None if host is None else hpeak <= host
        short = tuple(k for k, ok in checks.items() if ok is False)
        fits = False if short else (None if None in checks.values() else True)
        disk = need.disk or None
        rows.append(StagePlan(name, stage, where, peak, hpeak, disk, fits, short, need.device,
                              need.host, need.note))
    return MemoryPlan(recipe.name, m, w, recipe.device, dev, host, rows)


def check_plan(recipe: Recipe, stages: list[str] | None = None) -> MemoryPlan | None:
    """Refuse a run whose plan says a stage does not fit (``run`` calls this first).

    Returns:
        The plan, or None when ``plan.check`` is off or the plan cannot be made (a base that
        cannot be read: the stage that reads it reports that).

    Raises:
        PlanError: one line naming each stage that does not fit; ``.plan`` holds the table.
    """
    if not recipe.plan.check:
        return None
    try:
        plan = plan_recipe(recipe, stages=stages)
    except (ModelError, DataError):
        return None
    if plan.fits is False:
        raise PlanError(f"recipe {recipe.name}: the memory plan says it does not fit: "
                        f"{plan.refusal()} (`lens-merge plan RECIPE` prints the table; set "
                        "plan.memory / plan.host_memory, or plan.check: false to run anyway)",
                        plan)
    return plan
