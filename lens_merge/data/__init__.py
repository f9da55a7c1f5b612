"""Prompt data: the embedded default set and loaders for user and reference formats.

Supported sources (``source`` arguments):
- ``default``: the team-written set shipped in ``lens_merge/data/default/`` (parallel
  instructions in 10 languages, with a fixed held-out split);
- a JSONL file, one object per line whose keys are language codes (extra keys ignored);
  the Lens reference probing files use this format;
- a JSON file in the Lens reference parallel format:
  ``{"Instances": [{"input_en": ..., "input_zh": ..., "output": ""}, ...]}``;
- a directory saved with HF ``datasets`` (``save_to_disk``), columns named by language code
  (or ``input_<code>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from lens_merge.errors import DataError

DEFAULT = "default"
DEFAULT_FILE = "instructions.jsonl"
DEFAULT_SOURCE = f"lens-merge default data (lens_merge/data/default/{DEFAULT_FILE})"
Split = Literal["train", "heldout", "all"]


@dataclass(frozen=True)
class PromptSet:
    """Rows of prompts keyed by language code; every row has every language."""

    languages: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, lang: str) -> list[str]:
        """All texts of one language, in row order."""
        return [r[lang] for r in self.rows]


def default_data_path() -> Path:
    """Path of the embedded default JSONL."""
    return Path(str(resources.files(__package__) / "default" / DEFAULT_FILE))


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {i}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: row {i}: expected a JSON object")
            out.append((i, obj))
    return out


def _read_reference_json(path: Path) -> list[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and "Instances" in data:
        items = data["Instances"]
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(f"{path}: expected a list of objects or an object with 'Instances'")
    rows = []
    for i, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object")
        rows.append((i, {k.removeprefix("input_"): v for k, v in obj.items()}))
    return rows


def _read_hf_dataset(path: Path) -> list[tuple[int, dict]]:
    try:
        from datasets import load_from_disk
    except ImportError as exc:
        raise DataError(f"{path}: reading a saved HF dataset needs the 'datasets' package "
                        "(pip install 'lens-merge[datasets]')") from exc
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    return [(i, {k.removeprefix("input_"): v for k, v in row.items()})
            for i, row in enumerate(ds, start=1)]


def _read_rows(source: str) -> tuple[list[tuple[int, dict]], str]:
    if source == DEFAULT:
        # named, not located: the install path means nothing on a model card
        return _read_jsonl(default_data_path()), DEFAULT_SOURCE
    p = Path(source).expanduser()
    if p.is_dir():
        return _read_hf_dataset(p), str(p)
    if not p.is_file():
        raise DataError(f"{p}: data file not found (expected 'default', a .jsonl/.json file or "
                        "a saved HF dataset directory)")
    if p.suffix == ".jsonl":
        return _read_jsonl(p), str(p)
    if p.suffix == ".json":
        return _read_reference_json(p), str(p)
    raise DataError(f"{p}: unknown data format {p.suffix!r} (expected .jsonl, .json or a "
                    "saved HF dataset directory)")


def load_prompts(
    source: str,
    languages: list[str],
    split: Split = "all",
    max_samples: int | None = None,
) -> PromptSet:
    """Load prompts in every requested language.

    Args:
        source: ``default``, a file or a dataset directory (see the module docstring).
        languages: language codes every row must have.
        split: for sources with a ``split`` field (the default set): ``train``, ``heldout``
            or ``all``. Sources without one are used whole for any split.
        max_samples: keep the first N rows.

    Raises:
        DataError: naming the file, the row and the language for a missing or empty text.
    """
    raw, where = _read_rows(source)
    rows = []
    for i, obj in raw:
        if split != "all" and "split" in obj and obj["split"] != split:
            continue
        row = {}
        for lang in languages:
            if lang not in obj:
                raise DataError(f"{where}: row {i}: language {lang!r} missing "
                                f"(row has: {', '.join(sorted(k for k in obj if k != 'split'))})")
            text = obj[lang]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: row {i}: language {lang!r}: empty text")
            row[lang] = text.strip()
        rows.append(row)
        if max_samples is not None and len(rows) >= max_samples:
            break
    if not rows:
        raise DataError(f"{where}: no rows for split {split!r}")
    return PromptSet(tuple(languages), tuple(rows), where)


def available_languages(source: str) -> list[str]:
    """Language codes present in every row of a source."""
    raw, _ = _read_rows(source)
    keys = None
    for _, obj in raw:
        ks = {k for k, v in obj.items()
              if isinstance(v, str) and k not in ("id", "split", "output")}
        keys = ks if keys is None else keys & ks
    return sorted(keys or [])
