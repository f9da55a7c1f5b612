"""Which prompts a parity check runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lens_merge.records import FOLD_PROVENANCE_FILE as FOLD_PROVENANCE


def checkpoint_languages(checkpoint: str | Path) -> list[str] | None:
    """The Lens languages recorded in a folded checkpoint's ``lens_merge.json`` (or None).

    Looks at ``delta.languages`` first, then a top-level ``languages``. An unreadable file
    counts as no record: the verifier then falls back to the default languages.
    """
    p = Path(checkpoint) / FOLD_PROVENANCE
    if not p.is_file():
        return None
    try:
        prov = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(prov, dict):
        return None
    delta = prov.get("delta") if isinstance(prov.get("delta"), dict) else {}
    langs = delta.get("languages") or prov.get("languages")
    if isinstance(langs, list) and langs and all(isinstance(x, str) for x in langs):
        return list(langs)
    return None


def parity_prompts(
    languages: Sequence[str] | None = None,
    per_language: int = 1,
    prompts: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    by_row: bool = True,
) -> list[tuple[str, str]]:
    """``(language, text)`` pairs for a parity check.

    Args:
        languages: languages to prompt in; default: the checkpoint's Lens languages, else
            the default recipe's.
        per_language: held-out rows of the default data per language.
        prompts: explicit texts instead (labelled ``custom``).
        checkpoint: the checkpoint whose provenance names its languages.
        by_row: order row by row (each row in every language) rather than language by
            language.

    Returns:
        The pairs, in a fixed order.
    """
    if prompts is not None:
        return [("custom", str(p)) for p in prompts]
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.data import load_prompts

    langs = list(languages or (checkpoint_languages(checkpoint) if checkpoint else None)
                 or DEFAULT_LANGUAGES)
    ps = load_prompts("default", langs, split="heldout", max_samples=per_language)
    if by_row:
        return [(lang, row[lang]) for row in ps.rows for lang in langs]
    return [(lang, row[lang]) for lang in langs for row in ps.rows]
