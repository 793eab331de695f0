"""The torch dataset every trainer, evaluator and feature cache iterates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .readers import read_records
from .records import ImageRecord
from .transforms import load_image, load_mask


class AnomalyDataset(Dataset):
    """Records + input size -> dicts of image, mask, label, class name and path.

    Normal images get an all-zero mask so a batch always stacks, whatever the source format.
    Pixels are decoded lazily in ``__getitem__``: readers only checked headers.
    """

    def __init__(self, records: Sequence[ImageRecord], image_size: int) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.records: list[ImageRecord] = list(records)
        self.image_size = int(image_size)
        self.classes: list[str] = sorted({r.class_name for r in self.records})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        size = self.image_size
        image = load_image(rec.image_path, size)
        if rec.mask_path is None:
            mask = torch.zeros(1, size, size, dtype=torch.float32)
        else:
            mask = load_mask(rec.mask_path, size)
        return {
            "image": image,
            "mask": mask,
            "label": int(rec.label),
            "class_name": rec.class_name,
            "path": str(rec.image_path),
        }


def load_dataset(spec: str, image_size: int, skip_bad: bool = False) -> AnomalyDataset:
    """Spec string -> validated dataset (see `larp.data.readers` for the spec forms)."""
    return AnomalyDataset(read_records(spec, skip_bad=skip_bad), image_size)
