"""CLI commands: ``lens-merge card RELEASE_DIR`` and ``lens-merge push RELEASE_DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ReleaseDir = Annotated[Path, typer.Argument(help="release folder made by `lens-merge run`",
                                            exists=True, file_okay=False, dir_okay=True)]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def card(
    release_dir: ReleaseDir,
    repo_id: Annotated[str | None, typer.Option(
        "--repo-id", help="Hub repo the usage snippets name (default: the recipe's "
                          "release.repo_id, else a placeholder that push fills in)")] = None,
) -> None:
    """Write RELEASE_DIR/README.md (model card) and its two pictures under report/."""
    from lens_merge.cli._common import console, progress
    from lens_merge.release.card import write_card

    path = write_card(release_dir, repo_id=repo_id, progress=progress())
    console.print(f"wrote {path}", soft_wrap=True, highlight=False)
    for png in ("report/states_2d.png", "report/losses.png"):
        p = release_dir / png
        console.print(f"  {png}: {'written' if p.is_file() else 'missing (no input data)'}")


def push(
    release_dir: ReleaseDir,
    repo_id: Annotated[str, typer.Option("--repo-id", help="namespace/name on the Hub")],
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
    revision: Annotated[str | None, typer.Option("--revision",
                                                 help="branch to commit to")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr",
                                            help="open a pull request")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the file list and the card; contact nothing")] = False,
) -> None:
    """Publish a release folder in one commit (token: HF_TOKEN or the login cache)."""
    from lens_merge.cli._common import console, progress
    from lens_merge.release.push import push as do_push

    res = do_push(release_dir, repo_id, private=private, revision=revision,
                  create_pr=create_pr, dry_run=dry_run, progress=progress())
    out = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"{repo_id}: {len(res['files'])} files, {_size(res['total_bytes'])}", **out)
    for f in res["files"]:
        console.print(f"  {_size(f['size']):>10}  {f['path']}", **out)
    if dry_run:
        console.rule("README.md")
        console.print(res["card"], **out)
        console.rule()
        console.print("dry run: nothing was uploaded and no server was contacted")
        return
    console.print(f"commit: {res['commit_url']}", **out)
    if res.get("pr_url"):
        console.print(f"pull request: {res['pr_url']}", **out)


def register(app: typer.Typer) -> None:
    """Add ``card`` and ``push`` to the root app."""
    app.command("card")(card)
    app.command("push")(push)
