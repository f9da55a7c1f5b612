"""``bench.json``: lm-evaluation-harness scores of the base and the Lens model, one schema.

Per task, per metric: ``{"base", "lens", "stderr": {"base", "lens"}, "higher_is_better"}``;
``lens`` is None when no delta was given. A metric of a filtered task (generation tasks such
as MGSM) is named ``<metric>,<filter>`` (``exact_match,flexible-extract``), as lm-eval names
it; an unfiltered one is the bare metric (``acc``, ``acc_norm``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lens_merge.errors import RecordError

BENCH_SCHEMA = "lens-merge-bench/1"
BENCH_FILE = "bench.json"


class BenchScore(BaseModel):
    """One metric of one task for the base and the Lens model."""

    model_config = ConfigDict(extra="forbid")

    base: float | None = None
    lens: float | None = None
    stderr: dict[str, float | None] = Field(default_factory=dict,
                                            description="{'base': s, 'lens': s}")
    higher_is_better: bool | None = None

    @property
    def diff(self) -> float | None:
        """``lens - base``, or None when either is missing."""
        if self.base is None or self.lens is None:
            return None
        return self.lens - self.base


class BenchTask(BaseModel):
    """One lm-eval task: its scores and how it was run."""

    model_config = ConfigDict(extra="allow")

    metrics: dict[str, BenchScore] = Field(default_factory=dict)
    num_fewshot: int | None = None
    samples: int | None = Field(None, description="documents scored (after --limit)")
    output_type: str | None = None
    dataset_path: str | None = None
    dataset_name: str | None = None
    split: str | None = None
    config_source: str | None = Field(None, description="the YAML that defined the task")


class BenchReport(BaseModel):
    """The whole ``bench.json``."""

    model_config = ConfigDict(extra="allow")

    format: str = BENCH_SCHEMA
    model: str = Field(..., description="the base model reference as given")
    model_dir: str
    delta: str | None = Field(None, description="the delta folder scored as Lens")
    delta_sha256: str | None = Field(None, description="sha256 of lens_delta.safetensors")
    tasks: dict[str, BenchTask] = Field(default_factory=dict)
    requested: list[str] = Field(default_factory=list, description="task names as given "
                                 "(a group expands to its subtasks)")
    include_path: str | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 1
    device: str = "cpu"
    dtype: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    lm_eval_version: str = ""
    tool: dict[str, str] = Field(default_factory=dict)
    created: str | None = None

    def rows(self) -> list[tuple[str, str, BenchScore]]:
        """``(task, metric, score)`` in task order, for tables."""
        return [(t, m, s) for t, task in self.tasks.items() for m, s in task.metrics.items()]


def read_bench(path: str | Path) -> BenchReport:
    """Read and validate a ``bench.json``.

    Raises:
        RecordError: missing, not JSON, or not of this shape (the file and field named).
    """
    from lens_merge.records import read_record

    report = read_record(path, BenchReport)
    if report.format != BENCH_SCHEMA:
        raise RecordError(f"{path}: format {report.format!r}, expected {BENCH_SCHEMA!r} (written "
                          "by another lens-merge version; rerun `lens-merge bench`)")
    return report
