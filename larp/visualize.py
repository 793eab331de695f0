"""Heat maps and overlays for people: evaluation samples, `larp predict` and the HTTP API.

Maps are drawn on an absolute 0..1 scale (not rescaled per image), so a normal image looks calm
and a defect looks hot whichever image it is in.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp (anchor colours, interpolated).
_ANCHORS = np.array(
    [[0, 0, 80], [0, 90, 200], [0, 200, 220], [120, 230, 90], [250, 220, 0], [230, 60, 0]],
    dtype=np.float32,
)


def heatmap_rgb(anomaly_map: np.ndarray | torch.Tensor) -> np.ndarray:
    """`[H, W]` values in [0, 1] -> `[H, W, 3]` uint8 colours."""
    values = _to_numpy(anomaly_map).astype(np.float32)
    values = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(values).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    frac = (values - low)[..., None]
    colours = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac
    return colours.round().astype(np.uint8)


def heatmap_png(anomaly_map: np.ndarray | torch.Tensor) -> Image.Image:
    return Image.fromarray(heatmap_rgb(anomaly_map))


def contour(mask: np.ndarray) -> np.ndarray:
    """Boolean outline (one pixel wide, inside the region) of a binary mask."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))


def overlay_panel(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray | torch.Tensor,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Side by side: the image with the ground-truth outline (green), and the heat map blended
    over the image."""
    image = np.asarray(image_rgb, dtype=np.uint8).copy()
    left = image.copy()
    if mask is not None:
        left[contour(mask)] = (0, 255, 0)
    heat = heatmap_rgb(anomaly_map).astype(np.float32)
    right = (image.astype(np.float32) * (1 - alpha) + heat * alpha).round().astype(np.uint8)
    if mask is not None:
        right[contour(mask)] = (0, 255, 0)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return Image.fromarray(np.concatenate([left, gap, right], axis=1))


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)
