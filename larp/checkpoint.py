"""Checkpoints: the trained weights only (prompts, α, ψ) in safetensors, plus a JSON manifest.

A checkpoint is a folder `weights.safetensors` + `manifest.json`. The manifest holds the model
config, the backbone identity (name, pretrained, weights checksum), the training data, metrics and
decision threshold, and the sha256 of the weights file. Loading verifies all of it and refuses
anything else with a message that says what is wrong. No pickle anywhere: safetensors and JSON
cannot execute code.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from larp.backbone import FrozenBackbone
from larp.config import LaRPConfig
from larp.errors import CheckpointError, ConfigError, LaRPError
from larp.files import file_sha256
from larp.model import LaRPCLIP

FORMAT = "larp-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


def save_checkpoint(
    model: LaRPCLIP,
    directory: str | Path,
    *,
    training_data: Any = None,
    metrics: dict[str, float] | None = None,
    threshold: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model`'s trained weights and manifest into `directory` (created; files replaced
    atomically so a reader never sees a half-written checkpoint). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    weights_tmp = _temp_path(directory, WEIGHTS_FILE)
    save_file(state, str(weights_tmp), metadata={"format": FORMAT})
    weights_sha = file_sha256(weights_tmp)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": weights_sha[:12],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": model.config.to_dict(),
        "backbone": model.backbone.identity(),
        "weights": {"file": WEIGHTS_FILE, "sha256": weights_sha},
        "training_data": training_data,
        "metrics": metrics or {},
        "threshold": threshold,
        "extra": extra or {},
    }
    manifest_tmp = _temp_path(directory, MANIFEST_FILE)
    manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(weights_tmp, directory / WEIGHTS_FILE)
    os.replace(manifest_tmp, directory / MANIFEST_FILE)
    return directory


def _temp_path(directory: Path, name: str) -> Path:
    handle, path = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(handle)
    return Path(path)


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder and its checked manifest; `path` is the folder or its manifest."""
    path = Path(path)
    directory = path.parent if path.name == MANIFEST_FILE else path
    manifest_path = directory / MANIFEST_FILE
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}")
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{directory} is not a LaRP checkpoint: no {MANIFEST_FILE} (a checkpoint is a folder "
            f"with {MANIFEST_FILE} and {WEIGHTS_FILE}, written by larp.save_checkpoint)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a LaRP checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path} has format version {manifest.get('format_version')!r}; this LaRP "
            f"reads version {FORMAT_VERSION}"
        )
    for key in ("config", "backbone", "weights"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{manifest_path} lacks its {key!r} section")
    return directory, manifest


def load_checkpoint(
    path: str | Path,
    *,
    backbone: FrozenBackbone | None = None,
    device: str | torch.device = "cpu",
) -> LaRPCLIP:
    """Rebuild a `LaRPCLIP` from a checkpoint, verified, in eval mode.

    The model's `.manifest` holds the manifest (threshold, metrics, ...). Pass `backbone` to reuse
    an already loaded one; it must be the checkpoint's backbone (same weights checksum).
    """
    directory, manifest = read_manifest(path)
    weights_info = manifest["weights"]
    weights_path = directory / str(weights_info.get("file", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights missing: {weights_path}")
    actual = file_sha256(weights_path)
    if actual != weights_info.get("sha256"):
        raise CheckpointError(
            f"checksum mismatch for {weights_path}: manifest says {weights_info.get('sha256')}, "
            f"file has {actual}. The file was changed or corrupted after saving; refusing it."
        )
    try:
        config = LaRPConfig.from_dict(manifest["config"])
    except LaRPError as exc:
        raise CheckpointError(f"checkpoint config is invalid: {exc}") from exc
    try:
        model = LaRPCLIP(config, backbone=backbone)
    except ConfigError as exc:  # the given backbone is not the checkpoint's
        raise CheckpointError(
            f"checkpoint {directory} does not fit the given backbone: {exc}"
        ) from exc
    expected = manifest["backbone"]
    mine = model.backbone.identity()
    for key in ("name", "image_size", "weights_sha256"):
        if expected.get(key) != mine[key]:
            raise CheckpointError(
                f"checkpoint {directory} was trained on backbone {key}={expected.get(key)!r}, "
                f"but the backbone here has {key}={mine[key]!r}; refusing to mix them"
            )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    own = model.trainable_state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not fit the config: missing {missing}, unexpected {unexpected}"
        )
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise CheckpointError(
                f"{weights_path}: {key} has shape {tuple(tensor.shape)}, the config needs "
                f"{tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    model.manifest = manifest
    model.checkpoint_dir = directory
    return model.to(device).eval()
