"""Backbones that ship inside the package: the tiny CLIP pretrained on the synthetic world.

`shipped_weights_path` maps an (open_clip model name, pretrained tag) pair to a weights file
inside the package, so `LaRPConfig(backbone="larp-tiny-synthetic", pretrained="synthetic")` names
shipped weights like any open_clip tag. Each file has a manifest beside it (same stem, `.json`:
model config, recipe, seed, steps, sha256 of the file, reference outputs), written by
`python -m larp.zoo.pretrain_tiny`. The file is checked against the manifest before open_clip
ever reads it: a corrupted, truncated or swapped file, a missing manifest, or an open_clip
config that changed since the weights were made is refused with a `BackboneError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from larp.errors import BackboneError
from larp.files import file_sha256

MODEL_NAME = "larp-tiny-synthetic"
TAG = "synthetic"
WEIGHTS_DIR = Path(__file__).parent / "weights"
_CONFIG_DIR = Path(__file__).parent.parent / "model_configs"

# (model name, tag) -> file name under WEIGHTS_DIR
SHIPPED: dict[tuple[str, str], str] = {
    (MODEL_NAME, TAG): f"{MODEL_NAME}.safetensors",
}

# path -> (size, mtime_ns, sha256): hashing ~9 MB each time a backbone is built is cheap, but
# tests and sweeps build many; a file changed in place gets a new mtime and is hashed again.
_digests: dict[str, tuple[int, int, str]] = {}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = str(path.resolve())
    hit = _digests.get(key)
    if hit is not None and hit[:2] == (stat.st_size, stat.st_mtime_ns):
        return hit[2]
    value = file_sha256(path)
    _digests[key] = (stat.st_size, stat.st_mtime_ns, value)
    return value


def manifest_path_for(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_manifest(weights: str | Path) -> dict[str, Any]:
    """The manifest beside a weights file, or a `BackboneError` saying what is wrong."""
    path = manifest_path_for(weights)
    if not path.is_file():
        raise BackboneError(
            f"no manifest {path.name} beside {weights}: shipped weights are only loaded "
            "with their manifest (rebuild with `python -m larp.zoo.pretrain_tiny --install`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackboneError(f"unreadable manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise BackboneError(f"manifest {path} has no sha256 of its weights file")
    return manifest


def verify_weights(weights: str | Path, model_name: str, tag: str) -> dict[str, Any]:
    """Check a shipped weights file against its manifest; return the manifest."""
    weights = Path(weights)
    if not weights.is_file():
        raise BackboneError(
            f"shipped weights for {model_name!r}/{tag!r} are missing: {weights} "
            "(rebuild with `python -m larp.zoo.pretrain_tiny --out DIR --install`)"
        )
    manifest = read_manifest(weights)
    if (manifest.get("name"), manifest.get("tag")) != (model_name, tag):
        raise BackboneError(
            f"{weights} is described as {manifest.get('name')!r}/{manifest.get('tag')!r}, "
            f"not {model_name!r}/{tag!r}"
        )
    actual = _cached_sha256(weights)
    if actual != manifest["sha256"]:
        raise BackboneError(
            f"checksum mismatch for shipped weights {weights}: sha256 {actual} but the manifest "
            f"says {manifest['sha256']}; the file is corrupted or was replaced. Reinstall the "
            "package or rebuild with `python -m larp.zoo.pretrain_tiny --install`."
        )
    config_file = _CONFIG_DIR / f"{model_name}.json"
    if config_file.is_file() and "open_clip_config" in manifest:
        current = json.loads(config_file.read_text())
        if current != manifest["open_clip_config"]:
            raise BackboneError(
                f"the open_clip config {config_file.name} changed since {weights.name} was "
                "trained (the manifest holds the config it was trained with); retrain the weights"
            )
    return manifest


def shipped_weights_path(model_name: str, tag: str) -> Path | None:
    """The packaged, checksum-verified weights file for `model_name`/`tag`, or None if nothing
    ships for the pair. Raises `BackboneError` if the file fails its manifest."""
    file_name = SHIPPED.get((model_name, tag))
    if not file_name:
        return None
    path = WEIGHTS_DIR / file_name
    verify_weights(path, model_name, tag)
    return path


def shipped_manifest(model_name: str = MODEL_NAME, tag: str = TAG) -> dict[str, Any]:
    """The verified manifest of a shipped backbone."""
    file_name = SHIPPED.get((model_name, tag))
    if not file_name:
        raise BackboneError(f"nothing ships for {model_name!r}/{tag!r}; shipped: {sorted(SHIPPED)}")
    return verify_weights(WEIGHTS_DIR / file_name, model_name, tag)
