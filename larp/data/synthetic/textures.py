"""Texture families: each is a field ``t(U, V) in [0, 1]`` mixing two palette colours.

A family exposes ``sample`` (one image's parameters around the domain's), ``field`` and
``change`` (parameters a defect patch uses instead: the pattern turned or rescaled, which
no colour rule can see because the colours stay the domain's own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Params = dict[str, Any]


def _rotated(u: np.ndarray, v: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    return u * c + v * s, -u * s + v * c


def _jitter(p: Params, rng: np.random.Generator) -> Params:
    """Per-image variation every texture shares: small turn, small scale, random phase."""
    q = dict(p)
    q["theta"] = float(p.get("theta", 0.0) + rng.normal(0, 0.05))
    q["freq"] = float(p["freq"] * rng.uniform(0.95, 1.05))
    q["phase_a"] = float(rng.uniform(0, 1))
    q["phase_b"] = float(rng.uniform(0, 1))
    return q


def _turn_or_scale(p: Params, rng: np.random.Generator, turn: bool = True) -> tuple[Params, str]:
    q = dict(p)
    if turn and rng.random() < 0.5:
        q["theta"] = p["theta"] + float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.2))
        return q, "rotated pattern"
    if rng.random() < 0.5:
        q["freq"] = p["freq"] * float(rng.uniform(1.7, 2.3))
        return q, "finer pattern"
    q["freq"] = p["freq"] / float(rng.uniform(1.7, 2.3))
    return q, "coarser pattern"


# -- fields ---------------------------------------------------------------------------------


def _stripes(u, v, p: Params, px: float) -> np.ndarray:
    a, b = _rotated(u, v, p["theta"])
    x = p["freq"] * a + p["phase_a"] + p["wobble"] * np.sin(2 * np.pi * (2.0 * b + p["phase_b"]))
    edge = np.cos(2 * np.pi * x) - np.cos(np.pi * p["duty"])
    return np.clip(0.5 + edge / (2 * np.pi * p["freq"] * px), 0.0, 1.0)


def _checker(u, v, p: Params, px: float) -> np.ndarray:
    a, b = _rotated(u, v, p["theta"])
    s = np.sin(2 * np.pi * (p["freq"] * a + p["phase_a"])) * np.sin(
        2 * np.pi * (p["freq"] * b + p["phase_b"])
    )
    return np.clip(0.5 + s / (4 * np.pi * p["freq"] * px), 0.0, 1.0)


def _grain(u, v, p: Params, px: float) -> np.ndarray:
    acc = np.zeros_like(u)
    for k, (dt, fs, ph, amp) in enumerate(p["waves"]):
        a, _ = _rotated(u, v, p["theta"] + dt)
        acc += amp * np.cos(2 * np.pi * (p["freq"] * fs * a + ph + (k % 2) * p["phase_a"]))
    acc /= np.sqrt(sum(w[3] ** 2 for w in p["waves"]) / 2)
    return 0.5 + 0.5 * np.tanh(1.6 * acc)


def _weave(u, v, p: Params, px: float) -> np.ndarray:
    a, b = _rotated(u, v, p["theta"])
    a = a * p["freq"] + p["phase_a"]
    b = b * p["freq"] + p["phase_b"]
    parity = (np.floor(a) + np.floor(b)) % 2
    across = np.where(parity == 0, b, a)  # threads run along a in one cell, along b in the next
    threads = 0.5 + 0.5 * np.cos(2 * np.pi * p["threads"] * across)
    fa, fb = a - np.floor(a), b - np.floor(b)
    gap = np.minimum(np.minimum(fa, 1 - fa), np.minimum(fb, 1 - fb)) * (1.0 / (p["freq"] * px))
    return threads * np.clip(gap / 1.5, 0.0, 1.0)


def _dots(u, v, p: Params, px: float) -> np.ndarray:
    a, b = _rotated(u, v, p["theta"])
    a = a * p["freq"] + p["phase_a"]
    b = b * p["freq"] + p["phase_b"]
    if p["hex"]:
        a = a + 0.5 * (np.floor(b) % 2)
    da, db = a - np.floor(a) - 0.5, b - np.floor(b) - 0.5
    d = np.hypot(da, db)
    return np.clip(0.5 + (p["radius"] - d) / (p["freq"] * px), 0.0, 1.0)


def _rings(u, v, p: Params, px: float) -> np.ndarray:
    a, b = _rotated(u - p["cx"], v - p["cy"], p["theta"])
    r = np.hypot(a * p["stretch"], b)
    r = r + 0.015 * np.sin(2 * np.pi * (3.0 * a + p["phase_b"]))
    c = np.cos(2 * np.pi * (p["freq"] * r + p["phase_a"]))
    return np.clip(0.5 + 0.5 * c / max(0.35, 2 * np.pi * p["freq"] * px), 0.0, 1.0)


# -- per-family parameter sampling ------------------------------------------------------------


def _sample_stripes(p: Params, rng) -> Params:
    return _jitter(p, rng)


def _sample_grain(p: Params, rng) -> Params:
    q = _jitter(p, rng)
    n = int(p.get("n_waves", 10))
    q["waves"] = [
        (
            float(rng.normal(0, p.get("spread", 0.12))),
            float(rng.uniform(0.4, 1.6)),
            float(rng.uniform(0, 1)),
            float(rng.uniform(0.3, 1.0)),
        )
        for _ in range(n)
    ]
    return q


def _sample_rings(p: Params, rng) -> Params:
    q = _jitter(p, rng)
    q["cx"] = float(p.get("cx", 0.5) + rng.normal(0, 0.15))
    q["cy"] = float(p.get("cy", -0.3) + rng.normal(0, 0.15))
    q["stretch"] = float(p.get("stretch", 1.0))
    return q


def _change_dots(p: Params, rng) -> tuple[Params, str]:
    q = dict(p)
    roll = rng.random()
    if roll < 0.35:
        q["freq"] = p["freq"] * float(rng.uniform(1.7, 2.2))
        return q, "denser dots"
    if roll < 0.7:
        q["radius"] = p["radius"] * float(rng.uniform(0.35, 0.55))
        return q, "smaller dots"
    q["freq"] = p["freq"] / float(rng.uniform(1.6, 2.0))
    q["radius"] = min(0.45, p["radius"] * 1.3)
    return q, "larger dots"


def _change_rings(p: Params, rng) -> tuple[Params, str]:
    q, what = _turn_or_scale(p, rng, turn=False)
    return q, what.replace("pattern", "grain")


@dataclass(frozen=True)
class TextureFamily:
    name: str
    noun: str
    field: Callable[..., np.ndarray]
    sample: Callable[[Params, np.random.Generator], Params]
    change: Callable[[Params, np.random.Generator], tuple[Params, str]]
    defaults: Params


TEXTURE_FAMILIES: dict[str, TextureFamily] = {
    f.name: f
    for f in (
        TextureFamily(
            "stripes", "striped texture", _stripes, _sample_stripes, _turn_or_scale,
            {"freq": 8.0, "theta": 0.3, "duty": 0.5, "wobble": 0.12},
        ),
        TextureFamily(
            "checker", "checkered texture", _checker, _sample_stripes, _turn_or_scale,
            {"freq": 4.0, "theta": 0.0},
        ),
        TextureFamily(
            "grain", "grainy texture", _grain, _sample_grain, _turn_or_scale,
            {"freq": 9.0, "theta": 1.4, "spread": 0.12, "n_waves": 10},
        ),
        TextureFamily(
            "weave", "woven texture", _weave, _sample_stripes, _turn_or_scale,
            {"freq": 5.0, "theta": 0.0, "threads": 3},
        ),
        TextureFamily(
            "dots", "dotted texture", _dots, _sample_stripes, _change_dots,
            {"freq": 7.0, "theta": 0.2, "radius": 0.3, "hex": True},
        ),
        TextureFamily(
            "rings", "wood grain texture", _rings, _sample_rings, _change_rings,
            {"freq": 9.0, "theta": 0.0, "cx": 0.5, "cy": -0.3, "stretch": 1.0},
        ),
    )
}  # fmt: skip


def random_params(family: str, rng: np.random.Generator) -> Params:
    """Domain-level parameters for a random new texture domain (pretraining variety)."""
    p = dict(TEXTURE_FAMILIES[family].defaults)
    p["theta"] = float(rng.uniform(0, np.pi))
    p["freq"] = float(p["freq"] * rng.uniform(0.7, 1.4))
    if family == "stripes":
        p["duty"] = float(rng.uniform(0.35, 0.65))
        p["wobble"] = float(rng.uniform(0.0, 0.2))
    elif family == "dots":
        p["radius"] = float(rng.uniform(0.22, 0.38))
        p["hex"] = bool(rng.random() < 0.5)
    elif family == "weave":
        p["threads"] = int(rng.integers(2, 5))
    elif family == "rings":
        p["stretch"] = float(rng.uniform(0.6, 1.6))
    return p
