"""Image and mask preprocessing shared by training, evaluation and the HTTP server.

One code path (`pil_to_tensor`) turns any decoded picture into the backbone's input, so a
served upload is scored exactly as the same file was during evaluation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DatasetError

# OpenAI CLIP statistics: every supported backbone (open_clip "openai" weights and the
# project's tiny CLIP) was trained with them.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)

# Errors PIL raises for unreadable, truncated or hostile files.
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Map high-bit-depth gray images onto 0..255, which `convert("L")` would clip instead.

    16-bit modes are divided by 257 (65535 -> 255). Mode "I" comes from 32-bit TIFFs and old
    Pillow 16-bit PNGs, so it is read as 16-bit when any value exceeds 255. Float images are
    taken as 0..1 when their maximum is at most 1, else as 0..255.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float32) / 257.0
    elif img.mode == "I":
        arr = arr.astype(np.float32)
        if arr.size and arr.max() > 255:
            arr = np.clip(arr, 0, 65535) / 257.0
    else:  # "F"
        arr = arr.astype(np.float32)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an upright 8-bit RGB copy of any decoded image.

    EXIF orientation is applied because cameras store rotated pixels; alpha is dropped the
    way open_clip's own preprocessing drops it (`convert("RGB")`), so the colours under a
    transparent pixel are what the model sees.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd EXIF blocks warn; orientation is all we use
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit_gray(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Decoded image -> normalised float tensor ``[3, size, size]`` for the backbone.

    The squash resize (no crop, aspect ratio not kept) follows AnomalyCLIP: a crop could cut
    a defect off the edge, and the anomaly map must cover the whole image.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    rgb = to_rgb(img)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return (t - _MEAN) / _STD


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read an image file as the backbone input ``[3, size, size]``; errors name the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(img, size)
    except FileNotFoundError as e:
        raise DatasetError(f"image file not found: {path}") from e
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def mask_to_array(img: Image.Image) -> np.ndarray:
    """Mask image -> float32 array in [0, 1], scaled by the mask's own maximum level.

    Scaling by the maximum present (not the mode's range) accepts both 0/255 masks (MVTec)
    and 0/1 masks (some VisA and medical exports) without a per-dataset flag.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32)
    else:
        arr = np.asarray(img.convert("L")).astype(np.float32)
    arr = np.nan_to_num(arr, nan=0.0)
    top = float(arr.max()) if arr.size else 0.0
    if top <= 0:
        return np.zeros(arr.shape, dtype=np.float32)
    return np.clip(arr / top, 0.0, 1.0)


def pil_mask_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Mask image -> ``{0,1}`` float tensor ``[1, size, size]`` on the image's squash geometry.

    Bilinear, not bicubic: bicubic overshoot would move the 0.5 contour of a binary edge.
    """
    arr = mask_to_array(img)
    if arr.shape != (size, size):
        resized = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        arr = np.asarray(resized, dtype=np.float32)
    return torch.from_numpy((arr >= 0.5).astype(np.float32)).unsqueeze(0)


def load_mask(path: str | Path, size: int) -> torch.Tensor:
    """Read a mask file as ``{0,1}`` float ``[1, size, size]``; errors name the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = ImageOps.exif_transpose(img)
            return pil_mask_to_tensor(img, size)
    except FileNotFoundError as e:
        raise DatasetError(f"mask file not found: {path}") from e
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from e


def denormalize(t: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP normalisation (``[3,H,W]`` or ``[B,3,H,W]``) to [0, 1] for overlays."""
    if t.dim() not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"expected [3,H,W] or [B,3,H,W], got {tuple(t.shape)}")
    mean = _MEAN.to(device=t.device, dtype=t.dtype)
    std = _STD.to(device=t.device, dtype=t.dtype)
    return (t * std + mean).clamp(0.0, 1.0)
