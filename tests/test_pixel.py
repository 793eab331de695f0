"""Pixel branch (paper §3.3, SPEC §1.3) on small hand-made tensors: Eqs. 4-7 and 9-14, the
upsampling and the evaluation blur (against scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from larp.pixel import (
    LayerFusion,
    Refiner,
    gaussian_blur,
    gaussian_kernel1d,
    layer_maps,
    upsample,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------- Eqs. 4-7
def test_layer_maps_by_hand():
    # one layer, 2x2 grid, D = 2; text: normal = e1, abnormal = e2
    tokens = torch.tensor([[[[1.0, 0.0], [3.0, 4.0], [0.0, -2.0], [-1.0, 1.0]]]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    tau = 0.5
    maps = layer_maps(tokens, text, tau)
    assert maps.shape == (1, 1, 2, 2)
    # patch 1: f = (3, 4)/5 -> cos_n = 0.6, cos_a = 0.8 -> z = (1.2, 1.6)
    # p_a = e^1.6 / (e^1.2 + e^1.6) = sigmoid(0.4)
    assert maps[0, 0, 0, 1].item() == pytest.approx(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    assert maps[0, 0, 0, 1].item() == pytest.approx(0.598687660112452, abs=1e-6)
    # patch 0: cos = (1, 0) -> z = (2, 0) -> sigmoid(-2); patch 2: cos = (0, -1) -> sigmoid(-2)
    assert maps[0, 0, 0, 0].item() == pytest.approx(sigmoid(-2.0), abs=1e-6)
    assert maps[0, 0, 1, 0].item() == pytest.approx(sigmoid(-2.0), abs=1e-6)
    # patch 3: cos = (-1/sqrt2, 1/sqrt2) -> z_a - z_n = sqrt2 / 0.5 -> sigmoid(2 sqrt2) = 0.94419
    assert maps[0, 0, 1, 1].item() == pytest.approx(sigmoid(math.sqrt(2) / tau), abs=1e-6)
    assert maps[0, 0, 1, 1].item() == pytest.approx(0.944193, abs=1e-6)


def test_layer_maps_temperature_divides():
    tokens = torch.tensor([[[[3.0, 4.0]]]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # cos difference 0.2: tau = 0.07 -> sigmoid(0.2 / 0.07), not sigmoid(0.2 * 0.07)
    assert layer_maps(tokens, text, 0.07).item() == pytest.approx(sigmoid(0.2 / 0.07), abs=1e-6)


def test_layer_maps_use_each_layers_text_and_are_scale_free():
    torch.manual_seed(0)
    tokens = torch.randn(2, 2, 9, 8)
    text = torch.nn.functional.normalize(torch.randn(1, 2, 8), dim=-1)
    swapped = torch.cat([text, text.flip(1)])  # layer 2 reads (abnormal, normal)
    maps = layer_maps(tokens, swapped, 0.07)
    assert maps.shape == (2, 2, 3, 3)
    one = layer_maps(tokens[:, 1:], text, 0.07)
    torch.testing.assert_close(maps[:, 1:], 1.0 - one, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer_maps(5.0 * tokens, swapped, 0.07), maps, atol=1e-6, rtol=0)
    # row-major reshape: patch i sits at (i // w, i % w)
    flat = layer_maps(tokens[:1, :1], text, 0.07).flatten()
    for i in range(9):
        single = layer_maps(tokens[:1, :1, i : i + 1], text, 0.07).item()
        assert flat[i].item() == pytest.approx(single, abs=1e-6)


def test_layer_maps_need_a_square_grid():
    with pytest.raises(ValueError, match="square"):
        layer_maps(torch.randn(1, 1, 6, 4), torch.randn(1, 2, 4), 0.07)


# ---------------------------------------------------------------------------------- Eqs. 9-12
def test_fusion_weights_start_equal_and_sum_to_one():
    for layers in (1, 2, 4):
        fusion = LayerFusion(layers)
        torch.testing.assert_close(fusion.weights(), torch.full((layers,), 1.0 / layers))
    fusion = LayerFusion(3)
    with torch.no_grad():
        fusion.alpha.copy_(torch.tensor([0.3, -1.0, 2.0]))
    w = fusion.weights()
    assert w.sum().item() == pytest.approx(1.0)
    expected = [math.exp(a) / sum(math.exp(b) for b in (0.3, -1.0, 2.0)) for a in (0.3, -1.0, 2.0)]
    assert w.tolist() == pytest.approx(expected)


TWO_LAYERS = torch.tensor([[[[0.2, 0.8]], [[0.6, 0.0]]]])  # [B=1, L=2, h=1, w=2]


def test_fused_map_and_error_prior_by_hand():
    fusion = LayerFusion(2)
    with torch.no_grad():
        fusion.alpha.copy_(torch.tensor([0.0, math.log(3.0)]))  # omega = (1/4, 3/4)
    fused, prior = fusion(TWO_LAYERS)
    # pixel 0: 0.25*0.2 + 0.75*0.6 = 0.5;  E = 0.25*|0.2-0.5| + 0.75*|0.6-0.5| = 0.15
    # pixel 1: 0.25*0.8 + 0.75*0.0 = 0.2;  E = 0.25*|0.8-0.2| + 0.75*|0.0-0.2| = 0.3
    torch.testing.assert_close(fused, torch.tensor([[[0.5, 0.2]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(prior, torch.tensor([[[0.15, 0.3]]]), atol=1e-6, rtol=0)


def test_fixed_equal_weights_by_hand():
    fusion = LayerFusion(2, adaptive=False)
    assert not list(fusion.parameters()) and "alpha" not in fusion.state_dict()
    fused, prior = fusion(TWO_LAYERS)
    # mean (0.4, 0.4); E = 0.5*0.2 + 0.5*0.2 = 0.2 and 0.5*0.4 + 0.5*0.4 = 0.4
    torch.testing.assert_close(fused, torch.tensor([[[0.4, 0.4]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(prior, torch.tensor([[[0.2, 0.4]]]), atol=1e-6, rtol=0)


def test_adaptive_fusion_has_a_trainable_alpha():
    fusion = LayerFusion(2)
    assert [n for n, _ in fusion.named_parameters()] == ["alpha"]
    fused, prior = fusion(TWO_LAYERS)
    (fused.sum() + prior.sum()).backward()
    assert fusion.alpha.grad is not None and fusion.alpha.grad.abs().sum() > 0


def test_identical_layers_have_no_error_prior():
    maps = torch.rand(2, 1, 5, 5).expand(2, 3, 5, 5)
    fusion = LayerFusion(3)
    with torch.no_grad():
        fusion.alpha.copy_(torch.tensor([1.0, -2.0, 0.5]))
    fused, prior = fusion(maps)
    torch.testing.assert_close(fused, maps[:, 0], atol=1e-6, rtol=0)
    assert prior.abs().max() < 1e-6


# ---------------------------------------------------------------------------------- Eqs. 13-14
def test_refiner_starts_as_the_identity():
    torch.manual_seed(0)
    refiner = Refiner(16)
    fused, prior = torch.rand(3, 7, 7), torch.rand(3, 7, 7)
    # sigmoid(logit(x)) == x up to float rounding and the eps that keeps logit finite
    torch.testing.assert_close(refiner(fused, prior), fused, atol=2e-6, rtol=0)
    assert refiner.conv1.in_channels == 2 and refiner.conv1.out_channels == 16
    assert refiner.conv1.kernel_size == (3, 3) and refiner.conv2.kernel_size == (3, 3)
    assert refiner.conv2.out_channels == 1
    assert torch.count_nonzero(refiner.conv2.weight) == 0 and refiner.conv2.bias.item() == 0


def test_refiner_adds_its_residual_in_logit_space():
    refiner = Refiner(4)
    fused = torch.tensor([[[0.5, 0.2, 0.8]]])
    prior = torch.zeros_like(fused)
    with torch.no_grad():
        refiner.conv2.bias.fill_(math.log(3.0))  # ΔM = log 3: odds x3 everywhere
    # odds 1 -> 3: 0.75; odds 1/4 -> 3/4: 3/7; odds 4 -> 12: 12/13
    expected = torch.tensor([[[0.75, 3 / 7, 12 / 13]]])
    torch.testing.assert_close(refiner(fused, prior), expected, atol=1e-6, rtol=0)


def test_refiner_output_stays_a_probability_and_keeps_its_gradient_when_saturated():
    """The residual is never clamped: a refiner pushed far towards 0 or 1 still learns."""
    refiner = Refiner(4)
    fused = torch.tensor([[[0.0, 0.3, 1.0]]])
    prior = torch.zeros_like(fused)
    for bias in (-8.0, 8.0):  # a clamped residual of this size would be flat 0 or 1
        with torch.no_grad():
            refiner.conv2.bias.fill_(bias)
        out = refiner(fused, prior)
        assert ((out >= 0) & (out <= 1)).all()
        refiner.zero_grad()
        (out.sum() if bias < 0 else (1 - out).sum()).backward()
        assert refiner.conv2.bias.grad.abs().item() > 0


def test_refiner_is_local_and_reads_the_error_prior():
    torch.manual_seed(0)
    refiner = Refiner(8)
    with torch.no_grad():
        refiner.conv2.weight.normal_(0, 0.1)
    fused = torch.full((1, 9, 9), 0.5)
    prior = torch.zeros(1, 9, 9)
    base = refiner(fused, prior)
    poked = prior.clone()
    poked[0, 4, 4] = 1.0
    diff = (refiner(fused, poked) - base).abs()[0]
    assert diff[4, 4] > 0  # the error prior is an input
    # two 3x3 convolutions: a change reaches at most 2 pixels away
    assert diff[2:7, 2:7].sum() > 0
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[2:7, 2:7] = False
    assert diff[mask].max() == 0


# ---------------------------------------------------------------------------------- resampling
def test_upsample_bilinear_by_hand():
    out = upsample(torch.tensor([[[0.0, 1.0]]]), (1, 4))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))
    assert upsample(torch.rand(2, 14, 14), 112).shape == (2, 112, 112)
    assert upsample(torch.rand(2, 3, 14, 14), 28).shape == (2, 3, 28, 28)
    torch.testing.assert_close(
        upsample(torch.full((1, 3, 3), 0.3), 12), torch.full((1, 12, 12), 0.3)
    )


def test_gaussian_kernel_has_scipys_support():
    for sigma, radius in ((1.0, 4), (4.0, 16), (2.5, 10), (0.3, 1), (0.4, 2), (1.2, 5)):
        kernel = gaussian_kernel1d(sigma)
        assert kernel.numel() == 2 * radius + 1
        assert kernel.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(kernel, kernel.flip(0))


@pytest.mark.parametrize("sigma", [1.0, 4.0, 2.5, 1.2])
@pytest.mark.parametrize("shape", [(2, 32, 40), (1, 5, 7), (1, 3, 3), (1, 1, 1), (2, 20, 6)])
def test_gaussian_blur_equals_scipy_reflect(sigma, shape):
    rng = np.random.default_rng(int(sigma * 10) + sum(shape))
    maps = rng.random(shape).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    expected = np.stack(
        [gaussian_filter(m.astype(np.float64), sigma, mode="reflect", truncate=4.0) for m in maps]
    )
    assert got.shape == maps.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_gaussian_blur_sigma_zero_is_identity_and_blur_keeps_constants():
    maps = torch.rand(2, 10, 10)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)
    const = torch.full((1, 6, 9), 0.7)
    torch.testing.assert_close(gaussian_blur(const, 4.0), const, atol=1e-6, rtol=0)
    # images of a batch are blurred separately
    blurred = gaussian_blur(maps, 1.0)
    torch.testing.assert_close(blurred[1:], gaussian_blur(maps[1:], 1.0), atol=1e-6, rtol=0)
