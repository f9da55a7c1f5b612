"""The sweep as a markdown table (``sweep.md``), and the README block it regenerates.

``update_readme`` replaces the text between ``<!-- sweep:begin -->`` and ``<!-- sweep:end -->``
(both kept) with the table.
"""

from __future__ import annotations

from pathlib import Path

from lens_merge.errors import ConfigError
from lens_merge.files import write_text_atomic
from lens_merge.sweep.grid import format_value
from lens_merge.sweep.record import BaseLens, SweepRecord

BEGIN = "<!-- sweep:begin -->"
END = "<!-- sweep:end -->"
MISSING = "-"
_METRIC_NAMES = {"first_token_mass": "first-token target mass", "lpr": "LPR",
                 "fidelity": "fidelity"}


def _f(x: float | None, fmt: str) -> str:
    return MISSING if x is None else format(x, fmt)


def _arrow(m: BaseLens, fmt: str = ".3f") -> str:
    if m.base is None or m.lens is None:
        return MISSING
    return f"{m.base:{fmt}} → {m.lens:{fmt}}"


def table_rows(rec: SweepRecord) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: one row per point (grid order), one column per grid key,
    then English KL(base||lens), English top-1 agreement, English replies identical to the
    base's, mean target LPR and first-token mass base -> lens, target languages up, the cache
    (``rebuilt`` when the point built one), and whether the point is on the Pareto front."""
    keys = list(rec.grid)
    head = ["#", *keys, "English KL", "English top-1", "English identical",
            "target LPR base → lens", "first-token mass base → lens", "languages up",
            "cache", "Pareto"]
    rows = []
    for p in rec.points:
        m = p.metrics
        up = (MISSING if m.languages_up is None
              else f"{m.languages_up}/{m.languages_total}")
        rows.append([str(p.index + 1), *(format_value(p.overrides.get(k)) for k in keys),
                     _f(m.english_kl, ".3g"), _f(m.english_top1, ".1%"),
                     _f(m.english_identical, ".1%"), _arrow(m.lpr), _arrow(m.first_token_mass),
                     up, "rebuilt" if p.cache == "built" else "reused",
                     "yes" if p.pareto else ""])
    return head, rows


def render_table(rec: SweepRecord) -> str:
    """The markdown table of ``table_rows`` with a one-line caption above it.

    Returns:
        The caption, a blank line and the table, ending with a newline.
    """
    head, rows = table_rows(rec)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return caption(rec) + "\n\n" + "\n".join(lines) + "\n"


def caption(rec: SweepRecord) -> str:
    """One line saying what the table is: recipe, points, prompts, cache builds, metrics."""
    n = next((p.metrics.n_prompts for p in rec.points if p.metrics.n_prompts), None)
    up = _METRIC_NAMES.get(rec.up_metric or "", rec.up_metric or "n/a")
    gain = _METRIC_NAMES.get(rec.gain_metric or "", rec.gain_metric or "n/a")
    return (f"Sweep of `{rec.recipe}`: {len(rec.points)} of {rec.grid_points} grid points, "
            f"{n if n is not None else '?'} held-out prompts per language, "
            f"{rec.cache_builds} training cache build(s); languages up counted on {up}, "
            f"Pareto front on English KL vs {gain} gain (lens - base).")


def check_markers(path: str | Path) -> str:
    """Read a README and check it holds one ``sweep:begin`` marker before one ``sweep:end``.

    Returns:
        The file's text.

    Raises:
        ConfigError: naming the file and the missing or misplaced marker.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--readme {p}: cannot be read ({exc})") from None
    for marker in (BEGIN, END):
        n = text.count(marker)
        if n != 1:
            raise ConfigError(f"--readme {p}: expected one '{marker}' line, found {n}; add "
                              f"'{BEGIN}' and '{END}' where the sweep table goes")
    if text.index(BEGIN) > text.index(END):
        raise ConfigError(f"--readme {p}: '{END}' comes before '{BEGIN}'")
    return text


def update_readme(path: str | Path, table: str) -> Path:
    """Replace what lies between the sweep markers of ``path`` with ``table`` (atomically).

    Raises:
        ConfigError: when the markers are missing (see ``check_markers``).
    """
    text = check_markers(path)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(path, f"{head}{BEGIN}\n{table.strip()}\n{END}{tail}")
    return Path(path)
