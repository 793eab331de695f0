"""Captions for contrastive pretraining of the synthetic-world tiny CLIP.

`larp.data.synthetic.describe` gives one fixed sentence per image. Pretraining wants a little
more: varied wording (so the text tower learns words, not one template), size words for the
defect ("a small hole", "a thin scratch"), rough locations ("near the top left"), and the
generic words LaRP's own prompt templates use ("object", "damaged", "flawless"), so the learned
prompts of `larp.prompts` start from tokens that mean something to this text tower.

`caption_pair` words the clean and the defective image of one scene with the SAME template and
subject, so the two captions differ only in the defect clause: a hard negative in text that
matches the hard negative in pixels (same scene with and without the defect).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from larp.data.synthetic.objects import OBJECT_FAMILIES
from larp.data.synthetic.textures import TEXTURE_FAMILIES

NORMAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a flawless {s}.",
    "a flawless {s}.",
    "a photo of a normal {s} without defects.",
    "a photo of an undamaged {s}.",
    "a clean {s} with no damage.",
)
DEFECT_TEMPLATES: tuple[str, ...] = (
    "a photo of {a_s} with {d}{w}.",
    "a photo of a damaged {s} with {d}{w}.",
    "{a_s} with {d}{w}.",
    "a damaged {s}: {d}{w}.",
    "a photo of a defective {s} with {d}{w}.",
)


def article(phrase: str) -> str:
    """`phrase` with "a" or "an" in front."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def noun(family: str) -> str:
    if family in TEXTURE_FAMILIES:
        return TEXTURE_FAMILIES[family].noun
    return OBJECT_FAMILIES[family].noun


def subject(info: dict[str, Any], form: str) -> str:
    """The thing in the picture, without article; `form` in full/short/noun/object."""
    colours, kind = info["colours"], noun(info["family"])
    texture = info["category"] == "texture"
    main = colours["a"] if texture else colours["body"]
    if form == "full":
        if texture:
            return f"{colours['a']} and {colours['b']} {kind}"
        return f"{colours['body']} {kind} on a {colours['background']} background"
    if form == "short":
        return f"{main} {kind}"
    if form == "object":
        return f"{main} {'surface' if texture else 'object'}"
    return kind


def defect_phrase(info: dict[str, Any], size: int) -> str:
    """What the defect is, with a size word where it says something ("a small red stain")."""
    kind, d = info["defect"], info.get("detail") or {}
    frac = float(info.get("area", 0)) / float(size * size)
    big = "large " if frac > 0.025 else ("small " if frac < 0.006 else "")
    if kind == "stain":
        return article(f"{big}{d.get('colour', '')} stain".replace("  ", " "))
    if kind == "hole":
        return article(f"{big}hole")
    if kind == "color_scratch":
        return article(f"thin {d.get('colour', '')} scratch".replace("  ", " "))
    if kind == "scratch":
        return "a thin scratch"
    if kind == "texture_change":
        return f"a patch of {d.get('change', 'different pattern')}"
    if kind == "warp":
        return {"bulge": "a bulge", "dent": "a dent", "twist": "a twisted area"}.get(
            d.get("mode", ""), "a deformed area"
        )
    if kind == "missing_part":
        return f"a missing {d.get('part', 'part')}"
    if kind == "misplaced_part":
        how = d.get("how", "misplaced")
        word = {"rotated": "rotated", "shifted": "shifted"}.get(how, "misplaced")
        return f"a {word} {d.get('part', 'part')}"
    return f"a {kind.replace('_', ' ')} defect"


def region_phrase(defective: dict[str, Any], size: int) -> str:
    """The defect alone, as a caption of the defect's region ("a small red stain at the top.")."""
    loc = defective.get("location")
    where = f" at the {loc}" if loc else ""
    return f"{defect_phrase(defective, size)}{where}."


def caption_pair(
    clean: dict[str, Any], defective: dict[str, Any], rng: np.random.Generator, size: int
) -> tuple[str, str]:
    """Captions of the clean and defective image of one scene, worded alike."""
    form = ("full", "full", "short", "noun", "object")[int(rng.integers(5))]
    s = subject(clean, form)
    normal = NORMAL_TEMPLATES[int(rng.integers(len(NORMAL_TEMPLATES)))].format(s=s)
    where_kind = int(rng.integers(3))
    loc = defective.get("location")
    w = "" if not loc or where_kind == 0 else (f" at the {loc}", f" near the {loc}")[where_kind - 1]
    template = DEFECT_TEMPLATES[int(rng.integers(len(DEFECT_TEMPLATES)))]
    bad = template.format(s=s, a_s=article(s), d=defect_phrase(defective, size), w=w)
    return normal, bad
