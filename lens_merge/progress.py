"""Progress reporting without printing from the library.

Library functions take a ``Progress`` and call ``progress.task(...)``; the default is silent.
The CLI passes ``RichProgress``, which draws rich progress bars on stderr.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Any:
        """A context manager yielding a ``Task``."""
        ...


class _NullTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        return None


class NullProgress:
    """Reports nothing (the library default)."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[_NullTask]:
        yield _NullTask()


class _RichTask:
    def __init__(self, bar, task_id) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in fields.items())
        self._bar.update(self._id, advance=n, info=info)


class RichProgress:
    """rich progress bars on stderr, one per task; extra fields (losses) shown beside the bar."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[_RichTask]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}"),
                       console=Console(stderr=True), disable=self.disable, transient=False)
        with bar:
            tid = bar.add_task(description, total=total, info="")
            yield _RichTask(bar, tid)


NULL = NullProgress()
