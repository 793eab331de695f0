"""Families, domains and the named sets.

A FAMILY is a kind of picture (stripes, washer, ...); a DOMAIN is a family with a palette
and parameters; a SET is a list of domains, one class each. ``source`` and ``target`` use
disjoint families, so evaluating a model trained on ``source`` against ``target`` is a real
zero-shot transfer: no target family (pattern or object type) is ever seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import objects, textures
from .objects import OBJECT_FAMILIES
from .palette import COLOURS, colour_distance, distinct_colours
from .textures import TEXTURE_FAMILIES

FAMILIES: dict[str, str] = {
    **{name: "texture" for name in TEXTURE_FAMILIES},
    **{name: "object" for name in OBJECT_FAMILIES},
}
SOURCE_FAMILIES: tuple[str, ...] = ("stripes", "checker", "grain", "washer", "plug")
TARGET_FAMILIES: tuple[str, ...] = ("weave", "dots", "rings", "screw", "card")

EASY_DEFECTS: tuple[str, ...] = ("stain", "hole", "color_scratch")
# Invisible to a colour rule: they only use colours the domain already has.
HARD_DEFECTS: tuple[str, ...] = (
    "scratch",
    "texture_change",
    "missing_part",
    "misplaced_part",
    "warp",
)
DEFECT_KINDS: tuple[str, ...] = EASY_DEFECTS + HARD_DEFECTS
TEXTURE_DEFECTS: tuple[str, ...] = (
    "stain",
    "hole",
    "color_scratch",
    "scratch",
    "texture_change",
    "warp",
)
OBJECT_DEFECTS: tuple[str, ...] = (
    "stain", "hole", "color_scratch", "scratch", "missing_part", "misplaced_part", "warp",
)  # fmt: skip


@dataclass(frozen=True)
class Domain:
    """``colours`` maps palette roles to colour names: textures use ``a``, ``b`` and
    ``substrate`` (what a hole shows); objects use ``background`` plus their family's roles."""

    name: str
    family: str
    colours: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str:
        return FAMILIES[self.family]

    @property
    def defect_kinds(self) -> tuple[str, ...]:
        return TEXTURE_DEFECTS if self.category == "texture" else OBJECT_DEFECTS

    def colour_names(self) -> list[str]:
        return list(dict.fromkeys(self.colours.values()))


def _tex(name: str, family: str, a: str, b: str, **params: Any) -> Domain:
    p = {**TEXTURE_FAMILIES[family].defaults, **params}
    return Domain(name, family, {"a": a, "b": b, "substrate": "black"}, p)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        _tex("stripes_navy", "stripes", "navy", "cream"),
        _tex("checker_rust", "checker", "rust", "sand"),
        _tex("grain_oak", "grain", "brown", "tan"),
        Domain("washer_steel", "washer", {"body": "steel", "background": "charcoal"}),
        Domain(
            "plug_white",
            "plug",
            {"body": "white", "cable": "black", "pin": "brass", "background": "slate"},
        ),
        _tex("weave_olive", "weave", "olive", "khaki"),
        _tex("dots_teal", "dots", "teal", "white"),
        _tex("rings_walnut", "rings", "walnut", "honey"),
        Domain("screw_brass", "screw", {"body": "brass", "background": "slate"}),
        Domain(
            "card_pcb",
            "card",
            {"body": "green", "chip": "black", "pad": "gold", "background": "grey"},
        ),
    )
}

SETS: dict[str, tuple[str, ...]] = {
    "source": tuple(n for n, d in DOMAINS.items() if d.family in SOURCE_FAMILIES),
    "target": tuple(n for n, d in DOMAINS.items() if d.family in TARGET_FAMILIES),
}


def get_domain(domain: Domain | str) -> Domain:
    if isinstance(domain, Domain):
        return domain
    try:
        return DOMAINS[domain]
    except KeyError:
        raise KeyError(f"unknown synthetic domain {domain!r}; known: {sorted(DOMAINS)}") from None


def make_domain(family: str, rng: np.random.Generator, name: str | None = None) -> Domain:
    """A new random domain of ``family`` (random palette and parameters).

    Pretraining draws many of these from the source families so the tiny CLIP sees more
    than the few fixed domains of the named sets.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    if FAMILIES[family] == "texture":
        a, b = distinct_colours(rng, 2, min_dist=0.35)
        # A hole must show something the texture is not made of.
        dark = min(colour_distance(a, "black"), colour_distance(b, "black")) < 0.35
        colours = {"a": a, "b": b, "substrate": "white" if dark else "black"}
        params = textures.random_params(family, rng)
    else:
        roles = ("background",) + OBJECT_FAMILIES[family].roles
        colours = dict(zip(roles, distinct_colours(rng, len(roles), min_dist=0.3), strict=True))
        params = objects.random_params(family, rng)
    assert all(c in COLOURS for c in colours.values())
    return Domain(
        name or f"{family}_{colours.get('a', colours.get('body'))}", family, colours, params
    )
