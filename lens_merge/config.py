"""Recipe and stage configurations: YAML -> pydantic (unknown keys rejected) -> plain arguments.

CLI flags and recipe keys share these definitions: each CLI command builds the same model.
Every value is checked when the recipe is loaded (types, ranges with sane upper bounds, GGUF
output types, language codes); ``check_recipe`` then checks what needs the file system (data
sources and their columns, the base model directory, the release folder) before work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lens_merge._config_base import (  # noqa: F401  (re-exported: config is the public home)
    DEFAULT_LANGUAGES,
    MAX_BATCH,
    MAX_LAYERS,
    MAX_SAMPLES,
    MAX_TOKENS,
    MAX_WEIGHT,
    REPO_ID,
    SIZE,
    Float,
    Int,
    _Strict,
)
from lens_merge._config_export import (  # noqa: F401
    BenchConfig,
    ControlVectorConfig,
    ExportConfig,
    GGUFConfig,
    GGUFLoraConfig,
    LoraConfig,
    OnnxConfig,
)
from lens_merge.errors import ConfigError


class DataConfig(_Strict):
    """Where prompts come from. ``default`` is the embedded team-written data."""

    train: str = Field("default", description="parallel prompts: 'default', a JSONL/JSON file "
                       "or a saved HF dataset directory")
    probe: str = Field("default", description="probing texts per language (need not be parallel)")
    eval: str = Field("default", description="held-out parallel prompts for evaluation")
    max_length: Int = Field(128, gt=0, le=MAX_TOKENS, description="max prompt tokens")
    max_train_samples: Int | None = Field(None, gt=0, le=MAX_SAMPLES)
    max_probe_samples: Int | None = Field(300, gt=0, le=MAX_SAMPLES, description="per language")
    max_eval_samples: Int | None = Field(None, gt=0, le=MAX_SAMPLES)


class ProbeConfig(_Strict):
    pooling: Literal["last", "mean"] = "last"
    rank: Int | None = Field(None, gt=0, le=MAX_LAYERS,
                             description="language-specific rank r; default L-1")
    batch_size: Int = Field(16, gt=0, le=MAX_BATCH)
    chat_template: bool = Field(True, description="wrap texts in the chat template with the "
                                "generation prompt (required for last-token pooling)")


class TrainConfig(_Strict):
    top_k: Int = Field(2, gt=0, le=MAX_LAYERS, description="train decoder blocks N-K..N-1")
    lambda_retain: Float = Field(1.0, ge=0, le=MAX_WEIGHT)
    lambda_separate: Float = Field(1.0, ge=0, le=MAX_WEIGHT)
    lambda_align: Float = Field(1.0, ge=0, le=MAX_WEIGHT)
    separate_scale: Float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT,
                                  description="w_l, how far along delta_l to push")
    lambda_retain_last: Float = Field(
        0.0, ge=0, le=MAX_WEIGHT, description="MSE between the trained and the base's final "
        "state at the last English prompt token (the one the reply is generated from)")
    lambda_kl: Float = Field(
        0.0, ge=0, le=MAX_WEIGHT, description="KL(base || lens) of the next-token distribution "
        "at the last English prompt token, through the frozen final norm and head")
    lambda_kl_tokens: Float = Field(
        0.0, ge=0, le=MAX_WEIGHT, description="KL(base || lens) of the next-token distributions "
        "at every English prompt token (mean over tokens); the base's come from a frozen copy "
        "of the top K blocks run on the cached inputs (generation continues from states like "
        "these, so this keeps English replies, not only their first token)")
    lambda_kl_replies: Float = Field(
        0.0, ge=0, le=MAX_WEIGHT, description="KL(base || lens) of the next-token distributions "
        "at every position of the base's own greedy reply to each English training prompt "
        "(teacher-forced; the replies are generated once with the cache, no response data): "
        "keeps whole English replies, where the prompt-token terms keep only their start")
    reply_tokens: Int = Field(32, gt=0, le=MAX_TOKENS, description="length of the base's "
                              "English replies for lambda_kl_replies (eval's max_new_tokens "
                              "is the natural choice)")
    align_anchor: Literal["trained", "reference"] = Field(
        "trained", description="what align pulls the targets' agnostic part toward: the "
        "trained English state (the paper) or the base's (align cannot move English)")
    lr: Float = Field(1e-5, gt=0, le=10)
    weight_decay: Float = Field(0.1, ge=0, le=MAX_WEIGHT)
    warmup_ratio: Float = Field(0.05, ge=0, le=1)
    epochs: Int = Field(1, gt=0, le=100_000)
    batch_size: Int = Field(1, gt=0, le=MAX_BATCH)
    grad_accum: Int = Field(8, gt=0, le=MAX_BATCH)
    max_grad_norm: Float | None = Field(1.0, gt=0, le=1e12)
    seed: Int = Field(0, ge=0, le=2**32 - 1)
    dtype: Literal["fp32", "bf16"] = "fp32"
    cache_batch_size: Int = Field(16, gt=0, le=MAX_BATCH,
                                  description="batch size when building the cache")
    freeze_norms: bool = Field(False, description="keep every 1-D tensor (norms, biases) of "
                               "the top K blocks at the base's value: the delta is then "
                               "all-linear, so a LoRA adapter carries it exactly up to rank")
    protect_english: Float | None = Field(
        None, gt=0, le=1, description="keep the delta off the input directions of every "
        "trained linear map that carry this share of the English inputs' energy (e.g. 0.99; "
        "null-space projection after every step, lens/train/protect.py): English stays at "
        "the base's output up to the energy left out; needs freeze_norms")

    @model_validator(mode="after")
    def _protect_needs_frozen_norms(self) -> TrainConfig:
        if self.protect_english is not None and not self.freeze_norms:
            raise ValueError("protect_english projects the linear weights' change only; norms "
                             "and biases would still move English: set freeze_norms: true")
        return self


class EvalConfig(_Strict):
    max_new_tokens: Int = Field(32, gt=0, le=MAX_TOKENS)
    batch_size: Int = Field(48, gt=0, le=MAX_BATCH,
                            description="prompts per generation batch (languages mixed): on a "
                            "CPU a decode step costs nearly the same for 8 or 48")
    kl_prompts: Int | None = Field(
        None, gt=0, le=MAX_SAMPLES, description="held-out English prompts for the English "
        "checks (KL, top-1 agreement, identical greedy replies): the eval rows' English and "
        "more held-out rows up to this many (English only, so they cost little); default: "
        "the eval rows")
    max_memory: Annotated[Int, Field(gt=0)] | Annotated[str, Field(pattern=SIZE)] | None = Field(
        None, description="bytes or a size ('2GB' = 2e9, '512MiB') for one eval batch's KV "
        "caches, logits and prefill: picks the batch (at most batch_size); default: half the "
        "free GPU memory or a quarter of available RAM")
    steering: bool = Field(True, description="measure the steering baseline beside Lens: "
                           "alpha_l * delta_l added to the input of block N-K for prompts of "
                           "language l (the sweep turns it off)")
    steering_alphas: list[Annotated[Float, Field(gt=0, le=MAX_WEIGHT)]] = Field(
        [0.5, 1.0, 2.0, 4.0, 8.0], min_length=1, max_length=32,
        description="alpha grid; per language the one with the most first-token target mass "
        "whose replies on the training rows are not degenerate")
    steering_rows: Int = Field(16, gt=0, le=MAX_SAMPLES,
                               description="training rows per language alpha is chosen on")
    steering_tokens: Int = Field(16, gt=0, le=MAX_TOKENS,
                                 description="greedy reply tokens of the degeneracy check")


class FoldConfig(_Strict):
    link: bool = Field(False, description="hardlink unchanged shards instead of copying")
    verify: bool = True
    tolerance: Float | None = Field(None, gt=0, le=MAX_WEIGHT,
                                    description="max |logit diff|; default by dtype")


class ReleaseConfig(_Strict):
    repo_id: str | None = Field(None, pattern=REPO_ID, description="'name' or 'owner/name'")
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    license: str | None = Field(None, description="default: inherited from the base model")
    model_name: str | None = Field(None, description="display name; default: recipe name")


class PlanConfig(_Strict):
    """The memory plan ``run`` checks first (``lens_merge.plan``): device memory (default: free
    GPU memory or available RAM), host RAM, the base's config.json or shipped shape
    (``llama3-8b``) for a base not on disk, and ``check: false`` to run anyway."""

    check: bool = True
    memory: str | None = Field(None, pattern=SIZE)
    host_memory: str | None = Field(None, pattern=SIZE)
    config: str | None = None


class Recipe(_Strict):
    """A whole run: probe -> train -> eval -> fold -> verify -> exports -> card -> push."""

    name: str = Field(..., min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = Field("default", min_length=1)
    languages: list[str] = Field(default_factory=lambda: list(DEFAULT_LANGUAGES), max_length=200)
    output_dir: str = Field("out", min_length=1)
    device: str = Field("cpu", pattern=r"^(cpu|cuda|mps|xpu|npu|hpu)(:\d{1,3})?$",
                        description="torch device: cpu, cuda, cuda:1, mps, ...")
    data: DataConfig = Field(default_factory=DataConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    fold: FoldConfig = Field(default_factory=FoldConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @field_validator("languages")
    @classmethod
    def _english_first(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("need English plus at least one target language")
        if v[0] != "en":
            raise ValueError(f"the central language (English, 'en') must come first, got {v[0]!r}")
        if len(set(v)) != len(v):
            raise ValueError("languages must be unique")
        from lens_merge.data.languages import is_known

        unknown = [x for x in v if not is_known(x)]
        if unknown:
            raise ValueError(f"unknown language code(s) {', '.join(map(repr, unknown))}; expected "
                             "ISO 639-1 codes such as en, zh, id (optionally with a subtag: "
                             "pt-BR)")
        return v

    @model_validator(mode="after")
    def _rank_fits(self) -> Recipe:
        r = self.probe.rank
        if r is not None and r > len(self.languages) - 1:
            raise ValueError(f"probe.rank {r} exceeds L-1 = {len(self.languages) - 1}")
        return self

    @property
    def release_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _format_errors(exc: ValidationError, source: str) -> str:
    """Every problem of a validation, on one line: ``SOURCE: unknown key 'x'; field 'y': ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            parts.append(f"field '{loc}': {_one_line(err['msg'])}")
    return f"{source}: " + "; ".join(parts)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1} column {mark.column + 1}"
    return _one_line(str(exc))


def recipe_from(raw: Any, source: str | Path = "recipe") -> Recipe:
    """Validate a parsed recipe (a mapping) into a ``Recipe``.

    Args:
        raw: the parsed YAML (or a dict built by a CLI command).
        source: how the error names where the values came from.

    Raises:
        ConfigError: one line naming the source and every bad or unknown key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got "
                          f"{type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(source))) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None


def with_overrides(recipe: Recipe, updates: dict[str, Any], source: str = "options") -> Recipe:
    """A copy of ``recipe`` with dotted-key updates (``{"data.probe": "x.jsonl"}``) applied and
    everything validated again.

    Raises:
        ConfigError: naming the bad option.
    """
    raw = recipe.model_dump()
    for key, value in updates.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return recipe_from(raw, source)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe.

    Raises:
        ConfigError: one line naming the file and every bad or unknown key (a missing or
            unreadable file, non-UTF-8 text and invalid YAML included).
    """
    p = Path(path)
    try:
        is_file, is_dir = p.is_file(), p.is_dir()
    except OSError as exc:  # a name too long, a permission denied on a parent
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if not is_file:
        what = "is a directory, expected a YAML file" if is_dir else "recipe file not found"
        raise ConfigError(f"{p}: {what}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({_yaml_problem(exc)})") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-13-45
        raise ConfigError(f"{p}: invalid YAML value ({_one_line(str(exc))})") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid YAML (nested too deeply)") from None
    return recipe_from(raw, p)


def check_recipe(recipe: Recipe, stages: list[str] | None = None) -> None:
    """Check what a recipe needs from the file system, before any stage starts.

    - each data source the selected stages read exists and has every recipe language in every
      row they use (the split and row count of that stage);
    - a base other than ``default`` is a local Hugging Face directory;
    - the release folder can be written, and is not, does not hold and does not lie inside
      the base model or a data source.

    Args:
        recipe: the validated recipe.
        stages: the stages that will run (``--only``); None: all.

    Raises:
        DataError, ModelError, OutputError: one line naming the recipe key and the file.
    """
    from lens_merge.data import DEFAULT, load_prompts
    from lens_merge.errors import DataError
    from lens_merge.guard import check_output, check_writable_parent

    d = recipe.data
    uses = [("probe", d.probe, "train", d.max_probe_samples),
            ("train", d.train, "train", d.max_train_samples),
            ("eval", d.eval, "heldout", d.max_eval_samples)]
    inputs: dict[str, Path] = {}
    for key, source, split, n in uses:
        if source != DEFAULT:
            inputs[f"data.{key} source"] = Path(source)
        if stages is not None and key not in stages:
            continue
        try:
            load_prompts(source, recipe.languages, split=split, max_samples=n)
        except DataError as exc:
            raise DataError(f"recipe data.{key}: {exc}") from None
    if recipe.base != "default":
        from lens_merge.errors import ModelError
        from lens_merge.models import resolve_model

        try:
            inputs["base model"] = resolve_model(recipe.base)
        except (OSError, RuntimeError, ValueError) as exc:  # ~user without a home, NUL, too long
            raise ModelError(f"recipe base {recipe.base!r}: {exc}") from None
    check_writable_parent(recipe.release_dir, what="release folder")
    check_output(recipe.release_dir, inputs, what="release folder")
