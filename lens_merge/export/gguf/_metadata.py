"""The ``general.*`` block: name, basename, finetune, size label, license, languages, tags and
``general.base_model.*``, from explicit metadata and the checkpoint's Lens provenance.

The fold stage writes ``lens_merge.json`` next to the folded weights; it carries the Lens
delta's ``lens_delta.json`` (under ``delta``), whose ``base.ref`` names the base model and
whose ``languages`` are the languages Lens was trained on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lens_merge.default_model import BASE_MODEL_ID, BASE_MODEL_LICENSE, default_model_dir
from lens_merge.default_model import MARKER as DEFAULT_MARKER
from lens_merge.errors import ExportError
from lens_merge.weights.fold import PROVENANCE_FILE as PROVENANCE

ALLOWED_KEYS = {"name", "basename", "finetune", "version", "license", "languages", "tags",
                "base_models", "description", "author", "organization", "url", "repo_url"}
BASE_KEYS = {"name", "organization", "repo_url", "version", "author", "url"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _delta_meta(prov: dict) -> dict:
    """The Lens delta record inside a fold provenance (several spellings accepted)."""
    for key in ("delta", "lens_delta", "lens"):
        v = prov.get(key)
        if isinstance(v, dict):
            return v.get("meta") if isinstance(v.get("meta"), dict) else v
    return prov


def _hub_base(repo_id: str) -> dict:
    org, name = repo_id.split("/", 1)
    return {"name": name, "organization": org, "repo_url": f"https://huggingface.co/{repo_id}"}


def describe_base(ref: str | None, path: str | None = None) -> tuple[dict | None, str | None]:
    """``general.base_model.*`` entry and license for a base model reference.

    ``default`` and directories materialized from a Hub model (holding
    ``lens_merge_default.json``) resolve to their Hub id; other directories give their name.

    Returns:
        (base entry or None, license or None)
    """
    if not ref:
        return None, None
    candidates = [p for p in (path, ref) if p]
    if ref == "default":
        candidates.insert(0, str(default_model_dir()))
    for c in candidates:
        marker = Path(c).expanduser() / DEFAULT_MARKER
        if marker.is_file():
            m = _read_json(marker)
            hub = m.get("base_model")
            if isinstance(hub, str) and _HUB_ID.match(hub):
                return _hub_base(hub), m.get("license")
    if ref == "default":
        return _hub_base(BASE_MODEL_ID), BASE_MODEL_LICENSE
    if _HUB_ID.match(ref) and not Path(ref).expanduser().exists():
        return _hub_base(ref), None
    return {"name": Path(ref).expanduser().name}, None


def provenance_metadata(model_dir: Path) -> dict[str, Any]:
    """Metadata implied by the checkpoint's ``lens_merge.json`` (empty when absent)."""
    p = model_dir / PROVENANCE
    if not p.is_file():
        marker = model_dir / DEFAULT_MARKER
        if marker.is_file():  # the materialized default model itself
            m = _read_json(marker)
            hub = m.get("base_model", "")
            out: dict[str, Any] = {"license": m.get("license")}
            if _HUB_ID.match(hub):
                out.update(name=hub.split("/", 1)[1], organization=hub.split("/", 1)[0])
            return {k: v for k, v in out.items() if v}
        return {}
    prov = _read_json(p)
    delta = _delta_meta(prov)
    base = next((b for b in (delta.get("base"), prov.get("base")) if isinstance(b, dict)), {})
    entry, lic = describe_base(base.get("ref"), base.get("path"))
    out = {"finetune": "lens", "tags": ["lens", "lens-merge", "multilingual"]}
    langs = delta.get("languages") or prov.get("languages")
    if isinstance(langs, list) and langs:
        out["languages"] = [str(x) for x in langs]
    if entry:
        out["base_models"] = [entry]
        out["basename"] = entry["name"]
    if lic or prov.get("license"):
        out["license"] = prov.get("license") or lic
    return out


def _size_label(n_params: int) -> str:
    try:
        from gguf.utility import size_label

        return size_label(n_params, n_params, 0, 0)
    except ImportError:  # pragma: no cover - very old gguf
        return f"{round(n_params / 1e6)}M"


def resolve_metadata(model_dir: Path, metadata: dict | None, n_params: int) -> dict[str, Any]:
    """The ``general.*`` values: explicit ``metadata`` over provenance over defaults.

    Raises:
        ExportError: for an unknown metadata key or a malformed ``base_models`` entry.
    """
    metadata = dict(metadata or {})
    unknown = sorted(set(metadata) - ALLOWED_KEYS)
    if unknown:
        raise ExportError(f"metadata: unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(ALLOWED_KEYS))}")
    for i, b in enumerate(metadata.get("base_models") or []):
        if not isinstance(b, dict) or "name" not in b or set(b) - BASE_KEYS:
            raise ExportError(f"metadata: base_models[{i}] must be an object with 'name' and "
                              f"optionally {', '.join(sorted(BASE_KEYS - {'name'}))}")
    out = provenance_metadata(model_dir)
    out.update({k: v for k, v in metadata.items() if v is not None})
    if "name" not in out:
        d = model_dir.resolve()
        out["name"] = d.parent.name if d.name in ("model", "folded") else d.name
    out.setdefault("basename", out["name"])
    out["size_label"] = _size_label(n_params)
    return out


def write_general(w, meta: dict[str, Any]) -> None:
    """Add the ``general.*`` keys (other than architecture/file_type) to a GGUFWriter."""
    w.add_type("model")
    w.add_name(meta["name"])
    simple = {"basename": w.add_basename, "finetune": w.add_finetune,
              "version": w.add_version, "size_label": w.add_size_label,
              "license": w.add_license, "description": w.add_description,
              "author": w.add_author, "organization": w.add_organization,
              "url": w.add_url, "repo_url": w.add_repo_url}
    for key, add in simple.items():
        if meta.get(key):
            add(str(meta[key]))
    bases = meta.get("base_models") or []
    if bases:
        w.add_base_model_count(len(bases))
        for i, b in enumerate(bases):
            w.add_base_model_name(i, b["name"])
            for key in ("organization", "repo_url", "version", "author", "url"):
                if b.get(key):
                    getattr(w, f"add_base_model_{key}")(i, str(b[key]))
    if meta.get("tags"):
        w.add_tags([str(t) for t in meta["tags"]])
    if meta.get("languages"):
        w.add_languages([str(x) for x in meta["languages"]])
