"""Named colours, so every generated image can be captioned with words a text tower knows."""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.07),
    "charcoal": (0.18, 0.18, 0.20),
    "slate": (0.33, 0.38, 0.44),
    "grey": (0.55, 0.55, 0.55),
    "steel": (0.66, 0.68, 0.72),
    "white": (0.95, 0.95, 0.95),
    "cream": (0.93, 0.89, 0.76),
    "ivory": (0.98, 0.96, 0.88),
    "sand": (0.86, 0.76, 0.55),
    "khaki": (0.76, 0.72, 0.52),
    "tan": (0.78, 0.62, 0.42),
    "honey": (0.85, 0.62, 0.30),
    "brass": (0.78, 0.65, 0.30),
    "gold": (0.92, 0.76, 0.22),
    "brown": (0.45, 0.30, 0.18),
    "walnut": (0.36, 0.22, 0.12),
    "rust": (0.62, 0.25, 0.10),
    "maroon": (0.45, 0.08, 0.12),
    "red": (0.82, 0.14, 0.14),
    "orange": (0.96, 0.55, 0.10),
    "yellow": (0.96, 0.90, 0.20),
    "lime": (0.55, 0.90, 0.20),
    "olive": (0.45, 0.48, 0.20),
    "green": (0.10, 0.42, 0.20),
    "teal": (0.10, 0.50, 0.50),
    "cyan": (0.20, 0.85, 0.90),
    "blue": (0.20, 0.35, 0.80),
    "navy": (0.12, 0.18, 0.40),
    "purple": (0.50, 0.20, 0.62),
    "magenta": (0.86, 0.15, 0.66),
    "pink": (0.96, 0.58, 0.72),
}

# Colours a defect may be painted in when it must stand out from the domain's own colours.
VIVID: tuple[str, ...] = (
    "red", "orange", "yellow", "lime", "green", "cyan", "blue", "purple", "magenta", "pink",
    "black", "white", "rust", "maroon", "navy", "teal",
)  # fmt: skip


def rgb(name: str) -> np.ndarray:
    """Colour name -> float32 RGB in [0, 1]."""
    return np.asarray(COLOURS[name], dtype=np.float32)


def colour_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(rgb(a) - rgb(b)))


def foreign_colour(own: list[str], rng: np.random.Generator, min_dist: float = 0.35) -> str:
    """A vivid colour far from every colour of the domain, so a colour rule could spot it."""
    far = [c for c in VIVID if all(colour_distance(c, o) >= min_dist for o in own)]
    if not far:  # every vivid colour is near the domain: take the farthest one
        far = [max(VIVID, key=lambda c: min(colour_distance(c, o) for o in own))]
    return far[int(rng.integers(len(far)))]


def distinct_colours(rng: np.random.Generator, n: int, min_dist: float = 0.3) -> list[str]:
    """``n`` colour names pairwise at least ``min_dist`` apart (for random domains)."""
    names = sorted(COLOURS)
    for _ in range(200):
        pick = [names[i] for i in rng.choice(len(names), size=n, replace=False)]
        if all(
            colour_distance(a, b) >= min_dist for i, a in enumerate(pick) for b in pick[i + 1 :]
        ):
            return pick
    raise RuntimeError(f"could not find {n} distinct colours")
