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

In every format a language's text is the column ``input_<code>`` or, failing that, ``<code>``.
The row fields ``id``, ``split`` and ``output`` are never read as texts: Indonesian (``id``)
must be given as ``input_id``, so a row id is never taken for a prompt.
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
PREFIX = "input_"
ROW_FIELDS = ("id", "split", "output")  # row metadata, never language texts


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


def _columns(obj: dict) -> dict:
    """Language code -> value of a row: ``input_<code>`` first, then a bare ``<code>``
    that is not a row field (``id``, ``split``, ``output``)."""
    cols = {k[len(PREFIX):]: v for k, v in obj.items()
            if isinstance(k, str) and k.startswith(PREFIX) and len(k) > len(PREFIX)}
    for k, v in obj.items():
        if isinstance(k, str) and not k.startswith(PREFIX) and k not in ROW_FIELDS:
            cols.setdefault(k, v)
    return cols


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _loads(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        obj = _loads(line, f"{path}: row {i}")
        if not isinstance(obj, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object")
        out.append((i, obj))
    return out


def _read_reference_json(path: Path) -> list[tuple[int, dict]]:
    data = _loads(_read_text(path), str(path))
    if isinstance(data, dict) and "Instances" in data:
        items = data["Instances"]
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(f"{path}: expected a list of objects or an object with 'Instances'")
    if not isinstance(items, list):
        raise DataError(f"{path}: 'Instances' is a {type(items).__name__}, expected a list")
    rows = []
    for i, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object")
        rows.append((i, obj))
    return rows


def _read_hf_dataset(path: Path) -> list[tuple[int, dict]]:
    try:
        from datasets import load_from_disk
    except ImportError as exc:
        raise DataError(f"{path}: reading a saved HF dataset needs the 'datasets' package "
                        "(pip install 'lens-merge[datasets]')") from exc
    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # FileNotFoundError for a plain directory
        raise DataError(f"{path}: not a saved HF dataset directory ({exc})") from None
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    return [(i, dict(row)) for i, row in enumerate(ds, start=1)]


def _read_rows(source: str) -> tuple[list[tuple[int, dict]], str]:
    if source == DEFAULT:
        # named, not located: the install path means nothing on a model card
        return _read_jsonl(default_data_path()), DEFAULT_SOURCE
    try:
        p = Path(source).expanduser()
    except RuntimeError as exc:  # ~user with no home directory
        raise DataError(f"{source}: {exc}") from None
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except OSError as exc:  # a name too long, a permission denied on a parent
        raise DataError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if is_dir:
        return _read_hf_dataset(p), str(p)
    if not is_file:
        raise DataError(f"{p}: data file not found (expected 'default', a .jsonl/.json file or "
                        "a saved HF dataset directory)")
    if p.suffix == ".jsonl":
        return _read_jsonl(p), str(p)
    if p.suffix == ".json":
        return _read_reference_json(p), str(p)
    raise DataError(f"{p}: unknown data format {p.suffix!r} (expected .jsonl, .json or a "
                    "saved HF dataset directory)")


def _missing(where: str, i: int, lang: str, obj: dict, cols: dict) -> DataError:
    has = ", ".join(sorted(k for k, v in cols.items() if isinstance(v, str))) or "no texts"
    hint = ""
    if lang in ROW_FIELDS and lang in obj:
        hint = (f"; its {lang!r} field is the row's {lang}, not a text: give {lang!r} texts as "
                f"'{PREFIX}{lang}'")
    return DataError(f"{where}: row {i}: language {lang!r} missing (row has: {has}){hint}")


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
        cols = _columns(obj)
        row = {}
        for lang in languages:
            if lang not in cols:
                raise _missing(where, i, lang, obj, cols)
            text = cols[lang]
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
        ks = {k for k, v in _columns(obj).items() if isinstance(v, str)}
        keys = ks if keys is None else keys & ks
    return sorted(keys or [])
