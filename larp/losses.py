"""Training objective (paper §3.5, SPEC §1.6) as plain functions of maps, masks and labels.

`L = L_img + L_align + λ_r·L_ref`. Maps are upsampled to the mask size before the segmentation
loss, as AnomalyCLIP does, so the loss sees the same geometry as the metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from larp.config import LaRPConfig
from larp.model import LaRPOutput
from larp.pixel import upsample

_EPS = 1e-8


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss on class probabilities `[B, C, H, W]` against integer targets `[B, H, W]`:
    mean of `−(1 − p_t)^γ log p_t`."""
    p_t = probs.gather(1, target.long().unsqueeze(1)).squeeze(1).clamp(_EPS, 1.0)
    return (-((1.0 - p_t) ** gamma) * p_t.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged: `1 − (2|P∩Y| + s) / (|P| + |Y| + s)` (s = 1)."""
    pred = pred.flatten(1)
    target = target.flatten(1).to(pred.dtype)
    inter = (pred * target).sum(dim=1)
    dice = (2 * inter + smooth) / (pred.sum(dim=1) + target.sum(dim=1) + smooth)
    return (1.0 - dice).mean()


def seg_loss(anomaly: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """`Focal([1−M, M], Y) + Dice(M, Y) + Dice(1−M, 1−Y)`; `anomaly` `[B, h, w]` at any size,
    `mask` `[B, H, W]` or `[B, 1, H, W]` in {0, 1}."""
    if mask.ndim == 4:
        mask = mask.squeeze(1)
    if anomaly.shape[-2:] != mask.shape[-2:]:
        anomaly = upsample(anomaly, tuple(mask.shape[-2:]))
    probs = torch.stack([1.0 - anomaly, anomaly], dim=1)
    target = (mask > 0.5).to(anomaly.dtype)
    return (
        focal_loss(probs, target, gamma)
        + dice_loss(anomaly, target)
        + dice_loss(1.0 - anomaly, 1.0 - target)
    )


def image_loss(s_text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 20: binary cross-entropy of the text score."""
    return F.binary_cross_entropy(s_text.clamp(_EPS, 1 - _EPS), labels.to(s_text.dtype))


def larp_loss(
    out: LaRPOutput, masks: torch.Tensor, labels: torch.Tensor, config: LaRPConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eqs. 19-23. Returns the total loss and its parts (as floats, for logging)."""
    gamma = config.focal_gamma
    layers = list(config.feature_layers)
    shallow = [i for i, layer in enumerate(layers) if layer in config.shallow_layers]
    deep = [i for i, layer in enumerate(layers) if layer not in config.shallow_layers]
    per_layer = [seg_loss(out.layer_maps[:, i], masks, gamma) for i in range(len(layers))]
    align = sum(
        (sum(per_layer[i] for i in part) / len(part) for part in (shallow, deep) if part),
        torch.zeros((), device=masks.device),
    )
    fused = seg_loss(out.fused_map, masks, gamma)
    align = align + config.lambda_f * fused
    ref = (
        seg_loss(out.final_map, masks, gamma)
        + config.lambda_delta * (out.final_map - out.fused_map).abs().mean()
    )
    img = image_loss(out.text_score, labels)
    total = img + align + config.lambda_r * ref
    parts = {
        "loss": float(total.detach()),
        "loss_img": float(img.detach()),
        "loss_align": float(align.detach()),
        "loss_ref": float(ref.detach()),
    }
    return total, parts
