"""Backbones that ship inside the package (the synthetic-world tiny CLIP, issue 5).

`shipped_weights_path` maps an (open_clip model name, pretrained tag) pair to a weights file
inside the package, so `LaRPConfig(pretrained=...)` can name shipped weights like any tag.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

# (model name, tag) -> file name under WEIGHTS_DIR
SHIPPED: dict[tuple[str, str], str] = {}


def shipped_weights_path(model_name: str, tag: str) -> Path | None:
    """The packaged weights file for `model_name`/`tag`, or None if nothing ships for it."""
    file_name = SHIPPED.get((model_name, tag))
    return WEIGHTS_DIR / file_name if file_name else None
