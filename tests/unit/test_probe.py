"""LSAR probing: planted-subspace recovery, orthogonality, directions, save/load."""

from __future__ import annotations

import pytest
import torch

from lens_merge.lens.probe import Subspace, fit_layers, lsar


def _planted(L=7, d=48, r=None, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    r = r or L - 1
    Q, _ = torch.linalg.qr(torch.randn(d, r + 1, generator=g, dtype=torch.float64))
    B, c = Q[:, :r], Q[:, r] * 5.0  # planted basis, common part orthogonal to it
    A = torch.randn(r, L, generator=g, dtype=torch.float64)
    A = A - A.mean(1, keepdim=True)
    means = (c[:, None] + B @ A).T + noise * torch.randn(L, d, generator=g, dtype=torch.float64)
    return means, B, c


@pytest.mark.parametrize("L", [2, 3, 7, 10])
def test_planted_subspace_is_recovered(L):
    means, B, c = _planted(L=L)
    u, M_s = lsar(means, L - 1)
    # M_s spans the planted subspace: all principal angles are zero
    sv = torch.linalg.svdvals(B.T @ M_s)
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-9)
    # the agnostic direction is the common part
    assert abs(float(u @ c / c.norm())) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("L, r", [(7, 6), (7, 3), (10, 9), (2, 1)])
def test_orthonormal_and_orthogonal_on_random_means(L, r):
    g = torch.Generator().manual_seed(L * 100 + r)
    means = torch.randn(L, 64, generator=g) + 3.0
    u, M_s = lsar(means, r)
    assert M_s.shape == (64, r)
    assert torch.allclose(M_s.T @ M_s, torch.eye(r, dtype=M_s.dtype), atol=1e-10)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-12)
    assert float((M_s.T @ u).abs().max()) < 1e-9


def test_noise_degrades_gracefully():
    means, B, _ = _planted(L=7, noise=1e-3)
    _, M_s = lsar(means, 6)
    sv = torch.linalg.svdvals(B.T @ M_s)
    assert float(sv.min()) > 0.999


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be in 1..2"):
        lsar(torch.randn(3, 8), 3)


def test_language_directions_and_roundtrip(tmp_path):
    means, _, _ = _planted(L=4, d=16)
    layers = fit_layers(torch.stack([means, 2 * means]).float(), ["en", "zh", "ja", "ko"], 3)
    ly = layers[0]
    assert float(ly.deltas[0].abs().max()) == 0.0  # delta_en = 0
    # delta_l = P_s(m_l - m_en), and it lies in the specific subspace
    want = ly.specific((means[2] - means[0]).double())
    assert torch.allclose(ly.deltas[2].double(), want, atol=1e-5)
    assert torch.allclose(ly.specific(ly.deltas[1].double()), ly.deltas[1].double(), atol=1e-5)
    sub = Subspace(["en", "zh", "ja", "ko"], layers, {"num_layers": 2, "languages":
                                                      ["en", "zh", "ja", "ko"]})
    sub.save(tmp_path / "s")
    back = Subspace.load(tmp_path / "s")
    assert back.sha256 == sub.sha256 and len(back.sha256) == 64
    assert torch.allclose(back.layer(-1).M_s, layers[1].M_s.double(), atol=1e-6)
    assert torch.equal(back.delta_of("ja"), layers[1].deltas[2])
