"""``lens-merge card RELEASE_DIR``: the model card (README.md) of a release folder.

The card is written at ``RELEASE_DIR/README.md`` and names files by their paths in the Hub
repository (see ``lens_merge.release.push``): the folded model at the top level, GGUF files at the
top level, ``onnx/``, ``delta/``, ``adapters/`` and ``report/``. Because these keep their names in
the repository, the card's links and pictures work both locally and on the Hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lens_merge.release._render as _render
import lens_merge.release.manifest as manifest
from lens_merge import records
from lens_merge.errors import PublishError, RecordError
from lens_merge.files import write_text_atomic
from lens_merge.progress import NULL, Progress
from lens_merge.records import ReleaseLayout
from lens_merge.release.secrets import scrub
from lens_merge.release.verification import release_parity

CARD_NAME = "README.md"
STATES_PNG = "report/states_2d.png"
LOSSES_PNG = "report/losses.png"
MEAN_STATES = "report/mean_states.safetensors"
TRAIN_LOG = "report/train_log.jsonl"
REPORT = "report/lens_report.json"
REPO_PLACEHOLDER_PREFIX = "your-username/"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_json(path: Path, required: bool = False) -> Any:
    """Read a JSON file; None when absent and not required.

    Raises:
        PublishError: when the file is required and missing, or is not valid JSON.
    """
    if not path.is_file():
        if required:
            raise PublishError(f"{path}: missing (the release folder is incomplete; rerun "
                               "`lens-merge run` for the stage that writes it)")
        return None
    try:
        return records.read_json(path)
    except RecordError as exc:
        raise PublishError(str(exc)) from None


def read_recipe(release_dir: Path) -> dict | None:
    """The release's ``recipe.yaml`` as a dict, or None when there is none."""
    import yaml

    p = release_dir / "recipe.yaml"
    if not p.is_file():
        return None
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PublishError(f"{p}: invalid YAML ({exc})") from exc
    return data if isinstance(data, dict) else None


def model_name(release_dir: Path, recipe: dict | None) -> str:
    """Display name: ``release.model_name``, else the recipe name, else the folder name."""
    recipe = recipe or {}
    return ((recipe.get("release") or {}).get("model_name") or recipe.get("name")
            or Path(release_dir).resolve().name)


def _front_matter_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - a broken base README only loses the license hint
        return None
    lic = meta.get("license")
    return lic if isinstance(lic, str) else None


def base_model_info(delta_meta: dict) -> dict[str, Any]:
    """Where the base came from: Hub id for ``base_model``, license, local directory.

    ``default`` reads ``lens_merge_default.json`` of the default checkpoint; a local directory
    gives its config's ``_name_or_path`` when that is a Hub id, else the directory name. The
    license comes from ``lens_merge_default.json``, else the base README front matter, else
    ``other``.

    Returns:
        ``{"ref", "base_model", "license", "dir"}``.
    """
    from lens_merge.default_model import (
        BASE_MODEL_ID,
        BASE_MODEL_LICENSE,
        MARKER,
        default_model_dir,
    )

    base = delta_meta.get("base") or {}
    ref = str(base.get("ref") or base.get("path") or "")
    dirs = [Path(base["path"])] if base.get("path") else []
    if ref == "default":
        dirs.append(default_model_dir())
    elif ref:
        dirs.append(Path(ref).expanduser())
    base_dir = next((d for d in dirs if (d / "config.json").is_file()), None)
    marker = next((json.loads((d / MARKER).read_text()) for d in dirs if (d / MARKER).is_file()),
                  None)
    base_model = lic = None
    if marker:
        base_model, lic = marker.get("base_model"), marker.get("license")
    if not base_model and ref == "default":
        base_model, lic = BASE_MODEL_ID, lic or BASE_MODEL_LICENSE
    if not base_model and base_dir is not None:
        name = json.loads((base_dir / "config.json").read_text()).get("_name_or_path") or ""
        if _HUB_ID.match(name) and not Path(name).exists():
            base_model = name
    if not base_model:
        base_model = Path(ref).name if ref else "unknown"
    if not lic and base_dir is not None:
        lic = _front_matter_license(base_dir / "README.md")
    return {"ref": ref, "base_model": base_model, "license": lic or "other", "dir": base_dir}


def _draw_pictures(root: Path, progress: Progress) -> dict[str, bool]:
    from lens_merge.release.plots import plot_losses, plot_states

    have = {}
    with progress.task("card pictures", total=2) as task:
        for png, src, fn in ((STATES_PNG, MEAN_STATES, plot_states),
                             (LOSSES_PNG, TRAIN_LOG, plot_losses)):
            if (root / src).is_file():
                fn(root / src, root / png)
            have[png] = (root / png).is_file()
            task.advance()
    return have


def _chat_template(model_dir: Path) -> bool:
    if any((model_dir / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
        return True
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            return bool(json.loads(cfg.read_text()).get("chat_template"))
        except json.JSONDecodeError:
            return False
    return False


def _onnx_file(onnx_dir: Path) -> str | None:
    files = sorted(p.name for p in onnx_dir.glob("*.onnx")) if onnx_dir.is_dir() else []
    if not files:
        return None
    return "model.onnx" if "model.onnx" in files else files[0]


def _adapters(d: Path) -> dict[str, Any]:
    """What ``adapters/`` holds: the PEFT folder, the LoRA GGUF, the control vectors."""
    if not d.is_dir():
        return {}
    ggufs = sorted(p.name for p in d.glob("*.gguf"))
    return {"peft": (d / "peft" / "adapter_config.json").is_file(),
            "gguf_lora": next((g for g in ggufs if "-LoRA-" in g), None),
            "control_vectors": [g for g in ggufs if "-cv-" in g]}


def gather(release_dir: Path, recipe: dict | None = None,
           repo_id: str | None = None) -> dict[str, Any]:
    """Collect everything the card shows from a release folder (no pictures drawn).

    Raises:
        PublishError: when ``delta/lens_delta.json`` or ``model/config.json`` is missing.
    """
    root = Path(release_dir)
    if not root.is_dir():
        raise PublishError(f"{root}: release folder not found")
    if not (root / "model" / "config.json").is_file():
        raise PublishError(f"{root / 'model'}: no folded checkpoint (config.json missing); run "
                           "the fold stage first")
    delta = read_json(root / "delta" / "lens_delta.json", required=True)
    recipe = recipe if recipe is not None else read_recipe(root)
    name = model_name(root, recipe)
    base = base_model_info(delta)
    release = (recipe or {}).get("release") or {}
    if release.get("license"):
        base["license"] = release["license"]
    repo = repo_id or release.get("repo_id") or f"{REPO_PLACEHOLDER_PREFIX}{name}"
    gguf_dir = root / "gguf"
    ggufs = sorted(gguf_dir.glob("*.gguf")) if gguf_dir.is_dir() else []
    verify = release_parity(ReleaseLayout(root=root))
    onnx_file = _onnx_file(root / "onnx")
    languages = list(delta.get("languages") or (recipe or {}).get("languages") or [])
    model_cfg = read_json(root / "model" / "config.json") or {}
    return {
        "root": root, "name": name, "repo_id": repo, "delta": delta, "recipe": recipe,
        "base": base, "languages": languages,
        "num_layers": (delta.get("base") or {}).get("num_hidden_layers")
        or model_cfg.get("num_hidden_layers"),
        "report": read_json(root / REPORT), "verify": verify,
        "ggufs": [(p.name, p.stat().st_size) for p in ggufs], "onnx_file": onnx_file,
        "chat_template": _chat_template(root / "model"), "adapters": _adapters(root / "adapters"),
        "cv_effect": read_json(root / ReleaseLayout(root=root).cv_effect),
        "fold_meta": read_json(root / "model" / "lens_merge.json"),
        "bench": read_bench_report(root),
    }


def read_bench_report(release_dir: Path):
    """The release's ``report/bench.json`` as a ``BenchReport``, or None when absent.

    Raises:
        PublishError: when the file is there but is not a valid bench report.
    """
    from lens_merge.bench.record import read_bench

    p = ReleaseLayout(root=Path(release_dir)).path("bench_report")
    if not p.is_file():
        return None
    try:
        return read_bench(p)
    except RecordError as exc:
        raise PublishError(str(exc)) from None


def bench_section(info: dict[str, Any]) -> list[str]:
    """The card's ``## Benchmarks`` lines (base vs Lens per task and metric); [] without
    ``report/bench.json``."""
    from lens_merge.bench.summary import markdown

    return markdown(info.get("bench"))


def card_metadata(info: dict[str, Any]):
    """The card's front matter as ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    tags = ["lens", "lens-merge", "multilingual"]
    if info["ggufs"]:
        tags.append("gguf")
    if info["onnx_file"]:
        tags.append("onnx")
    bench = {}
    if info.get("bench") is not None:
        from lens_merge.bench.summary import eval_results

        results = eval_results(info["bench"])
        if results:  # model-index: the Lens model's lm-eval scores
            bench = {"eval_results": results, "model_name": info["name"]}
    return ModelCardData(
        base_model=info["base"]["base_model"], base_model_relation="finetune",
        language=info["languages"], license=info["base"]["license"],
        library_name="transformers", pipeline_tag="text-generation", tags=tags, **bench,
    )


def write_card(release_dir: str | Path, recipe: dict | None = None, *,
               repo_id: str | None = None, progress: Progress = NULL) -> Path:
    """Write ``RELEASE_DIR/README.md`` (and the two pictures it shows under ``report/``).

    Args:
        release_dir: the release folder ``lens-merge run`` made.
        recipe: the recipe as a dict; default: the folder's ``recipe.yaml``.
        repo_id: the Hub repository the usage snippets name; default ``release.repo_id`` of
            the recipe, else a ``your-username/<Name>`` placeholder that ``push`` replaces.
        progress: progress reporter.

    Returns:
        The path of the card.

    Raises:
        PublishError: when the folder lacks the delta json or the folded model, or the card
            does not parse back with ``ModelCard``.
    """
    from huggingface_hub import ModelCard

    root = Path(release_dir)
    info = gather(root, recipe, repo_id)
    info["pictures"] = _draw_pictures(root, progress)
    data = card_metadata(info)
    body = _render.body(info)
    if "## Benchmarks" not in body:  # until _render.body places bench_section itself
        body += "\n" + "\n".join(bench_section(info))
    text = f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n"
    text = scrub(text)
    try:
        ModelCard(text)
    except ValueError as exc:
        raise PublishError(f"generated card for {root} does not parse: {exc}") from exc
    out = root / CARD_NAME
    write_text_atomic(out, text)
    manifest.record(ReleaseLayout(root=root), "card",
                    [out, *(root / png for png, drawn in info["pictures"].items() if drawn)])
    return out
