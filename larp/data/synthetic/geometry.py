"""Resolution-free geometry: every shape is a predicate on normalised coordinates.

Scenes are functions of ``(U, V)`` in [0, 1) rather than painted bitmaps, so a defect can
re-evaluate the same scene at displaced coordinates (a warp) or with changed parameters (a
texture change) and the changed pixels are known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOCATIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(U, V)`` in [0, 1), x to the right and y down."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    v, u = np.meshgrid(c, c, indexing="ij")
    return u, v


def location_name(mask: np.ndarray) -> str:
    """Rough place of a mask's centroid on a 3x3 grid, for captions."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    row = min(int(3 * ys.mean() / h), 2)
    col = min(int(3 * xs.mean() / w), 2)
    return LOCATIONS[3 * row + col]


def bbox(mask: np.ndarray) -> list[int]:
    """``[x0, y0, x1, y1]`` (inclusive) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def blob(
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
    max_aspect: float = 1.8,
) -> np.ndarray:
    """Irregular closed region: an ellipse whose radius wobbles with a few harmonics."""
    aspect = float(rng.uniform(1.0, max_aspect))
    rot = float(rng.uniform(0, np.pi))
    amps = rng.uniform(0.0, 0.15, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    dx, dy = u - centre[0], v - centre[1]
    a = dx * np.cos(rot) + dy * np.sin(rot)
    b = -dx * np.sin(rot) + dy * np.cos(rot)
    a, b = a / np.sqrt(aspect), b * np.sqrt(aspect)
    theta = np.arctan2(b, a)
    r = radius * (1.0 + sum(amps[k] * np.cos((k + 2) * theta + phases[k]) for k in range(3)))
    return np.hypot(a, b) <= r


def _segment_distance(px, py, ax, ay, bx, by) -> np.ndarray:
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


def polyline(
    u: np.ndarray,
    v: np.ndarray,
    start: tuple[float, float],
    rng: np.random.Generator,
    length: float,
    width_px: float,
) -> np.ndarray:
    """A thin, slightly bent stroke of ``width_px`` pixels starting at ``start`` (a scratch)."""
    size = u.shape[0]
    n_seg = int(rng.integers(2, 4))
    angle = float(rng.uniform(0, 2 * np.pi))
    pts = [np.asarray(start, dtype=np.float64)]
    for _ in range(n_seg):
        angle += float(rng.normal(0, 0.3))
        step = length / n_seg
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    dist = np.full(u.shape, np.inf, dtype=np.float32)
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        dist = np.minimum(dist, _segment_distance(u, v, a[0], a[1], b[0], b[1]))
    return dist * size <= width_px / 2.0


# -- shapes for objects: predicates in an object's local frame ---------------------------


@dataclass(frozen=True)
class Disc:
    cx: float
    cy: float
    r: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.cx, self.cy

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x - self.cx) ** 2 + (y - self.cy) ** 2 <= self.r**2


@dataclass(frozen=True)
class Ring:
    cx: float
    cy: float
    r_in: float
    r_out: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.cx, self.cy

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d2 = (x - self.cx) ** 2 + (y - self.cy) ** 2
        return (d2 <= self.r_out**2) & (d2 >= self.r_in**2)


@dataclass(frozen=True)
class Rect:
    """Rotated rectangle of full width ``w`` and height ``h`` centred at ``(cx, cy)``."""

    cx: float
    cy: float
    w: float
    h: float
    angle: float = 0.0

    @property
    def centre(self) -> tuple[float, float]:
        return self.cx, self.cy

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        c, s = np.cos(self.angle), np.sin(self.angle)
        a = dx * c + dy * s
        b = -dx * s + dy * c
        return (np.abs(a) <= self.w / 2) & (np.abs(b) <= self.h / 2)


@dataclass(frozen=True)
class Poly:
    """Convex polygon (vertices in either winding order)."""

    points: tuple[tuple[float, float], ...]

    @property
    def centre(self) -> tuple[float, float]:
        p = np.asarray(self.points)
        return float(p[:, 0].mean()), float(p[:, 1].mean())

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        pos = np.ones(x.shape, dtype=bool)
        neg = np.ones(x.shape, dtype=bool)
        pts = self.points
        for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1], strict=True):
            cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
            pos &= cross >= 0
            neg &= cross <= 0
        return pos | neg


Shape = Disc | Ring | Rect | Poly
