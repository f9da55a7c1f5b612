"""The ``lens-merge`` command: one entry point, thin subcommands over the library.

Each submodule defines ``register(app)``; they are listed here explicitly.
"""

from __future__ import annotations

import sys

import typer

from lens_merge import __version__

app = typer.Typer(
    name="lens-merge",
    help="Lens multilingual enhancement -> delta -> standalone checkpoint -> GGUF/ONNX -> Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lens-merge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """lens-merge command line."""


def _register_all() -> None:
    from lens_merge.cli import export, fold, lens, release, run

    for mod in (lens, fold, export, release, run):
        mod.register(app)


_register_all()


def main() -> None:
    """Console entry point: library errors become one clean line and exit code 1."""
    from lens_merge.errors import LensMergeError

    try:
        app()
    except LensMergeError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
