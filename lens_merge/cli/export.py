"""CLI commands: ``lens-merge export gguf`` and ``lens-merge export onnx``."""

from __future__ import annotations

import typer

export_app = typer.Typer(help="Export a folded checkpoint (GGUF for llama.cpp, ONNX for ORT).",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the ``export`` command group to the root app."""
    from lens_merge.cli import export_adapters, export_gguf, export_lora, export_onnx

    export_gguf.register(export_app)
    export_onnx.register(export_app)
    export_lora.register(export_app)
    export_adapters.register(export_app)
    app.add_typer(export_app, name="export")
