"""Training objective (paper §3.5, SPEC §1.6) by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from larp.config import LaRPConfig
from larp.losses import dice_loss, focal_loss, image_loss, larp_loss, seg_loss
from larp.model import LaRPOutput


def test_focal_loss_by_hand():
    # two pixels, classes (normal, abnormal); targets 1 and 0
    probs = torch.tensor([[[[0.2, 0.6]], [[0.8, 0.4]]]])  # [B=1, C=2, h=1, w=2]
    target = torch.tensor([[[1, 0]]])
    # pixel 0: p_t = 0.8 -> -(0.2)^2 ln 0.8; pixel 1: p_t = 0.6 -> -(0.4)^2 ln 0.6
    expected = (-(0.2**2) * math.log(0.8) - (0.4**2) * math.log(0.6)) / 2
    assert focal_loss(probs, target, 2.0).item() == pytest.approx(expected, abs=1e-7)
    # gamma 0 is cross-entropy
    ce = (-math.log(0.8) - math.log(0.6)) / 2
    assert focal_loss(probs, target, 0.0).item() == pytest.approx(ce, abs=1e-7)


def test_dice_loss_by_hand():
    pred = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # 1 - (2*1.5 + 1) / (1.5 + 2 + 1) = 1 - 4/4.5
    assert dice_loss(pred, target).item() == pytest.approx(1 - 4 / 4.5, abs=1e-7)
    # per image, then averaged: second image empty prediction and empty target -> dice 1, loss 0
    pred2 = torch.stack([pred[0], torch.zeros(4)])
    target2 = torch.stack([target[0], torch.zeros(4)])
    assert dice_loss(pred2, target2).item() == pytest.approx((1 - 4 / 4.5) / 2, abs=1e-7)


def test_seg_loss_by_hand():
    anomaly = torch.tensor([[[0.25, 0.75]]])
    mask = torch.tensor([[[0.0, 1.0]]])
    # focal: p_t = 0.75 at both pixels -> -(0.25)^2 ln 0.75
    # Dice(M, Y) = 1 - (1.5 + 1)/(1 + 1 + 1) = 1/6; Dice(1-M, 1-Y) = 1 - (1.5 + 1)/3 = 1/6
    expected = -(0.25**2) * math.log(0.75) + 1 / 6 + 1 / 6
    assert seg_loss(anomaly, mask).item() == pytest.approx(expected, abs=1e-6)
    # [B, 1, H, W] masks and 0/255 masks are the same mask
    assert seg_loss(anomaly, mask.unsqueeze(1)).item() == pytest.approx(expected, abs=1e-6)
    assert seg_loss(anomaly, mask * 255).item() == pytest.approx(expected, abs=1e-6)


def test_seg_loss_upsamples_to_the_mask():
    anomaly = torch.full((1, 2, 2), 0.3)
    mask = torch.zeros(1, 8, 8)
    mask[0, :4] = 1.0
    # a constant map stays constant when upsampled: same as the map given at mask size
    full = torch.full((1, 8, 8), 0.3)
    assert seg_loss(anomaly, mask).item() == pytest.approx(seg_loss(full, mask).item(), abs=1e-6)
    # focal: p_t = 0.3 on 32 pixels, 0.7 on 32
    focal = (-(0.7**2) * math.log(0.3) - (0.3**2) * math.log(0.7)) / 2
    dice_a = 1 - (2 * 0.3 * 32 + 1) / (0.3 * 64 + 32 + 1)
    dice_n = 1 - (2 * 0.7 * 32 + 1) / (0.7 * 64 + 32 + 1)
    assert seg_loss(anomaly, mask).item() == pytest.approx(focal + dice_a + dice_n, abs=1e-5)


def test_image_loss_by_hand():
    s = torch.tensor([0.8, 0.3])
    y = torch.tensor([1, 0])
    assert image_loss(s, y).item() == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    # saturated scores do not give inf
    assert math.isfinite(image_loss(torch.tensor([0.0, 1.0]), torch.tensor([1, 0])).item())


def _output(layers: int = 4) -> LaRPOutput:
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(2, layers, 4, 4, generator=g)
    fused = maps.mean(dim=1)
    final = (fused + 0.1 * torch.rand(2, 4, 4, generator=g)).clamp(0, 1)
    return LaRPOutput(maps, fused, fused * 0.5, final, torch.tensor([0.3, 0.6]))


def _mask():
    mask = torch.zeros(2, 8, 8)
    mask[0, 2:6, 3:7] = 1
    return mask


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"lambda_f": 0.0, "lambda_r": 0.0},
        {"lambda_f": 2.0, "lambda_r": 1.5, "lambda_delta": 3.0},
        {"shallow_layers": (1,)},
        {"shallow_layers": (1, 2, 3)},
        {"focal_gamma": 0.0},
    ],
)
def test_larp_loss_composition(changes):
    cfg = LaRPConfig.tiny_random(**changes)
    out, mask, labels = _output(), _mask(), torch.tensor([1, 0])
    total, parts = larp_loss(out, mask, labels, cfg)
    g = cfg.focal_gamma
    seg = [seg_loss(out.layer_maps[:, i], mask, g) for i in range(4)]
    shallow = [seg[layer - 1] for layer in cfg.shallow_layers]
    deep = [seg[layer - 1] for layer in cfg.deep_layers]
    align = sum(shallow) / len(shallow) + sum(deep) / len(deep)
    align = align + cfg.lambda_f * seg_loss(out.fused_map, mask, g)
    ref = (
        seg_loss(out.final_map, mask, g)
        + cfg.lambda_delta * (out.final_map - out.fused_map).abs().mean()
    )
    img = -(math.log(0.3) + math.log(0.4)) / 2
    expected = img + align + cfg.lambda_r * ref
    assert total.item() == pytest.approx(expected.item(), abs=1e-5)
    assert parts["loss"] == pytest.approx(total.item())
    assert parts["loss_img"] == pytest.approx(img, abs=1e-6)
    assert parts["loss_align"] == pytest.approx(align.item(), abs=1e-5)
    assert parts["loss_ref"] == pytest.approx(ref.item(), abs=1e-5)


def test_partition_means_are_per_group_not_over_all_layers():
    out, mask, labels = _output(), _mask(), torch.tensor([1, 0])
    a, _ = larp_loss(out, mask, labels, LaRPConfig.tiny_random(shallow_layers=(1,)))
    b, _ = larp_loss(out, mask, labels, LaRPConfig.tiny_random(shallow_layers=(1, 2, 3)))
    assert abs(a.item() - b.item()) > 1e-4


def test_residual_term_vanishes_when_the_refiner_is_the_identity():
    out = _output()
    same = LaRPOutput(out.layer_maps, out.fused_map, out.error_prior, out.fused_map, out.text_score)
    cfg = LaRPConfig.tiny_random()
    _, a = larp_loss(same, _mask(), torch.tensor([1, 0]), cfg)
    _, b = larp_loss(same, _mask(), torch.tensor([1, 0]), cfg.replace(lambda_delta=10.0))
    assert a["loss_ref"] == pytest.approx(b["loss_ref"])
    assert a["loss_ref"] == pytest.approx(seg_loss(out.fused_map, _mask()).item(), abs=1e-6)


def test_loss_is_differentiable_in_the_maps():
    out = _output()
    maps = out.layer_maps.clone().requires_grad_(True)
    fused = maps.mean(dim=1)
    s = torch.tensor([0.3, 0.6], requires_grad=True)
    total, _ = larp_loss(
        LaRPOutput(maps, fused, fused * 0.5, fused, s),
        _mask(),
        torch.tensor([1, 0]),
        LaRPConfig.tiny_random(),
    )
    total.backward()
    assert maps.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
