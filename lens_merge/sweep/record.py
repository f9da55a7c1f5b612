"""The sweep's JSON files, one pydantic model each: ``point.json`` (``SweepPoint``), the probe's
``probe/sweep_probe.json`` (``ProbeRecord``) and ``sweep.json`` (``SweepRecord``).

Extra keys are kept when read back (newer writers may add some).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SWEEP_FORMAT = "lens-sweep"
SWEEP_VERSION = 1


class _Kept(BaseModel):
    model_config = ConfigDict(extra="allow")


class BaseLens(_Kept):
    """One metric for the base model and after Lens (None when the report lacks it)."""

    base: float | None = None
    lens: float | None = None

    @property
    def gain(self) -> float | None:
        """``lens - base``, or None when either is missing."""
        return None if self.base is None or self.lens is None else self.lens - self.base


class SweepMetrics(_Kept):
    """What a sweep row shows, read from the point's ``lens_report.json`` summary.

    Target-language numbers are means over the target languages. ``languages_up`` counts the
    target languages whose ``up_metric`` (the first of first-token mass, LPR, fidelity that the
    report holds for every target language) rose; ``target_gain`` is ``gain_metric`` lens - base
    (the first of first-token mass, LPR, fidelity in the summary).
    """

    english_kl: float | None = None
    english_top1: float | None = None
    english_identical: float | None = None
    lpr: BaseLens = Field(default_factory=BaseLens)
    first_token_mass: BaseLens = Field(default_factory=BaseLens)
    fidelity: BaseLens = Field(default_factory=BaseLens)
    languages_up: int | None = None
    languages_total: int = 0
    up_metric: str | None = None
    target_gain: float | None = None
    gain_metric: str | None = None
    n_prompts: int | None = None


class SweepPoint(_Kept):
    """One finished point (``points/<key16>/point.json``, written last)."""

    format: Literal["lens-sweep-point"] = "lens-sweep-point"
    index: int
    key: str = Field(description="sha256 of the point's recipe, data, base and probe")
    overrides: dict[str, Any]
    final_losses: dict[str, float] = Field(default_factory=dict)
    steps: int = 0
    cache: Literal["built", "reused"]
    cache_key: str = Field("", description="the training cache's folder (key16) in work/cache")
    metrics: SweepMetrics
    train_seconds: float
    eval_seconds: float
    report: str = Field("report/lens_report.json", description="relative to the point folder")
    status: Literal["ran", "reused"] = "ran"  # what this invocation did (sweep.json only)
    pareto: bool = False  # on the front of (English KL, target gain) (sweep.json only)


class ProbeRecord(_Kept):
    """The sweep's probe (``probe/sweep_probe.json``, written after the subspace)."""

    key: str
    subspace_sha256: str
    seconds: float
    cache_built: bool = Field(description="the probe's shared pass built the training cache")
    status: Literal["ran", "reused"] = "ran"


class SweepRecord(_Kept):
    """``sweep.json``: the grid and every point of it that has finished, in grid order."""

    format: Literal["lens-sweep"] = SWEEP_FORMAT
    format_version: int = SWEEP_VERSION
    recipe: str
    grid: dict[str, list[Any]]
    grid_points: int
    probe: ProbeRecord
    cache_builds: int = Field(description="training caches built over the sweep's life: the "
                              "probe's shared pass plus every point that built one")
    points: list[SweepPoint]
    up_metric: str | None = None
    gain_metric: str | None = None
    tool: dict[str, str] = Field(default_factory=dict)
