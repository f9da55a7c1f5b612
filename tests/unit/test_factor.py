"""Truncated SVD of a delta's linear weights (``lens_merge.adapters.factor``): no model files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lens_merge.adapters.factor import factor_delta, factor_tensor
from lens_merge.errors import AdapterError
from lens_merge.weights.delta import LensDelta

Q = "model.layers.2.self_attn.q_proj.weight"
DOWN = "model.layers.3.mlp.down_proj.weight"
NORM = "model.layers.2.input_layernorm.weight"
BIAS = "model.layers.2.self_attn.q_proj.bias"


def _with_spectrum(out: int, inp: int, s: list[float], seed: int = 0) -> torch.Tensor:
    """An [out, inp] matrix whose singular values are exactly ``s``."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, len(s), generator=g, dtype=torch.float64))
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


def _delta(tensors: dict[str, torch.Tensor], arch: str | None = "llama") -> LensDelta:
    meta = {"base": {"architecture": arch}} if arch else {}
    return LensDelta(tensors={k: v.float() for k, v in tensors.items()}, meta=meta)


def test_full_rank_is_exact_and_shapes_are_lora():
    g = torch.Generator().manual_seed(1)
    dw = torch.randn(12, 8, generator=g) * 0.01
    fac = factor_delta(_delta({Q: dw, DOWN: torch.randn(8, 20, generator=g)}))
    f = fac.factors[Q]
    print(f"full rank rel error {f.rel_error:.3g}")
    assert (f.rank, tuple(f.A.shape), tuple(f.B.shape)) == (8, (8, 8), (12, 8))
    assert f.A.dtype == f.B.dtype == torch.float32
    assert f.rel_error < 1e-5 and f.energy == pytest.approx(1.0)
    assert float((f.B @ f.A - dw).abs().max()) < 1e-7
    assert fac.factors[DOWN].rank == 8 and fac.max_rank == 8
    assert (f.module, f.suffix, f.block) == ("model.layers.2.self_attn.q_proj",
                                             "self_attn.q_proj.weight", 2)
    assert fac.blocks == [2, 3] and fac.dropped == {}
    assert fac.nbytes() == 4 * (8 * 8 + 12 * 8 + 8 * 20 + 8 * 8)


def test_fixed_rank_meets_eckart_young():
    s = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    dw = _with_spectrum(10, 7, s)
    A, B, r, rel, kept = factor_tensor(Q, dw, rank=3)
    want = math.sqrt(sum(x * x for x in s[3:]) / sum(x * x for x in s))
    print(f"rank 3: rel error {rel:.6f} (optimal {want:.6f}), energy {kept:.4f}")
    assert r == 3 and tuple(A.shape) == (3, 7) and tuple(B.shape) == (10, 3)
    assert rel == pytest.approx(want, rel=1e-4)
    assert kept == pytest.approx(sum(x * x for x in s[:3]) / sum(x * x for x in s), rel=1e-6)
    # the singular values are split evenly between A and B
    assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-4)


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.75, 1), (0.95, 3), (0.98, 3),
                                              (0.995, 4), (1.0, 4)])
def test_energy_picks_smallest_rank_keeping_the_fraction(energy, rank):
    s = [4.0, 2.0, 1.0, 0.5]  # squared: 16, 4, 1, 0.25 of 21.25 -> cum .753 .941 .988 1.0
    fac = factor_delta(_delta({Q: _with_spectrum(9, 6, s)}), energy=energy)
    f = fac.factors[Q]
    assert f.rank == rank
    assert f.energy >= energy - 1e-9
    assert fac.energy == energy and fac.rank is None


def test_zero_delta_gets_rank_one_and_no_error():
    fac = factor_delta(_delta({Q: torch.zeros(6, 4)}), energy=0.9)
    f = fac.factors[Q]
    assert f.rank == 1 and f.rel_error == 0.0 and f.norm == 0.0


def test_rank_larger_than_tensor_names_tensor_and_shape():
    with pytest.raises(AdapterError, match=r"rank 9 .*q_proj\.weight of shape \[12, 8\].*at "
                                           r"most 8"):
        factor_delta(_delta({Q: torch.randn(12, 8)}), rank=9)


@pytest.mark.parametrize(("kw", "msg"), [({"rank": 2, "energy": 0.9}, "not both"),
                                         ({"rank": 0}, "positive integer"),
                                         ({"rank": True}, "positive integer"),
                                         ({"energy": 0.0}, r"\(0, 1\]"),
                                         ({"energy": 1.5}, r"\(0, 1\]")])
def test_bad_requests(kw, msg):
    with pytest.raises(AdapterError, match=msg):
        factor_delta(_delta({Q: torch.randn(4, 4)}), **kw)


@pytest.mark.parametrize("arch", ["llama", None])
@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_embeddings_and_lm_head_are_refused_by_name(name, arch):
    d = _delta({Q: torch.randn(4, 4), name: torch.randn(32, 4)}, arch=arch)
    with pytest.raises(AdapterError, match=rf"{name.replace('.', '[.]')}.*embeddings / lm_head"):
        factor_delta(d)


def test_norms_and_biases_are_dropped_with_their_norm():
    norm, bias = torch.full((8,), 0.5), torch.full((12,), 0.25)
    fac = factor_delta(_delta({Q: torch.randn(12, 8), NORM: norm, BIAS: bias}))
    assert list(fac.factors) == [Q]
    assert set(fac.dropped) == {NORM, BIAS}
    assert fac.dropped[NORM].norm == pytest.approx(float(norm.norm()))
    assert fac.dropped[NORM].reason.startswith("norm")
    assert fac.dropped[BIAS].reason.startswith("bias") and fac.dropped[BIAS].shape == (12,)
    rec = json.loads(json.dumps(fac.records()))
    assert rec["tensors"][Q]["rank"] == 8 and rec["dropped"][NORM]["shape"] == [8]


def test_without_a_table_linear_weights_are_found_by_shape_and_name():
    fac = factor_delta(_delta({Q: torch.randn(6, 4), NORM: torch.randn(4)}, arch=None))
    assert list(fac.factors) == [Q] and list(fac.dropped) == [NORM]
    assert fac.factors[Q].block == 2


def test_a_delta_of_only_norms_cannot_be_a_lora():
    with pytest.raises(AdapterError, match="no linear weight"):
        factor_delta(_delta({NORM: torch.randn(8)}))


def test_unknown_architecture_is_an_adapter_error():
    with pytest.raises(AdapterError, match="unknown architecture table 'nope'"):
        factor_delta(_delta({Q: torch.randn(4, 4)}, arch="nope"))
