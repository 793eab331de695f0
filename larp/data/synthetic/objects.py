"""Object families: an ordered list of named parts drawn over a background.

Parts are shapes in the object's local frame (unit: image width, origin at the object's
centre). Some parts may go missing or be misplaced, which is how the "missing part" and
"misplaced part" defects are made: the scene is redrawn with the part list changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .geometry import Disc, Poly, Rect, Ring, Shape


@dataclass(frozen=True)
class Part:
    """``colour`` is a palette role of the domain, or None for "background shows through"."""

    name: str
    shape: Shape
    colour: str | None
    shade: float = 1.0
    removable: bool = False
    movable: bool = False
    dx: float = 0.0
    dy: float = 0.0
    dtheta: float = 0.0

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.dx == 0.0 and self.dy == 0.0 and self.dtheta == 0.0:
            return self.shape.contains(x, y)
        cx, cy = self.shape.centre
        c, s = np.cos(self.dtheta), np.sin(self.dtheta)
        x0, y0 = x - cx - self.dx, y - cy - self.dy
        return self.shape.contains(cx + x0 * c + y0 * s, cy - x0 * s + y0 * c)

    def moved(self, dx: float, dy: float, dtheta: float) -> Part:
        return replace(self, dx=dx, dy=dy, dtheta=dtheta)


@dataclass(frozen=True)
class ObjectFamily:
    name: str
    noun: str
    roles: tuple[str, ...]  # palette roles the parts use, besides "background"
    build: Callable[[dict, np.random.Generator], list[Part]]
    max_turn: float  # how far a normal object may be rotated (radians)


def _washer(p: dict, rng: np.random.Generator) -> list[Part]:
    r_out = p.get("r_out", 0.32)
    r_in = p.get("r_in", 0.12)
    n_holes = int(p.get("holes", 4))
    r_h = 0.5 * (r_out + 0.23)
    parts = [
        Part("body", Ring(0, 0, r_in, r_out), "body"),
        Part("groove", Ring(0, 0, 0.20, 0.215), "body", shade=0.7),
        Part("tab", Rect(r_out + 0.02, 0, 0.07, 0.08), "body", removable=True, movable=True),
    ]
    for k in range(n_holes):
        a = 2 * np.pi * (k + 0.5) / n_holes
        parts.append(
            Part(
                "bolt hole",
                Disc(float(r_h * np.cos(a)), float(r_h * np.sin(a)), 0.026),
                None,
                removable=True,
                movable=True,
            )
        )
    return parts


def _plug(p: dict, rng: np.random.Generator) -> list[Part]:
    n_pins = int(p.get("pins", 3))
    xs = np.linspace(-0.09, 0.09, n_pins) if n_pins > 1 else np.zeros(1)
    parts = [
        Part("cable", Rect(0, 0.42, 0.08, 0.5), "cable"),
        Part("body", Rect(0, 0.06, 0.34, 0.26), "body"),
        Part("face", Rect(0, -0.055, 0.30, 0.025), "body", shade=0.75),
    ]
    for x in xs:
        parts.append(
            Part("pin", Rect(float(x), -0.135, 0.035, 0.13), "pin", removable=True, movable=True)
        )
    return parts


def _screw(p: dict, rng: np.random.Generator) -> list[Part]:
    n_threads = int(p.get("threads", 7))
    parts = [
        Part("shaft", Rect(0, 0.04, 0.09, 0.46), "body"),
        Part("tip", Poly(((-0.045, 0.27), (0.045, 0.27), (0.0, 0.36))), "body", removable=True),
        Part("head", Rect(0, -0.23, 0.22, 0.08), "body", shade=1.15, movable=True),
        Part("slot", Rect(0, -0.23, 0.03, 0.08), "body", shade=0.55, removable=True),
    ]
    for k in range(n_threads):
        y = -0.15 + k * 0.055
        parts.append(
            Part(
                "thread",
                Rect(0, y, 0.115, 0.016, 0.25),
                "body",
                shade=0.6,
                removable=True,
                movable=True,
            )
        )
    return parts


def _card(p: dict, rng: np.random.Generator) -> list[Part]:
    parts = [
        Part("board", Rect(0, 0, 0.62, 0.42), "body"),
        Part("chip", Rect(-0.06, 0.0, 0.16, 0.16), "chip", removable=True, movable=True),
    ]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(
                Part(
                    "mounting hole",
                    Disc(0.26 * sx, 0.16 * sy, 0.025),
                    None,
                    removable=True,
                    movable=True,
                )
            )
    for k in range(int(p.get("pads", 3))):
        parts.append(
            Part(
                "pad",
                Rect(0.17, -0.1 + 0.1 * k, 0.07, 0.05),
                "pad",
                removable=True,
                movable=True,
            )
        )
    return parts


OBJECT_FAMILIES: dict[str, ObjectFamily] = {
    f.name: f
    for f in (
        ObjectFamily("washer", "washer", ("body",), _washer, np.pi),
        ObjectFamily("plug", "plug", ("body", "cable", "pin"), _plug, 0.3),
        ObjectFamily("screw", "screw", ("body",), _screw, np.pi),
        ObjectFamily("card", "circuit card", ("body", "chip", "pad"), _card, 0.2),
    )
}


def random_params(family: str, rng: np.random.Generator) -> dict:
    """Domain-level parameters for a random new object domain (pretraining variety)."""
    if family == "washer":
        return {"holes": int(rng.integers(3, 7)), "r_in": float(rng.uniform(0.09, 0.14))}
    if family == "plug":
        return {"pins": int(rng.integers(2, 4))}
    if family == "screw":
        return {"threads": int(rng.integers(5, 9))}
    if family == "card":
        return {"pads": int(rng.integers(2, 5))}
    raise KeyError(family)
