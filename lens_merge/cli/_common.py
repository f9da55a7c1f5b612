"""Helpers shared by CLI commands: console, progress, tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def progress():
    from lens_merge.progress import RichProgress

    return RichProgress()


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{x:.4g}" if isinstance(x, float) else str(x) for x in r])
    return t


def print_parity(report, rows_title: str | None = None, rows: list[list] | None = None,
                 columns: list[str] | None = None) -> None:
    """Print a ``ParityReport`` (or every report of a ``ParitySet``) the same way everywhere:
    an optional per-prompt/per-language table, each check with its limit, then the verdict."""
    reports = getattr(report, "reports", None) or [report]
    if rows:
        console.print(table(rows_title or "parity", columns or [], rows))
    for r in reports:
        label = f"{r.kind} {r.variant}" if r.variant else r.kind
        checks = "  ".join(c.describe() for c in r.checks)
        console.print(f"[bold]{label}[/]: {checks}", highlight=False)
        if r.passed:
            console.print(f"[bold green]{label}: verification passed[/]", highlight=False)
        else:
            console.print(f"[bold red]{label}: verification FAILED:[/] "
                          f"{'; '.join(r.failures)}", highlight=False)
