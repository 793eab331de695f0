"""In-memory rendering of one sample and its caption (also used by CLIP pretraining)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .defects import Ctx, apply_defect
from .domains import Domain, get_domain
from .geometry import bbox, grid, location_name
from .objects import OBJECT_FAMILIES
from .scenes import sample_scene
from .textures import TEXTURE_FAMILIES


def render_sample(
    domain: Domain | str,
    defect_kind: str | None,
    rng: np.random.Generator,
    size: int = 128,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One image ``uint8 [size,size,3]``, its defect mask ``bool [size,size]`` and info.

    The clean scene and its sensor noise are drawn from ``rng`` first, the defect after, so
    the same seed with ``defect_kind=None`` gives the identical image without the defect.
    """
    dom = get_domain(domain)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if defect_kind is not None and defect_kind not in dom.defect_kinds:
        raise ValueError(
            f"defect {defect_kind!r} does not apply to {dom.category} domain {dom.name!r}; "
            f"choose from {dom.defect_kinds}"
        )
    scene = sample_scene(dom, rng, size)
    noise = rng.normal(0.0, float(dom.params.get("noise", 0.012)), size=(size, size, 3))
    u, v = grid(size)
    base, body = scene.render(u, v)
    info: dict[str, Any] = {
        "domain": dom.name,
        "family": dom.family,
        "category": dom.category,
        "colours": dict(dom.colours),
        "defect": "good",
        "location": None,
        "bbox": None,
        "area": 0,
        "detail": {},
    }
    mask = np.zeros((size, size), dtype=bool)
    if defect_kind is not None:
        base, mask, detail = apply_defect(Ctx(scene, u, v, base, body, rng), defect_kind)
        info.update(
            defect=defect_kind,
            location=location_name(mask),
            bbox=bbox(mask),
            area=int(mask.sum()),
            detail=detail,
        )
    image = np.clip(np.rint((base + noise) * 255.0), 0, 255).astype(np.uint8)
    info["caption"] = describe(info)
    return image, mask, info


def _noun(family: str) -> str:
    if family in TEXTURE_FAMILIES:
        return TEXTURE_FAMILIES[family].noun
    return OBJECT_FAMILIES[family].noun


def _defect_phrase(info: dict[str, Any]) -> str:
    kind, d = info["defect"], info.get("detail") or {}
    if kind == "stain":
        return f"a {d.get('colour', '')} stain".replace("  ", " ")
    if kind == "hole":
        return "a hole"
    if kind == "color_scratch":
        return f"a {d.get('colour', '')} scratch".replace("  ", " ")
    if kind == "scratch":
        return "a scratch"
    if kind == "texture_change":
        return f"a patch of {d.get('change', 'different pattern')}"
    if kind == "warp":
        return {"bulge": "a bulge", "dent": "a dent"}.get(d.get("mode", ""), "a deformed area")
    if kind == "missing_part":
        return f"a missing {d.get('part', 'part')}"
    if kind == "misplaced_part":
        return f"a misplaced {d.get('part', 'part')}"
    return f"a {kind.replace('_', ' ')} defect"


def describe(info: dict[str, Any]) -> str:
    """Caption for a sample's info dict, e.g. for contrastive text-image pretraining.

    "a photo of a navy and cream striped texture with a red stain at the top left."
    "a photo of a flawless steel washer on a charcoal background."
    """
    colours = info["colours"]
    noun = _noun(info["family"])
    if info["category"] == "texture":
        subject = f"a {colours['a']} and {colours['b']} {noun}"
    else:
        subject = f"a {colours['body']} {noun} on a {colours['background']} background"
    if info["defect"] == "good":
        return f"a photo of a flawless {subject.removeprefix('a ')}."
    where = f" at the {info['location']}" if info.get("location") else ""
    return f"a photo of {subject} with {_defect_phrase(info)}{where}."
