"""Recipe and stage configurations: YAML -> pydantic (unknown keys rejected) -> plain arguments.

CLI flags and recipe keys share these definitions: each CLI command builds the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lens_merge.errors import ConfigError

DEFAULT_LANGUAGES = ["en", "zh", "ja", "ko", "ar", "bn", "sw", "es", "fr", "de"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where prompts come from. ``default`` is the embedded team-written data."""

    train: str = Field("default", description="parallel prompts: 'default', a JSONL/JSON file "
                       "or a saved HF dataset directory")
    probe: str = Field("default", description="probing texts per language (need not be parallel)")
    eval: str = Field("default", description="held-out parallel prompts for evaluation")
    max_length: int = Field(128, gt=0, description="max prompt tokens")
    max_train_samples: int | None = Field(None, gt=0)
    max_probe_samples: int | None = Field(300, gt=0, description="per language")
    max_eval_samples: int | None = Field(None, gt=0)


class ProbeConfig(_Strict):
    pooling: Literal["last", "mean"] = "last"
    rank: int | None = Field(None, gt=0, description="language-specific rank r; default L-1")
    batch_size: int = Field(16, gt=0)
    chat_template: bool = Field(True, description="wrap texts in the chat template with the "
                                "generation prompt (required for last-token pooling)")


class TrainConfig(_Strict):
    top_k: int = Field(2, gt=0, description="train decoder blocks N-K..N-1")
    lambda_retain: float = Field(1.0, ge=0)
    lambda_separate: float = Field(1.0, ge=0)
    lambda_align: float = Field(1.0, ge=0)
    separate_scale: float = Field(1.0, description="w_l, how far along delta_l to push")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    dtype: Literal["fp32", "bf16"] = "fp32"
    cache_batch_size: int = Field(16, gt=0, description="batch size when building the cache")


class EvalConfig(_Strict):
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(48, gt=0, description="prompts per generation batch (languages "
                            "mixed): on a CPU a decode step costs nearly the same for 8 or 48")
    kl_prompts: int | None = Field(None, gt=0, description="English prompts for the KL check")


class FoldConfig(_Strict):
    link: bool = Field(False, description="hardlink unchanged shards instead of copying")
    verify: bool = True
    tolerance: float | None = Field(None, gt=0, description="max |logit diff|; default by dtype")


class GGUFConfig(_Strict):
    outtypes: list[str] = Field(default_factory=lambda: ["f16", "q8_0"])
    verify: bool = True
    tokenizer_pre: str | None = None


class OnnxConfig(_Strict):
    enabled: bool = True
    dtype: Literal["fp32", "fp16"] = "fp32"
    quantize: Literal["int8"] | None = "int8"
    int8_method: Literal["weight_only", "dynamic"] = Field(
        "weight_only", description="weight_only: 8-bit MatMulNBits; dynamic: quantize_dynamic")
    verify: bool = True
    tolerance: float | None = Field(None, gt=0, description="fixed max |logit diff|; default "
                                    "max(1e-4, 1e-5 * max|logit|) for fp32")


class ExportConfig(_Strict):
    gguf: GGUFConfig | None = Field(default_factory=GGUFConfig)
    onnx: OnnxConfig | None = Field(default_factory=OnnxConfig)


class ReleaseConfig(_Strict):
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    license: str | None = Field(None, description="default: inherited from the base model")
    model_name: str | None = Field(None, description="display name; default: recipe name")


class Recipe(_Strict):
    """A whole run: probe -> train -> eval -> fold -> verify -> exports -> card -> push."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = "default"
    languages: list[str] = Field(default_factory=lambda: list(DEFAULT_LANGUAGES))
    output_dir: str = "out"
    device: str = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    fold: FoldConfig = Field(default_factory=FoldConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)

    @field_validator("languages")
    @classmethod
    def _english_first(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("need English plus at least one target language")
        if v[0] != "en":
            raise ValueError(f"the central language (English, 'en') must come first, got {v[0]!r}")
        if len(set(v)) != len(v):
            raise ValueError("languages must be unique")
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


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{loc}'")
        else:
            lines.append(f"{source}: field '{loc}': {err['msg']}")
    return "\n".join(lines)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe.

    Raises:
        ConfigError: naming the file and every bad or unknown key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(p))) from None
