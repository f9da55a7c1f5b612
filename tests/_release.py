"""Build a small but complete release folder (as ``lens-merge run`` lays it out) for hub tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

NAME = "TinyLens"
LANGS = ["en", "zh", "ja"]


def write_gguf(path: Path, n_rows: int = 64) -> None:
    """A small, valid GGUF file written with gguf's own writer."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_name(NAME)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(n_rows * 16, dtype=np.float32).reshape(n_rows, 16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_onnx(path: Path) -> bool:
    """A tiny valid ONNX graph (Identity); False when the onnx package is absent."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return False
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


def lens_report() -> dict:
    """A report shaped like ``lens_merge.lens.evaluate.evaluate`` writes it."""
    per = {"en": {"fidelity_base": 1.0, "fidelity_lens": 1.0},
           "zh": {"fidelity_base": 0.25, "fidelity_lens": 0.75, "agnostic_cosine_base": 0.5123,
                  "agnostic_cosine_lens": 0.6345, "agnostic_gap_base": 1.5,
                  "agnostic_gap_lens": 0.75, "own_direction_base": 0.125,
                  "own_direction_lens": 0.875},
           "ja": {"fidelity_base": 0.5, "fidelity_lens": 0.5, "agnostic_cosine_base": 0.4321,
                  "agnostic_cosine_lens": 0.5555, "agnostic_gap_base": 2.0,
                  "agnostic_gap_lens": 1.25, "own_direction_base": 0.25,
                  "own_direction_lens": 0.625}}

    def mean(k):
        return sum(per[x][k] for x in LANGS[1:]) / 2

    summary = {k: {"base": mean(f"{k}_base"), "lens": mean(f"{k}_lens")}
               for k in ("agnostic_cosine", "agnostic_gap", "own_direction", "fidelity")}
    summary |= {"english_kl": 0.0123, "english_kl_max": 0.0456, "english_top1_agreement": 0.9375,
                "english_fidelity": {"base": 1.0, "lens": 1.0}}
    return {"format": "lens-report", "format_version": 1, "languages": LANGS, "n_prompts": 16,
            "source": "default", "max_new_tokens": 32, "summary": summary, "per_language": per,
            "samples": {x: {"prompt": f"prompt in {x}", "base": ["b"], "lens": ["l"]}
                        for x in LANGS},
            "delta": {"tensors": 18, "blocks": [2, 3]}, "created": "2025-01-01T00:00:00+00:00",
            "tool": {"name": "lens-merge", "version": "0.1.0"}}


def build_release(root: Path, model_dir: Path, base_meta: dict | None = None,
                  gguf: bool = True, onnx: bool = True) -> Path:
    """Make ``root`` a release folder: model/, delta/, report/, gguf/, onnx/, recipe.yaml.

    Args:
        root: folder to create.
        model_dir: a tiny checkpoint, copied as the folded model.
        base_meta: replaces the delta's ``base`` record (where the base came from).
        gguf, onnx: include those exports and their verification records.
    """
    import torch
    import yaml
    from safetensors.torch import save_file

    from lens_merge.config import Recipe
    from lens_merge.testing import random_delta

    root.mkdir(parents=True)
    shutil.copytree(model_dir, root / "model")
    (root / "model" / "lens_merge.json").write_text(json.dumps({"folded": True}))
    delta = random_delta(model_dir, top_k=2, languages=LANGS)
    if base_meta is not None:
        delta.meta["base"] = base_meta
    delta.meta |= {"loss_weights": {"retain": 1.0, "separate": 1.0, "align": 0.5,
                                    "separate_scale": 1.0},
                   "hyperparameters": {"lr": 1e-5, "epochs": 1, "batch_size": 1, "grad_accum": 8,
                                       "optimizer_steps": 10, "max_length": 128},
                   "final_losses": {"loss": 0.25, "retain": 0.01, "separate": 0.2, "align": 0.04},
                   "data": {"source": "default", "rows": 80}, "subspace_sha256": "ab" * 32}
    delta.save(root / "delta")
    rep = root / "report"
    rep.mkdir()
    (rep / "lens_report.json").write_text(json.dumps(lens_report()))
    with open(rep / "train_log.jsonl", "w") as fh:
        for s in range(1, 11):
            fh.write(json.dumps({"step": s, "epoch": 0, "lr": 1e-5, "loss": 1.0 / s,
                                 "retain": 0.01 * s, "separate": 0.5 / s,
                                 "align": 0.2 / s}) + "\n")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 64, generator=g)
    save_file({"base": base, "lens": base + 0.3 * torch.randn(3, 64, generator=g)},
              str(rep / "mean_states.safetensors"), metadata={"languages": ",".join(LANGS)})
    _parity(rep / "fold_verify.json", "fold", "float32",
            {"max_abs_logit_diff": 1.5e-6, "top1_agreement": 1.0}, {"max_abs_logit_diff": 1e-4})
    if gguf:
        (root / "gguf").mkdir()
        write_gguf(root / "gguf" / f"{NAME}-F16.gguf")
        _parity(rep / "gguf_verify.json", "gguf", "f16",
                {"max_abs_logit_diff": 0.0312, "top1_agreement": 0.96875},
                {"max_abs_logit_diff": 0.5, "top1_agreement": 0.9},
                subject=str(root / "gguf" / f"{NAME}-F16.gguf"))
    if onnx:
        (root / "onnx").mkdir()
        if write_onnx(root / "onnx" / "model.onnx"):
            ps = _parity(rep / "onnx_verify.json", "onnx", "fp32",
                         {"max_abs_logit_diff": 2.5e-5}, {"max_abs_logit_diff": 1e-4})
            (root / "onnx" / "lens_merge_export.json").write_text(json.dumps(
                {"verification": ps}))
        else:
            shutil.rmtree(root / "onnx")
    recipe = Recipe(name=NAME, languages=LANGS).model_dump()
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    record_all(root)
    return root


def record_all(root: Path) -> None:
    """Record every file of a hand-made release in its manifest, as the pipeline would."""
    import lens_merge.release.manifest as manifest
    from lens_merge.records import ReleaseLayout

    layout = ReleaseLayout(root=root)
    for name in ("model", "delta", "report", "gguf", "onnx", "recipe.yaml", "README.md"):
        if (root / name).exists():
            manifest.record(layout, f"test-{name}", [root / name])


def _parity(path: Path, kind: str, variant: str, metrics: dict, limits: dict,
            subject: str | None = None) -> dict:
    """Write a passing one-report ParitySet (as the verifiers do); returns its JSON form."""
    from lens_merge.parity.thresholds import checks_for
    from lens_merge.records import ParitySet, parity_report

    rep = parity_report(kind, subject or f"subject-{variant}", "reference", variant=variant,
                        checks=checks_for(limits, metrics), metrics=metrics)
    data = ParitySet(reports=[rep]).dump()
    path.write_text(json.dumps(data))
    return data
