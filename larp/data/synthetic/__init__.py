"""Deterministic synthetic anomaly data: textures and simple objects with exact masks.

Why it exists: no real data set or weights can be downloaded where this project is built
and tested, yet training, evaluation and the sweep must run end to end and measure a real
zero-shot transfer. ``synthetic:source`` and ``synthetic:target`` use disjoint families.

Spec form (see `larp.data.readers`)::

    synthetic:NAME                      e.g. synthetic:source, synthetic:target
    synthetic:NAME?seed=3&n=20&size=128 n sets n_normal and n_defect together;
                                        also n_normal=, n_defect=, n_train=

Half the defect kinds (`HARD_DEFECTS`) use only the domain's own colours, so a per-pixel
colour-outlier rule cannot find them; figures should report both kinds of defects.
"""

from .domains import (
    DEFECT_KINDS,
    DOMAINS,
    EASY_DEFECTS,
    FAMILIES,
    HARD_DEFECTS,
    OBJECT_DEFECTS,
    SETS,
    SOURCE_FAMILIES,
    TARGET_FAMILIES,
    TEXTURE_DEFECTS,
    Domain,
    get_domain,
    make_domain,
)
from .render import describe, render_sample
from .writer import GENERATOR_VERSION, default_root, generate_set, set_dirname

__all__ = [
    "DEFECT_KINDS",
    "DOMAINS",
    "EASY_DEFECTS",
    "FAMILIES",
    "GENERATOR_VERSION",
    "HARD_DEFECTS",
    "OBJECT_DEFECTS",
    "SETS",
    "SOURCE_FAMILIES",
    "TARGET_FAMILIES",
    "TEXTURE_DEFECTS",
    "Domain",
    "default_root",
    "describe",
    "generate_set",
    "get_domain",
    "make_domain",
    "render_sample",
    "set_dirname",
]
