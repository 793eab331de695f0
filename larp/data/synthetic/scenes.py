"""Clean scenes: everything random about a normal image, fixed once, renderable at any coords.

A scene draws all of its randomness in its constructor, before any defect is chosen, so a
defective image and the clean image from the same seed share every pixel outside the
defect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .domains import Domain
from .objects import OBJECT_FAMILIES, Part
from .palette import rgb
from .textures import TEXTURE_FAMILIES, Params

Light = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _gradient(rng: np.random.Generator, lo: float, hi: float) -> Light:
    """A soft illumination slope (brightness varies a little across every real photo)."""
    gain = float(rng.uniform(lo, hi))
    ang = float(rng.uniform(0, 2 * np.pi))
    level = float(rng.uniform(0.95, 1.05))

    def light(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        return level * (1.0 + gain * ((uu - 0.5) * np.cos(ang) + (vv - 0.5) * np.sin(ang)))

    return light


@dataclass
class TextureScene:
    domain: Domain
    params: Params
    size: int
    light: Light

    @classmethod
    def sample(cls, domain: Domain, rng: np.random.Generator, size: int) -> TextureScene:
        params = TEXTURE_FAMILIES[domain.family].sample(domain.params, rng)
        return cls(domain, params, size, _gradient(rng, 0.0, 0.15))

    @property
    def colours(self) -> dict[str, str]:
        return self.domain.colours

    def render(
        self, u, v, params: Params | None = None, lit_at: tuple | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Base image (float, no noise) and the support where defects may lie (everywhere).

        ``lit_at`` evaluates the illumination at other coordinates than the pattern: a warp
        moves the material, not the light.
        """
        fam = TEXTURE_FAMILIES[self.domain.family]
        t = fam.field(u, v, params or self.params, 1.0 / self.size)[..., None]
        a, b = rgb(self.colours["a"]), rgb(self.colours["b"])
        lu, lv = (u, v) if lit_at is None else lit_at
        img = (a + (b - a) * t) * self.light(lu, lv)[..., None]
        return img.astype(np.float32), np.ones(u.shape, dtype=bool)


@dataclass
class ObjectScene:
    domain: Domain
    parts: list[Part]
    size: int
    pose: tuple[float, float, float, float]  # centre x, centre y, turn, scale
    light: Light
    bg_light: Light

    @classmethod
    def sample(cls, domain: Domain, rng: np.random.Generator, size: int) -> ObjectScene:
        fam = OBJECT_FAMILIES[domain.family]
        parts = fam.build(domain.params, rng)
        ox, oy = (0.5 + np.clip(rng.normal(0, 0.03, size=2), -0.06, 0.06)).tolist()
        turn = float(rng.uniform(-fam.max_turn, fam.max_turn))
        scale = float(rng.uniform(0.92, 1.08))
        light = _gradient(rng, 0.2, 0.4)
        bg_light = _gradient(rng, 0.05, 0.2)
        return cls(domain, parts, size, (ox, oy, turn, scale), light, bg_light)

    @property
    def colours(self) -> dict[str, str]:
        return self.domain.colours

    def local(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        ox, oy, turn, scale = self.pose
        c, s = np.cos(turn), np.sin(turn)
        du, dv = u - ox, v - oy
        return (du * c + dv * s) / scale, (-du * s + dv * c) / scale

    def background(self, u, v) -> np.ndarray:
        return (rgb(self.colours["background"]) * self.bg_light(u, v)[..., None]).astype(np.float32)

    def render(
        self, u, v, parts: list[Part] | None = None, lit_at: tuple | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Base image (float, no noise) and the object's own pixels (where defects may lie).

        ``lit_at``: see `TextureScene.render`.
        """
        lu, lv = (u, v) if lit_at is None else lit_at
        img = self.background(lu, lv)
        bg = img.copy()
        body = np.zeros(u.shape, dtype=bool)
        x, y = self.local(u, v)
        lit = self.light(lu, lv)[..., None]
        for part in self.parts if parts is None else parts:
            m = part.contains(x, y)
            if part.colour is None:
                img[m] = bg[m]
                body[m] = False
            else:
                col = rgb(self.colours[part.colour]) * part.shade * lit
                img[m] = col[m]
                body |= m
        return np.clip(img, 0.0, 1.0), body


Scene = TextureScene | ObjectScene


def sample_scene(domain: Domain, rng: np.random.Generator, size: int) -> Scene:
    if domain.category == "texture":
        return TextureScene.sample(domain, rng, size)
    return ObjectScene.sample(domain, rng, size)
