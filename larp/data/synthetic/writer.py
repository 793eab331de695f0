"""Writing a named set to disk in MVTec layout, so the real folder reader is what runs.

Layout per set folder::

    <domain>/train/good/000.png
    <domain>/test/good/000.png
    <domain>/test/<defect>/000.png
    <domain>/ground_truth/<defect>/000_mask.png
    metadata.json     (per image: family, domain, colours, defect, location, caption)

Sets are cached under ``$LARP_DATA_DIR`` (else ``~/.cache/larp/synthetic``) in a folder
named by everything that changes the bytes, and published with one atomic rename, so
concurrent workers asking for the same set never see half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .domains import DOMAINS, FAMILIES, SETS, SOURCE_FAMILIES, TARGET_FAMILIES, Domain
from .render import render_sample

# Bump whenever a change to the generator changes any output byte: old caches stay valid
# for old code and are never mistaken for new ones.
GENERATOR_VERSION = 1

_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}


def default_root() -> Path:
    env = os.environ.get("LARP_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "larp" / "synthetic"


def set_dirname(name: str, seed: int, n_normal: int, n_defect: int, n_train: int, size: int) -> str:
    return f"{name}-v{GENERATOR_VERSION}-seed{seed}-n{n_normal}x{n_defect}-t{n_train}-{size}px"


def _rng(seed: int, cls_index: int, split: str, i: int) -> np.random.Generator:
    """One independent stream per image: adding images never changes the existing ones."""
    return np.random.default_rng([seed, cls_index, _SPLIT_CODES[split], i])


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def _write_class(
    out: Path, cls_index: int, dom: Domain, seed: int, n_normal: int, n_defect: int, n_train: int,
    size: int,
) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {}

    def save(rel: str, img: np.ndarray, info: dict[str, Any]) -> None:
        _save_png(out / rel, img)
        meta[rel] = info

    for i in range(n_train):
        img, _, info = render_sample(dom, None, _rng(seed, cls_index, "train", i), size)
        save(f"{dom.name}/train/good/{i:03d}.png", img, info)
    for i in range(n_normal):
        img, _, info = render_sample(dom, None, _rng(seed, cls_index, "test_good", i), size)
        save(f"{dom.name}/test/good/{i:03d}.png", img, info)
    kinds = dom.defect_kinds
    # Cycle through the kinds so every kind occurs once n_defect >= len(kinds).
    for i in range(n_defect):
        kind = kinds[i % len(kinds)]
        img, mask, info = render_sample(dom, kind, _rng(seed, cls_index, "test_defect", i), size)
        mask_rel = f"{dom.name}/ground_truth/{kind}/{i:03d}_mask.png"
        info["mask"] = mask_rel
        save(f"{dom.name}/test/{kind}/{i:03d}.png", img, info)
        _save_png(out / mask_rel, mask.astype(np.uint8) * 255)
    return meta


def _write_set(
    out: Path, name: str, domains: list[Domain], seed: int, n_normal: int, n_defect: int,
    n_train: int, size: int,
) -> None:  # fmt: skip
    images: dict[str, Any] = {}
    for k, dom in enumerate(domains):
        images.update(_write_class(out, k, dom, seed, n_normal, n_defect, n_train, size))
    meta = {
        "set": name,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "n_normal": n_normal,
        "n_defect": n_defect,
        "n_train": n_train,
        "classes": [d.name for d in domains],
        "domains": {
            d.name: {"family": d.family, "category": d.category, "colours": d.colours}
            for d in domains
        },
        "families": FAMILIES,
        "source_families": list(SOURCE_FAMILIES),
        "target_families": list(TARGET_FAMILIES),
        "images": images,
    }
    text = json.dumps(meta, indent=1, sort_keys=True, default=_json_default)
    (out / "metadata.json").write_text(text + "\n", encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def generate_set(
    name: str,
    root: str | Path | None = None,
    seed: int = 0,
    n_normal: int = 12,
    n_defect: int = 12,
    size: int = 128,
    n_train: int = 4,
) -> Path:
    """Write (or reuse) the named set and return its folder, ready for ``folder:`` reading.

    ``root`` is the cache folder (default `default_root`); the set lands in a subfolder named
    by set, generator version, seed, counts and size.
    """
    if name not in SETS:
        raise DatasetError(f"unknown synthetic set {name!r}; known sets: {sorted(SETS)}")
    if n_normal < 1 or n_defect < 1 or n_train < 0:
        raise DatasetError(
            f"synthetic set needs n_normal >= 1, n_defect >= 1, n_train >= 0; "
            f"got {n_normal}, {n_defect}, {n_train}"
        )
    if size < 32:
        raise DatasetError(f"synthetic image size must be at least 32, got {size}")
    base = Path(root).expanduser() if root is not None else default_root()
    final = base / set_dirname(name, seed, n_normal, n_defect, n_train, size)
    if final.is_dir():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=base))
    try:
        domains = [DOMAINS[d] for d in SETS[name]]
        _write_set(tmp, name, domains, seed, n_normal, n_defect, n_train, size)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a shared cache must be readable
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
