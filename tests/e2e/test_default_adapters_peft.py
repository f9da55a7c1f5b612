"""PEFT LoRA adapters of a delta on the default model (SmolLM2-135M-Instruct), slow.

Prints the numbers the README quotes: full rank vs folded, and at the default energy the
adapter's size against the delta's and its logit error.
"""

from __future__ import annotations

import pytest

from lens_merge.adapters.factor import DEFAULT_ENERGY
from lens_merge.adapters.peft_lora import export_peft_lora, verify_peft_lora
from lens_merge.config import DEFAULT_LANGUAGES
from lens_merge.testing import random_delta
from tests.conftest import requires_peft

pytestmark = [pytest.mark.slow, requires_peft]


@pytest.fixture(scope="module")
def delta_dir(default_model_dir, tmp_path_factory):
    d = random_delta(default_model_dir, top_k=2, scale=0.002, languages=DEFAULT_LANGUAGES)
    return d.save(tmp_path_factory.mktemp("default_delta") / "delta")


def _verify(model, out):
    v = verify_peft_lora(model, out, languages=DEFAULT_LANGUAGES, n_per_language=1)
    m = v.metrics
    print(f"\n{out.name}: {v.variant} max|dlogit| {m['max_abs_logit_diff']:.4g} top-1 "
          f"{m['top1_agreement']:.4f} KL mean {m['kl_mean']:.3g} PEFT-vs-files "
          f"{m['adapter_max_abs_logit_diff']:.3g} dropped cost "
          f"{m.get('dropped_max_abs_logit_diff')} / top-1 {m.get('dropped_top1_agreement')} "
          f"size ratio {m['size_ratio']:.3f} ({v.details['sizes']['adapter_bytes'] / 2**20:.2f}"
          f" MiB vs {v.details['sizes']['delta_bytes'] / 2**20:.2f} MiB) max rank "
          f"{v.details['max_rank']} ({v.seconds:.0f} s)")
    return v


def test_full_rank_adapter_on_the_default_model(default_model_dir, delta_dir, tmp_path):
    rep = export_peft_lora(delta_dir, tmp_path / "full", base="default")
    assert rep["config"]["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert rep["config"]["layers_to_transform"] == [28, 29] and rep["dropped"] == {}
    v = _verify("default", tmp_path / "full")
    assert v.passed and v.variant == "full_rank"
    assert v["max_abs_logit_diff"] <= 1e-4 and v["top1_agreement"] == 1.0


def test_default_energy_adapter_size_and_error(default_model_dir, delta_dir, tmp_path):
    rep = export_peft_lora(delta_dir, tmp_path / f"energy{DEFAULT_ENERGY}", base="default",
                           energy=DEFAULT_ENERGY)
    ranks = sorted({t["rank"] for t in rep["tensors"].values()})
    errs = [t["rel_error"] for t in rep["tensors"].values()]
    print(f"\nenergy {DEFAULT_ENERGY}: ranks {ranks}, rel error {min(errs):.3f}-{max(errs):.3f}")
    v = _verify("default", tmp_path / f"energy{DEFAULT_ENERGY}")
    assert v.passed and v.variant == "approximate"
    assert v["adapter_max_abs_logit_diff"] <= 1e-4
    assert 0 < v["size_ratio"] < 2.0


def test_norms_dropped_cost_on_the_default_model(default_model_dir, delta_dir, tmp_path):
    """What a llama.cpp-style adapter (LoRA pairs only) loses when the delta trains norms."""
    rep = export_peft_lora(delta_dir, tmp_path / "nonorms", base="default", carry=False)
    assert len(rep["dropped"]) == 4  # two RMSNorm weights in each of the two blocks
    v = _verify("default", tmp_path / "nonorms")
    assert v.passed and v["dropped_max_abs_logit_diff"] > 0
