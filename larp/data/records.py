"""The one record type every reader produces, so the dataset never cares which format it was."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageRecord:
    """One test image; ``mask_path`` is None for normals (the dataset gives them an empty mask)."""

    image_path: Path
    mask_path: Path | None
    label: int  # 0 normal, 1 anomalous
    class_name: str
    defect: str  # "good" for normals
