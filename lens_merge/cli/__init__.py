"""The ``lens-merge`` command: one entry point, thin subcommands over the library.

Each submodule defines ``register(app)``; they are listed here explicitly.

Failure behaviour (``main``): a ``LensMergeError`` prints one line ``error: ...`` and exits 1;
an ``OSError`` (disk full, read-only, file too large, permission denied, a parent that is a
file) prints one line naming the path and exits 1; any other exception prints
``error: internal error: <type>: <message> (run with --debug for the traceback)`` and exits 2.
``lens-merge --debug ...`` (or ``LENS_MERGE_DEBUG=1``) shows the traceback as well.
"""

from __future__ import annotations

import os
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


_state = {"debug": False}


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of an error."),
) -> None:
    """lens-merge command line."""
    if debug:
        _state["debug"] = True


def _register_all() -> None:
    from lens_merge.cli import bench, export, fold, lens, plan, release, run, sweep

    for mod in (lens, fold, export, release, run, plan, sweep, bench):
        mod.register(app)


_register_all()


def _debugging() -> bool:
    return _state["debug"] or os.environ.get("LENS_MERGE_DEBUG", "") not in ("", "0")


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    line = " ".join(message.split())  # one line, whatever the message holds
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "bold red"), " ", line))


def _output_arg(argv: list[str]) -> str | None:
    """The output path named on the command line (for an OSError that names no file)."""
    names = ("-o", "--output", "--out", "--output-dir")
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for n in names[1:]:
            if arg.startswith(n + "="):
                return arg[len(n) + 1:]
    return None


def main() -> None:
    """Console entry point: every error becomes one clean line and a non-zero exit code."""
    from lens_merge.errors import LensMergeError

    _state["debug"] = False
    try:
        app()
        return
    except LensMergeError as exc:
        err, code, message = exc, 1, str(exc) or type(exc).__name__
    except OSError as exc:
        from lens_merge.guard import describe_os_error

        err, code = exc, 1
        message = describe_os_error(exc, _output_arg(sys.argv[1:]), action=None)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no bare traceback
        err, code = exc, 2
        message = (f"internal error: {type(exc).__name__}: {exc} "
                   "(run with --debug for the traceback)")
    if _debugging():
        import traceback

        traceback.print_exception(err)
    _print_error(message)
    sys.exit(code)
