"""``lens-merge push RELEASE_DIR --repo-id NAME``: one commit of a release folder to the Hub.

Repository layout (assembled in a staging folder of hardlinks, copies where links fail):

- ``model/*`` at the top level, so ``from_pretrained(repo)`` works, with the card as
  ``README.md`` and the ``recipe.yaml``;
- ``gguf/*.gguf`` at the top level (``<Name>-<TYPE>.gguf``);
- ``onnx/*``, ``delta/*``, ``adapters/*`` and ``report/*`` under the same folder names as in the
  release folder (the card names them so, locally and on the Hub).

The token comes from the ``token`` argument, ``HF_TOKEN`` or the login cache; it is never
logged, returned or written, and it is scrubbed from the errors raised here. The endpoint comes
from the ``endpoint`` argument or ``HF_ENDPOINT``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import lens_merge.release.manifest as manifest
from lens_merge.errors import PublishError
from lens_merge.progress import NULL, Progress
from lens_merge.records import ReleaseLayout
from lens_merge.release.card import CARD_NAME, read_recipe
from lens_merge.release.secrets import find_secret, scrub
from lens_merge.release.verification import failures as verification_failures

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"your-username/[A-Za-z0-9._-]+")


class UploadItem(NamedTuple):
    """One file of the upload: where it is, where it goes in the repository, its size."""

    local: Path
    path_in_repo: str
    size: int


def _repo_path(rel: str) -> str:
    """Where a release file goes in the Hub repository."""
    top, _, rest = rel.partition("/")
    if top == "model" and rest:
        return rest
    if top == "gguf" and rest:
        return rest if rest.endswith(".gguf") and "/" not in rest else rel
    return rel


def repo_layout(release_dir: str | Path) -> list[UploadItem]:
    """Map the files the release made (its manifest) to repository paths.

    Only files listed in the release's manifest travel, each checked to be the regular file
    the pipeline wrote (no symlink, same size and sha256).

    Raises:
        PublishError: no manifest, a listed file missing/changed/linked, or two files that
            would land on the same repository path.
    """
    root = Path(release_dir)
    pairs: list[tuple[Path, str]] = []
    for f, rel in manifest.checked_files(ReleaseLayout(root=root)):
        if rel == f"model/{CARD_NAME}":
            continue  # the release card wins over a README inside model/
        pairs.append((f, _repo_path(rel)))
    seen: dict[str, Path] = {}
    for local, rp in pairs:
        if rp in seen:
            raise PublishError(f"{local} and {seen[rp]} would both be uploaded as {rp!r}; "
                               "rename one of them")
        seen[rp] = local
    return sorted((UploadItem(p, rp, p.stat().st_size) for p, rp in pairs),
                  key=lambda it: it.path_in_repo)


def check_release(release_dir: str | Path) -> None:
    """Refuse folders that must not be published.

    Raises:
        PublishError: when ``model/`` or the card is missing, or a verification record
            (fold, GGUF, ONNX) says a check failed.
    """
    root = Path(release_dir)
    if not root.is_dir():
        raise PublishError(f"{root}: release folder not found")
    if not (root / "model" / "config.json").is_file():
        raise PublishError(f"{root / 'model'}: missing or without config.json; the folded "
                           "checkpoint is what gets published (run the fold stage first)")
    if not (root / CARD_NAME).is_file():
        raise PublishError(f"{root / CARD_NAME}: no model card; run `lens-merge card {root}` "
                           "first")
    bad = verification_failures(ReleaseLayout(root=root))
    if bad:
        raise PublishError(f"verification failed ({'; '.join(bad[:3])}); refusing to publish. "
                           "Fix the export and rerun its check.")


def plan_upload(release_dir: str | Path) -> list[UploadItem]:
    """Check a release folder and list what would be uploaded.

    Returns:
        ``UploadItem`` tuples (local path, path in repo, size), sorted by repository path.

    Raises:
        PublishError: see ``check_release`` and ``repo_layout``.
    """
    check_release(release_dir)
    return repo_layout(release_dir)


def staged_card(release_dir: str | Path, repo_id: str) -> str:
    """The card as it will be uploaded: usage snippets naming ``repo_id``."""
    root = Path(release_dir)
    text = (root / CARD_NAME).read_text(encoding="utf-8")
    text = _PLACEHOLDER.sub(repo_id, text)
    old = ((read_recipe(root) or {}).get("release") or {}).get("repo_id")
    if old and old != repo_id:
        text = text.replace(f'"{old}"', f'"{repo_id}"').replace(f" {old} ", f" {repo_id} ")
    return text


def stage(plan: list[UploadItem], dest: Path, card_text: str,
          progress: Progress = NULL) -> int:
    """Build the repository tree in ``dest``: hardlinks (copies where linking fails).

    Returns:
        The number of files copied rather than linked.
    """
    copied = 0
    with progress.task("stage upload", total=len(plan)) as task:
        for it in plan:
            target = dest / it.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            if it.path_in_repo == CARD_NAME:
                target.write_text(card_text, encoding="utf-8")
            else:
                try:
                    os.link(it.local, target)
                except OSError:
                    shutil.copy2(it.local, target)
                    copied += 1
            task.advance()
    return copied


def find_secrets(plan: list[UploadItem], card_text: str, token: str | None) -> list[str]:
    """``path: why`` for every file of the upload that holds the token or a token-shaped
    string (every file, any suffix, binary included; read in overlapping chunks)."""
    found = []
    why = find_secret(card_text.encode("utf-8"), token)
    if why:
        found.append(f"{CARD_NAME}: {why}")
    overlap = 64
    for it in plan:
        if it.path_in_repo == CARD_NAME:
            continue
        with open(it.local, "rb") as fh:
            tail = b""
            while block := fh.read(16 << 20):
                why = find_secret(tail + block, token)
                if why:
                    found.append(f"{it.local}: {why}")
                    break
                tail = block[-overlap:]
    return found


def _describe(exc: BaseException) -> str:
    """The exception and its causes on one line, each distinct message once."""
    parts: list[str] = []
    e: BaseException | None = exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = " ".join(str(e).split())
        if msg and not any(msg in p or p.split(": ", 1)[-1] in msg for p in parts):
            parts.append(f"{type(e).__name__}: {msg}")
        e = e.__cause__ or e.__context__
    return " <- ".join(parts) or type(exc).__name__


@contextmanager
def _endpoint_scope(endpoint: str) -> Iterator[None]:
    """Make huggingface_hub parse URLs of ``endpoint`` (it reads HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    old = constants.ENDPOINT
    constants.ENDPOINT = endpoint
    try:
        yield
    finally:
        constants.ENDPOINT = old


def push(
    release_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Progress = NULL,
) -> dict[str, Any]:
    """Publish a release folder as one commit: ``create_repo(exist_ok=True)``, ``upload_folder``.

    Args:
        release_dir: the release folder (with its card, see ``lens-merge card``).
        repo_id: ``namespace/name`` on the Hub.
        private: create the repository private (ignored when it exists).
        revision: branch to commit to (created from ``main`` when missing).
        create_pr: open a pull request instead of committing to the branch.
        dry_run: list files and return the card without contacting anything.
        token: Hub token; default ``HF_TOKEN`` or the login cache.
        endpoint: Hub URL; default ``HF_ENDPOINT`` or huggingface.co.
        progress: progress reporter (staging).

    Returns:
        ``{"repo_id", "revision", "files": [{"path", "size"}], "total_bytes", "dry_run"}`` plus
        ``card`` (dry run) or ``repo_url``, ``commit_url``, ``oid``, ``pr_url`` and ``endpoint``.

    Raises:
        PublishError: on a refused folder, a missing token, or any Hub error (token scrubbed).
    """
    if not repo_id or not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", repo_id):
        raise PublishError(f"--repo-id {repo_id!r}: expected 'namespace/name'")
    root = Path(release_dir)
    plan = plan_upload(root)
    card_text = staged_card(root, repo_id)
    card_size = len(card_text.encode("utf-8"))
    files = [{"path": it.path_in_repo,
              "size": card_size if it.path_in_repo == CARD_NAME else it.size} for it in plan]
    result: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "files": files,
                              "total_bytes": sum(f["size"] for f in files), "dry_run": dry_run}
    from huggingface_hub import HfApi, constants, get_token

    from lens_merge import __version__

    token = token or get_token()
    secrets = find_secrets(plan, card_text, token)
    if secrets:
        raise PublishError(f"refusing to publish: {'; '.join(secrets)}. Remove it from the "
                           "release (nothing was uploaded)")
    if dry_run:
        return result | {"card": card_text}
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set; unset it to push to the Hub")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token, library_name="lens-merge",
                library_version=__version__)
    staging = Path(tempfile.mkdtemp(prefix=".push-staging-", dir=root))
    step = "staging the files"
    try:
        copied = stage(plan, staging, card_text, progress)
        logger.debug("staged %d files (%d copied) in %s", len(plan), copied, staging)
        with _endpoint_scope(endpoint):
            step = "creating the repository"
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != constants.DEFAULT_REVISION:
                step = f"creating branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            step = "uploading"
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(staging), repo_type="model",
                revision=revision, create_pr=create_pr,
                commit_message=f"Upload {root.resolve().name} with lens-merge",
                commit_description=f"Lens release made with lens-merge {__version__}.")
    except Exception as exc:  # noqa: BLE001 - every Hub/transport error becomes one message
        msg = scrub(_describe(exc), token)
        raise PublishError(
            f"push to {repo_id} at {endpoint} failed while {step}: {msg}. No commit was made; "
            "run the same command again to retry (LFS files already uploaded are not sent "
            "again).") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.debug("committed %s", info.oid)
    return result | {"repo_url": str(url), "commit_url": info.commit_url, "oid": info.oid,
                     "pr_url": info.pr_url, "endpoint": endpoint}
