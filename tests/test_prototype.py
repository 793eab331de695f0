"""Image branch (paper §3.4, SPEC §1.4) on hand-made tensors: Eq. 8, Eqs. 16-17 with the
SPEC choices, the auxiliary map, top-k and Eq. 18 (not Algorithm 1's form)."""

from __future__ import annotations

import math

import pytest
import torch

from larp.prototype import (
    auxiliary_map,
    final_score,
    image_scores,
    prototype_deviation,
    text_score,
    top_k_mean,
)


def test_text_score_by_hand():
    feature = torch.tensor([[3.0, 4.0], [-6.0, 8.0]])  # not normalised on purpose
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (normal, abnormal)
    s = text_score(feature, text, 0.5)
    # image 0: cos = (0.6, 0.8) -> e^1.6 / (e^1.2 + e^1.6); image 1: cos = (-0.6, 0.8)
    assert s[0].item() == pytest.approx(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)), abs=1e-6)
    assert s[1].item() == pytest.approx(1 / (1 + math.exp(-2.8)), abs=1e-6)


# ---------------------------------------------------------------------------------- Eqs. 16-17
def test_prototype_by_hand():
    # q median (linear) = (0.3 + 0.8) / 2 = 0.55 -> normal set {0, 1}, weights 1 - q = (0.9, 0.7)
    q = torch.tensor([[0.1, 0.3, 0.9, 0.8]])
    patches = torch.tensor(
        [
            [
                [2.0, 0.0, 0.0],  # normal, weight 0.9
                [0.0, 10.0, 0.0],  # normal, weight 0.7 (large norm: must not weigh more)
                [0.0, 0.0, 100.0],  # high q, very different feature: outside the set
                [0.0, 0.0, -3.0],  # high q
            ]
        ]
    )
    mu = prototype_deviation(q, patches, 0.5)
    # unit patches: p_norm = (0.9 e1 + 0.7 e2) / 1.6, |0.9 e1 + 0.7 e2| = sqrt(1.3)
    expected = [1 - 0.9 / math.sqrt(1.3), 1 - 0.7 / math.sqrt(1.3), 1.0, 1.0]
    assert mu[0].tolist() == pytest.approx(expected, abs=1e-6)
    # the high-q patches do not enter p_norm: change them, mu of the normal set stays
    changed = patches.clone()
    changed[0, 2] = torch.tensor([5.0, 5.0, 5.0])
    changed[0, 3] = torch.tensor([-1.0, 7.0, 2.0])
    mu2 = prototype_deviation(q, changed, 0.5)
    assert mu2[0, :2].tolist() == pytest.approx(expected[:2], abs=1e-6)
    # mu_i = 1 - cos(p_i, p_norm) for the others too: p_norm direction = (0.9, 0.7, 0)
    cos3 = (-0.9 + 4.9) / (math.sqrt(1.3) * math.sqrt(54.0))
    assert mu2[0, 3].item() == pytest.approx(1 - cos3, abs=1e-6)


def test_prototype_weights_favour_low_q():
    # both in the set; weights 0.9 and 0.1 -> p_norm leans to patch 0
    q = torch.tensor([[0.1, 0.9]])
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    mu = prototype_deviation(q, patches, 1.0)
    norm = math.sqrt(0.81 + 0.01)
    assert mu[0].tolist() == pytest.approx([1 - 0.9 / norm, 1 - 0.1 / norm], abs=1e-6)


def test_prototype_per_image_and_degenerate_cases():
    patches = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    q = torch.tensor(
        [
            [0.0, 0.2, 1.0, 1.0],  # set {0, 1}, weights (1, 0.8)
            [1.0, 1.0, 1.0, 1.0],  # every weight 0 -> plain mean of the (whole) set
        ]
    )
    mu = prototype_deviation(q, patches.expand(2, 4, 2).clone(), 0.5)
    n0 = math.sqrt(1 + 0.64)
    assert mu[0].tolist() == pytest.approx(
        [1 - 1 / n0, 1 - 0.8 / n0, 1 + 1 / n0, 1 + 0.8 / n0], abs=1e-6
    )
    # plain mean of four opposite unit vectors is 0: cosine with 0 is 0 -> mu = 1, no NaN
    assert torch.isfinite(mu[1]).all()
    two = prototype_deviation(torch.ones(1, 2), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), 0.5)
    assert two[0].tolist() == pytest.approx([1 - 1 / math.sqrt(2)] * 2, abs=1e-6)


def test_prototype_quantile_controls_the_set():
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    patches = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    # quantile 0.25 (linear) = 0.175 -> only patch 0 -> p_norm = e1
    mu = prototype_deviation(q, patches, 0.25)
    assert mu[0].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0], abs=1e-6)
    # quantile 1.0 -> all, weights (0.9, 0.8, 0.7, 0.6) -> p_norm ∝ (1.7, 1.3)
    mu = prototype_deviation(q, patches, 1.0)
    n = math.sqrt(1.7**2 + 1.3**2)
    assert mu[0].tolist() == pytest.approx([1 - 1.7 / n] * 2 + [1 - 1.3 / n] * 2, abs=1e-6)


# ---------------------------------------------------------------------------------- scores
def test_auxiliary_map():
    q = torch.tensor([[0.2, 0.4, 0.6]])
    mu = torch.tensor([[0.0, 1.5, -0.2]])  # mu in [0, 2]; clipped to [0, 1]
    torch.testing.assert_close(auxiliary_map(q, mu), torch.tensor([[0.1, 0.7, 0.3]]))
    assert auxiliary_map(q, None) is q


def test_top_k_mean():
    values = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    torch.testing.assert_close(top_k_mean(values, 2), torch.tensor([0.8, 0.35]))
    torch.testing.assert_close(top_k_mean(values, 1), torch.tensor([0.9, 0.4]))
    torch.testing.assert_close(top_k_mean(values, 3), torch.tensor([0.7, 0.3]))
    torch.testing.assert_close(top_k_mean(values, 99), torch.tensor([0.55, 0.25]))  # capped


@pytest.mark.parametrize("lam,expected", [(0.0, 0.2), (1.0, 0.45), (4.0, 0.6), (0.5, 0.3667)])
def test_eq18_by_hand(lam, expected):
    s_text, s_map = torch.tensor([0.2]), torch.tensor([0.7])
    got = final_score(s_text, s_map, lam).item()
    # (s_text + λ s_map) / (1 + λ): 0.2; 0.9/2; 3.0/5; 0.55/1.5
    assert got == pytest.approx(expected, abs=1e-4)
    # not Algorithm 1's (1 − λ) s_text + λ s_map (2.2 at λ = 4: not a probability)
    if lam not in (0.0, 1.0):
        assert got != pytest.approx((1 - lam) * 0.2 + lam * 0.7, abs=1e-3)
    assert 0.0 <= got <= 1.0


def test_image_scores_with_and_without_prototype():
    s_text = torch.tensor([0.2])
    q = torch.tensor([[[0.1, 0.5], [0.9, 0.3]]])  # [B, h, w]
    mu = torch.tensor([[[0.9, 0.1], [1.4, 0.3]]])
    # aux = ½(q + clip(μ)) = (0.5, 0.3, 0.95, 0.3); top-2 mean = 0.725
    s_map, s = image_scores(s_text, q, mu, lam=4.0, top_k=2)
    assert s_map.item() == pytest.approx(0.725, abs=1e-6)
    assert s.item() == pytest.approx((0.2 + 4 * 0.725) / 5, abs=1e-6)
    # prototype off: aux = q; top-2 mean = 0.7
    s_map, s = image_scores(s_text, q, None, lam=1.0, top_k=2)
    assert s_map.item() == pytest.approx(0.7, abs=1e-6)
    assert s.item() == pytest.approx(0.45, abs=1e-6)
