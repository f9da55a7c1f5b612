"""One pydantic model per JSON file the tool writes or reads back.

Writers build these models and save them with ``lens_merge.files.write_json_atomic``; readers go
through ``read_record(path, Model)``, which turns every way a file can be wrong (missing,
not UTF-8, not JSON, wrong shape) into one ``LensMergeError`` line naming the file and field.

- ``ParityReport``: every verification (fold, GGUF, ONNX, adapters) has this one shape.
- ``DeltaMeta``: ``lens_delta.json``.
- ``FoldProvenance``: ``lens_merge.json`` beside a folded checkpoint.
- ``RunTable`` / ``StageRecord``: ``report/run.json``, one row per pipeline stage.
- ``ReleaseLayout``: the paths of a release folder, as one object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lens_merge.errors import RecordError

PARITY_SCHEMA = "lens-merge-parity/1"
FOLD_PROVENANCE_FILE = "lens_merge.json"  # beside a folded checkpoint (``FoldProvenance``)


class _Record(BaseModel):
    """Base of the records: extra keys are kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- parity


class ParityCheck(BaseModel):
    """One thresholded number of a verification: ``value op limit`` must hold."""

    model_config = ConfigDict(extra="forbid")

    name: str
    value: float | None
    limit: float
    op: Literal["<=", ">="]
    passed: bool

    @classmethod
    def of(cls, name: str, value: float | None, op: str, limit: float) -> ParityCheck:
        ok = value is not None and (value <= limit if op == "<=" else value >= limit)
        return cls(name=name, value=value, limit=limit, op=op, passed=bool(ok))  # type: ignore[arg-type]

    def describe(self) -> str:
        v = "missing" if self.value is None else f"{self.value:.4g}"
        bad = ">" if self.op == "<=" else "<"
        return f"{self.name} {v} {bad} {self.limit:.4g}" if not self.passed else \
            f"{self.name} {v} {self.op} {self.limit:.4g}"


class ParityReport(_Record):
    """The result of comparing an artifact with its reference (one shape for every verifier).

    ``kind`` names the verifier (``fold``, ``gguf``, ``onnx``, ``lora``, ...), ``variant`` the
    output type checked (``f16``, ``q8_0``, ``fp32``, ``int8``, the fold dtype). ``metrics``
    holds the headline numbers (``max_abs_logit_diff``, ``top1_agreement``, ``kl_mean``,
    ``greedy_equal``, ...), ``checks`` each thresholded one, ``problems`` anything else that
    fails it (files changed, tokenizer mismatch). ``passed`` is true only when every check
    passed and there is no problem. ``details`` carries the verifier's own rows.
    """

    schema_: str = Field(PARITY_SCHEMA, alias="schema")
    kind: str
    variant: str | None = None
    subject: str
    reference: str
    passed: bool
    checks: list[ParityCheck] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)
    metrics: dict[str, float | int | None] = Field(default_factory=dict)
    languages: list[str] = Field(default_factory=list)
    per_language: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    n_prompts: int = 0
    verified_at: str | None = None
    seconds: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @property
    def failures(self) -> list[str]:
        """One line per failed check or problem."""
        return [c.describe() for c in self.checks if not c.passed] + list(self.problems)

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"

    def dump(self) -> dict[str, Any]:
        """The JSON form (``schema`` key, not ``schema_``)."""
        return self.model_dump(mode="json", by_alias=True)

    def __getitem__(self, key: str) -> Any:
        """``report["max_abs_logit_diff"]``: a metric, else a field (convenient in tests)."""
        if key in self.metrics:
            return self.metrics[key]
        if key in type(self).model_fields or key in (self.model_extra or {}):
            return getattr(self, key)
        if key in self.details:
            return self.details[key]
        raise KeyError(key)


def parity_report(kind: str, subject: str | Path, reference: str | Path, *,
                  checks: list[ParityCheck], problems: list[str] | None = None,
                  **fields: Any) -> ParityReport:
    """Build a ``ParityReport`` whose ``passed`` follows from its checks and problems."""
    problems = list(problems or [])
    return ParityReport(kind=kind, subject=str(subject), reference=str(reference),
                        checks=checks, problems=problems,
                        passed=all(c.passed for c in checks) and not problems, **fields)


class ParitySet(_Record):
    """A verification file (``report/*_verify.json``, ``*.parity.json``): one report per
    artifact checked (each GGUF output type, the ONNX graph and its int8 copy, ...)."""

    schema_: str = Field(PARITY_SCHEMA, alias="schema")
    reports: list[ParityReport]

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)

    @property
    def failures(self) -> list[str]:
        return [f"{r.kind} {r.variant or ''}: {f}".replace("  ", " ")
                for r in self.reports for f in r.failures]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# --------------------------------------------------------------------------- delta


class DeltaTensor(BaseModel):
    """One changed base tensor of a delta."""

    model_config = ConfigDict(extra="allow")

    shape: list[int]
    base_dtype: str
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DeltaMeta(_Record):
    """``lens_delta.json``: what the delta changes and where it came from."""

    format: Literal["lens-delta"]
    format_version: int = Field(ge=1)
    tensors: dict[str, DeltaTensor]
    languages: list[str] = Field(default_factory=list)
    top_k: int | None = Field(None, ge=1)
    base: dict[str, Any] = Field(default_factory=dict)
    tool: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None


# --------------------------------------------------------------------------- fold


class FoldProvenance(_Record):
    """``lens_merge.json`` beside a folded (or unfolded) checkpoint."""

    format: Literal["lens-merge-fold"]
    format_version: int = Field(ge=1)
    operation: Literal["fold", "unfold"]
    delta: dict[str, Any] = Field(default_factory=dict)
    base: dict[str, Any] | str | None = None


# --------------------------------------------------------------------------- run table


class StageRecord(BaseModel):
    """One row of ``report/run.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: Literal["ran", "skipped", "disabled", "failed"]
    seconds: float = 0.0
    numbers: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    peak_rss_mb: float | None = None


class RunTable(BaseModel):
    """``report/run.json``: the stages of the last ``lens-merge run``."""

    model_config = ConfigDict(extra="forbid")

    stages: list[StageRecord]


# --------------------------------------------------------------------------- release layout


class ReleaseLayout(BaseModel):
    """Every path of a release folder (``OUT/<name>/``), relative to its root.

    Code that writes or reads a release asks this object for paths instead of spelling them.
    """

    model_config = ConfigDict(frozen=True)

    root: Path
    card: str = "README.md"
    recipe: str = "recipe.yaml"
    delta: str = "delta"
    delta_weights: str = "delta/lens_delta.safetensors"
    delta_meta: str = "delta/lens_delta.json"
    model: str = "model"
    gguf: str = "gguf"
    onnx: str = "onnx"
    adapters: str = "adapters"
    report: str = "report"
    subspace: str = "report/subspace"
    eval_report: str = "report/lens_report.json"
    bench_report: str = "report/bench.json"
    mean_states: str = "report/mean_states.safetensors"
    train_log: str = "report/train_log.jsonl"
    states_png: str = "report/states_2d.png"
    losses_png: str = "report/losses.png"
    fold_verify: str = "report/fold_verify.json"
    gguf_verify: str = "report/gguf_verify.json"
    onnx_verify: str = "report/onnx_verify.json"
    adapters_verify: str = "report/adapters_verify.json"
    cv_effect: str = "report/control_vector_effect.json"
    run_table: str = "report/run.json"
    manifest: str = ".lens_merge/manifest.json"
    state: str = ".lens_merge/state.json"
    work: str = ".work"

    def path(self, field: str) -> Path:
        """Absolute path of a named entry (``layout.path("model")``)."""
        return self.root / getattr(self, field)

    @property
    def verify_files(self) -> dict[str, str]:
        """Verification record of each checked artifact, by kind."""
        return {"fold": self.fold_verify, "gguf": self.gguf_verify, "onnx": self.onnx_verify,
                "adapters": self.adapters_verify}


# --------------------------------------------------------------------------- reading

M = TypeVar("M", bound=BaseModel)


def read_json(path: str | Path) -> Any:
    """Parse a UTF-8 JSON file; every failure is a ``RecordError`` naming the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise RecordError(f"{p}: is a directory, expected a JSON file") from None
    except OSError as exc:
        raise RecordError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno} "
                          f"({exc.msg})") from None
    except RecursionError:
        raise RecordError(f"{p}: JSON nested too deeply") from None


def validate_record(obj: Any, model: type[M], where: str | Path) -> M:
    """Validate parsed JSON against ``model``; the error names the file and the first field."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RecordError(f"{where}: field {loc!r}: {err['msg']}{more}") from None


def read_record(path: str | Path, model: type[M]) -> M:
    """Read and validate one record file."""
    return validate_record(read_json(path), model, path)
