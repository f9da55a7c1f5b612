"""The recipe's ``export`` section: GGUF, ONNX and the adapters (PEFT LoRA, LoRA GGUF,
control vectors); and the ``bench`` section (lm-evaluation-harness tasks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lens_merge._config_base import (
    MAX_BATCH,
    MAX_SAMPLES,
    MAX_TOKENS,
    MAX_WEIGHT,
    Float,
    Int,
    _Strict,
)


class GGUFConfig(_Strict):
    outtypes: list[str] = Field(default_factory=lambda: ["f16", "q8_0"])
    verify: bool = True
    tokenizer_pre: str | None = None

    @field_validator("outtypes")
    @classmethod
    def _known_outtypes(cls, v: list[str]) -> list[str]:
        from lens_merge.export.gguf._types import OUTTYPES

        for t in v:
            if t.lower() not in OUTTYPES:
                raise ValueError(f"GGUF output type {t!r} is not supported; supported: "
                                 f"{', '.join(OUTTYPES)}")
        if len({t.lower() for t in v}) != len(v):
            raise ValueError("GGUF output types must be unique")
        return v


class OnnxConfig(_Strict):
    enabled: bool = True
    exporter: Literal["dynamo", "optimum"] = Field(
        "dynamo", description="dynamo: torch's dynamo exporter, weights streamed to external "
        "data (about one copy of the weights at peak); optimum: optimum's main_export")
    dtype: Literal["fp32", "fp16"] = "fp32"
    quantize: Literal["int8"] | None = "int8"
    int8_method: Literal["weight_only", "dynamic"] = Field(
        "weight_only", description="weight_only: 8-bit MatMulNBits; dynamic: quantize_dynamic")
    verify: bool = True
    tolerance: Float | None = Field(None, gt=0, le=MAX_WEIGHT,
                                    description="fixed max |logit diff|; default "
                                    "max(1e-4, 1e-5 * max|logit|) for fp32")


class _Rank(_Strict):
    rank: Int | None = Field(None, gt=0, le=1 << 16, description="one rank for every tensor")
    energy: Float | None = Field(None, gt=0, le=1, description="smallest rank per tensor "
                                 "that keeps this fraction of the squared singular values")

    @model_validator(mode="after")
    def _one_of(self):
        if self.rank is not None and self.energy is not None:
            raise ValueError("give rank or energy, not both")
        return self


class LoraConfig(_Rank):
    """A PEFT LoRA adapter of the delta (``adapters/peft``)."""

    verify: bool = True


class GGUFLoraConfig(_Rank):
    """A llama.cpp LoRA adapter GGUF of the delta (needs an all-linear delta:
    ``train.freeze_norms``)."""

    outtype: Literal["f32", "f16"] = "f16"
    verify: bool = Field(True, description="base GGUF + adapter vs the folded GGUF in llama.cpp "
                         "(exports the base at outtype too)")


class ControlVectorConfig(_Strict):
    """One llama.cpp control vector GGUF per language from the probe's directions."""

    languages: list[str] | None = Field(None, description="default: every target language")
    layers: str | None = Field(None, description="'A-B' blocks; default: the trained top blocks")
    scale: Float = Field(1.0, gt=0, le=MAX_WEIGHT)
    verify: bool = Field(True, description="llama.cpp with the first vector vs transformers "
                         "with the same vector added by hooks, on the base GGUF (f16)")
    effect_scales: list[Float] = Field([0.05, 0.1, 0.2], max_length=8,
                                       description="run-time scales at which the share of "
                                       "replies in the vector's language is measured; [] to skip")
    effect_prompts: Int = Field(8, gt=0, le=MAX_SAMPLES, description="held-out English "
                                "prompts per language for the effect table")
    effect_tokens: Int = Field(16, gt=0, le=MAX_TOKENS, description="greedy reply tokens "
                               "per prompt in the effect table (16 name the language)")

    @field_validator("effect_scales")
    @classmethod
    def _positive_scales(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= MAX_WEIGHT for s in v):
            raise ValueError(f"every effect scale must be in (0, {MAX_WEIGHT}], got {v}")
        return v


class ExportConfig(_Strict):
    gguf: GGUFConfig | None = Field(default_factory=GGUFConfig)
    onnx: OnnxConfig | None = Field(default_factory=OnnxConfig)
    lora: LoraConfig | None = None
    gguf_lora: GGUFLoraConfig | None = None
    control_vectors: ControlVectorConfig | None = None


class BenchConfig(_Strict):
    """lm-evaluation-harness tasks scored for the base and Lens (``report/bench.json``, the
    card's ``model-index``); no tasks: the bench stage is skipped. Needs the ``bench`` extra."""

    tasks: list[str] = Field(default_factory=list, max_length=10_000, description="lm-eval "
                             "task or group names, e.g. belebele_zho_Hans, xcopa_sw")
    include_path: str | None = Field(None, description="folder of local lm-eval task YAMLs")
    limit: Int | None = Field(None, gt=0, le=MAX_SAMPLES, description="documents per task")
    num_fewshot: Int | None = Field(None, ge=0, le=1000, description="default: the task's")
    batch_size: Int = Field(8, gt=0, le=MAX_BATCH)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t or t != t.strip() or "," in t]
        if bad:
            raise ValueError(f"task names must be non-empty, one per entry, without commas or "
                             f"surrounding spaces; got {bad!r}")
        if len(set(v)) != len(v):
            raise ValueError("task names must be unique")
        return v
