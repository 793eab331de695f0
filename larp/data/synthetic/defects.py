"""Defects: each returns a candidate image and the region R it painted.

The final image is ``where(R, candidate, clean)`` and the mask is R, so pixels outside the
mask are provably untouched. A draw that barely changes its region (a same-colour stroke
over a same-colour area, a part moved off the object) is redrawn: every defect is visible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import blob, polyline
from .palette import foreign_colour, rgb
from .scenes import ObjectScene, Scene, TextureScene
from .textures import TEXTURE_FAMILIES

_MAX_TRIES = 40
_MIN_CHANGED_FRACTION = 0.25
_CHANGE_EPS = 1.5 / 255.0


@dataclass
class Ctx:
    scene: Scene
    u: np.ndarray
    v: np.ndarray
    base: np.ndarray
    body: np.ndarray
    rng: np.random.Generator

    @property
    def size(self) -> int:
        return self.u.shape[0]


@dataclass
class Draft:
    candidate: np.ndarray
    region: np.ndarray
    detail: dict[str, Any] = field(default_factory=dict)
    # Shrink the region to the pixels that changed (plus one pixel): a warp displaces a
    # whole disc, but only where it crosses an edge does the picture change.
    trim: bool = False


def _pick(ctx: Ctx, where: np.ndarray) -> tuple[float, float]:
    idx = np.flatnonzero(where)
    i = int(idx[int(ctx.rng.integers(len(idx)))])
    return float(ctx.u.flat[i]), float(ctx.v.flat[i])


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    out[:, 1:] |= grown[:, :-1]
    out[:, :-1] |= grown[:, 1:]
    return out


def _edge(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _own_colours(ctx: Ctx) -> list[str]:
    return ctx.scene.domain.colour_names()


def _stain(ctx: Ctx) -> Draft:
    rng = ctx.rng
    region = blob(ctx.u, ctx.v, _pick(ctx, ctx.body), float(rng.uniform(0.05, 0.11)), rng)
    region &= ctx.body
    name = foreign_colour(_own_colours(ctx), rng)
    alpha = float(rng.uniform(0.6, 0.9))
    cand = ctx.base * (1 - alpha) + alpha * rgb(name)
    return Draft(cand, region, {"colour": name})


def _hole(ctx: Ctx) -> Draft:
    rng = ctx.rng
    region = blob(ctx.u, ctx.v, _pick(ctx, ctx.body), float(rng.uniform(0.03, 0.065)), rng)
    region &= ctx.body
    scene = ctx.scene
    if isinstance(scene, ObjectScene):
        cand = scene.background(ctx.u, ctx.v) * 0.7  # background, in the hole's shadow
        name = scene.colours["background"]
    else:
        name = scene.colours.get("substrate", "black")
        cand = np.broadcast_to(rgb(name), ctx.base.shape).copy()
    rim = region & ~np.roll(region, 1, axis=0)  # the lit lower edge of the hole's wall
    cand[rim] = np.clip(cand[rim] * 0.6 + 0.25, 0, 1)
    return Draft(cand, region, {"colour": name})


def _stroke(ctx: Ctx, colour: str) -> Draft:
    rng = ctx.rng
    width = float(rng.uniform(1.3, 2.6)) * ctx.size / 128.0
    region = polyline(
        ctx.u, ctx.v, _pick(ctx, ctx.body), rng, float(rng.uniform(0.15, 0.4)), max(width, 1.0)
    )
    region &= ctx.body
    cand = np.broadcast_to(rgb(colour), ctx.base.shape).copy()
    return Draft(cand, region, {"colour": colour})


def _color_scratch(ctx: Ctx) -> Draft:
    return _stroke(ctx, foreign_colour(_own_colours(ctx), ctx.rng))


def _scratch(ctx: Ctx) -> Draft:
    """A stroke in one of the domain's own colours: it breaks the pattern, not the palette."""
    colours = ctx.scene.colours
    roles = (
        ["a", "b"] if isinstance(ctx.scene, TextureScene) else [r for r in colours if r != "body"]
    )
    role = roles[int(ctx.rng.integers(len(roles)))]
    return _stroke(ctx, colours[role])


def _texture_change(ctx: Ctx) -> Draft:
    scene = ctx.scene
    assert isinstance(scene, TextureScene)
    rng = ctx.rng
    region = blob(ctx.u, ctx.v, _pick(ctx, ctx.body), float(rng.uniform(0.08, 0.15)), rng)
    params, what = TEXTURE_FAMILIES[scene.domain.family].change(scene.params, rng)
    cand, _ = scene.render(ctx.u, ctx.v, params=params)
    return Draft(cand, region, {"change": what})


def _warp(ctx: Ctx) -> Draft:
    """Local deformation: the scene re-rendered at smoothly displaced coordinates."""
    rng = ctx.rng
    where = _edge(ctx.body) if isinstance(ctx.scene, ObjectScene) else ctx.body
    cx, cy = _pick(ctx, where)
    sigma = float(rng.uniform(0.035, 0.07))
    amp = min(float(rng.uniform(2.5, 5.0)) / 128.0, 0.8 * sigma)
    mode = ["bulge", "dent", "twist"][int(rng.integers(3))]
    dx, dy = ctx.u - cx, ctx.v - cy
    g = amp * np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) / sigma
    if mode == "bulge":
        du, dv = -g * dx, -g * dy
    elif mode == "dent":
        du, dv = g * dx, g * dy
    else:
        du, dv = -g * dy, g * dx
    region = np.hypot(du, dv) * ctx.size >= 0.5
    cand, _ = ctx.scene.render(ctx.u + du, ctx.v + dv, lit_at=(ctx.u, ctx.v))
    return Draft(cand, region, {"mode": mode}, trim=True)


def _parts(ctx: Ctx, flag: str) -> tuple[ObjectScene, int]:
    scene = ctx.scene
    assert isinstance(scene, ObjectScene)
    choices = [i for i, p in enumerate(scene.parts) if getattr(p, flag)]
    # At small sizes a thin part can cover no pixel at all; never pick one of those.
    x, y = scene.local(ctx.u, ctx.v)
    seen = [i for i in choices if scene.parts[i].contains(x, y).sum() >= 3] or choices
    return scene, seen[int(ctx.rng.integers(len(seen)))]


def _missing_part(ctx: Ctx) -> Draft:
    scene, i = _parts(ctx, "removable")
    x, y = scene.local(ctx.u, ctx.v)
    region = scene.parts[i].contains(x, y)
    cand, _ = scene.render(ctx.u, ctx.v, parts=scene.parts[:i] + scene.parts[i + 1 :])
    return Draft(cand, region, {"part": scene.parts[i].name})


def _misplaced_part(ctx: Ctx) -> Draft:
    scene, i = _parts(ctx, "movable")
    rng = ctx.rng
    dist = float(rng.uniform(0.025, 0.06))
    ang = float(rng.uniform(0, 2 * np.pi))
    turn = float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.9)) if rng.random() < 0.5 else 0.0
    if turn and rng.random() < 0.5:
        dist = 0.0
    old = scene.parts[i]
    new = old.moved(dist * np.cos(ang), dist * np.sin(ang), turn)
    x, y = scene.local(ctx.u, ctx.v)
    region = old.contains(x, y) | new.contains(x, y)
    parts = list(scene.parts)
    parts[i] = new
    cand, _ = scene.render(ctx.u, ctx.v, parts=parts)
    how = "rotated" if dist == 0.0 else ("shifted and rotated" if turn else "shifted")
    return Draft(cand, region, {"part": old.name, "how": how})


DEFECTS: dict[str, Callable[[Ctx], Draft]] = {
    "stain": _stain,
    "hole": _hole,
    "color_scratch": _color_scratch,
    "scratch": _scratch,
    "texture_change": _texture_change,
    "warp": _warp,
    "missing_part": _missing_part,
    "misplaced_part": _misplaced_part,
}


def apply_defect(ctx: Ctx, kind: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw ``kind`` until it visibly changes its region; returns (image, mask, detail)."""
    size = ctx.size
    min_px = max(3, round(6e-4 * size * size))
    for _ in range(_MAX_TRIES):
        d = DEFECTS[kind](ctx)
        cand = np.clip(d.candidate, 0.0, 1.0)
        region = d.region
        changed = (np.abs(cand - ctx.base).max(axis=-1) > _CHANGE_EPS) & region
        if d.trim:
            region = region & _dilate(changed)
        n = int(region.sum())
        if n < min_px or n > 0.3 * size * size:
            continue
        if changed.sum() < max(min_px, _MIN_CHANGED_FRACTION * n):
            continue
        out = np.where(region[..., None], cand, ctx.base).astype(np.float32)
        return out, region, d.detail
    raise RuntimeError(f"could not place a visible {kind!r} defect in {ctx.scene.domain.name}")
