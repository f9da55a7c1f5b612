"""Shared pieces of the recipe models: bounds, strict numbers, the strict base model."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

DEFAULT_LANGUAGES = ["en", "zh", "ja", "ko", "ar", "bn", "sw", "es", "fr", "de"]

# Sane upper bounds: far above any real run, low enough to fail at load, not deep in a stage.
MAX_TOKENS = 1 << 20
MAX_SAMPLES = 10_000_000
MAX_BATCH = 1 << 16
MAX_LAYERS = 4096
MAX_WEIGHT = 1e6
REPO_ID = r"^([A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$"  # Hub repo id
SIZE = r"^\s*\d+(\.\d+)?\s*([KMGTkmgt]([Ii]?[Bb])?|[Bb])?\s*$"  # 24GB (10^9), 512MiB (2^20)


def _integer(v: Any) -> Any:
    if isinstance(v, bool | float):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _number(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    return v


Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_number)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
