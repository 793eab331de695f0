"""Evaluation: run a model over a dataset, compute the paper's metrics per class, write the
table, the overlays and the raw per-image outputs.

The raw outputs (text score, q, prototype deviation μ, final map at the patch grid) are all the
prototype branch and Eq. 18 need, so `rescore` gives the metrics of any other (λ, top-k) without
running the model: λ and k act at inference only, and pixel metrics do not depend on them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from larp.backbone import BackboneFeatures
from larp.cache import CachedFeatureDataset, FeatureCache
from larp.data import AnomalyDataset, ImageRecord, denormalize, load_image, load_mask, read_records
from larp.errors import ConfigError
from larp.metrics import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    ClassMetrics,
    compute_metrics,
    f1_max,
    format_table_markdown,
    write_csv,
)
from larp.model import LaRPCLIP, backbone_autocast
from larp.pixel import gaussian_blur, upsample
from larp.prototype import image_scores
from larp.visualize import overlay_panel

OUTPUTS_TENSORS = "outputs.safetensors"
OUTPUTS_JSON = "outputs.json"
SUMMARY_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max")


@dataclass
class StoredOutputs:
    """Per-image raw outputs of one evaluation, in dataset order."""

    paths: list[str]
    mask_paths: list[str | None]
    classes: list[str]
    labels: np.ndarray  # [N] int
    text_score: torch.Tensor  # [N]
    q: torch.Tensor  # [N, h, w]
    deviation: torch.Tensor | None  # [N, h, w]
    final_map: torch.Tensor  # [N, h, w]
    image_size: int
    blur_sigma: float
    pixel_rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def scores(self, lam: float, top_k: int) -> torch.Tensor:
        return image_scores(self.text_score, self.q, self.deviation, lam, top_k)[1]

    def anomaly_maps(self, indices: Sequence[int]) -> torch.Tensor:
        """Input-size maps of some images, exactly as the evaluation scored them."""
        grid = self.final_map[list(indices)].float()
        return gaussian_blur(upsample(grid, self.image_size), self.blur_sigma)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "text_score": self.text_score.float().contiguous(),
            "q": self.q.float().contiguous(),
            "final_map": self.final_map.float().contiguous(),
            "labels": torch.as_tensor(self.labels, dtype=torch.int64),
        }
        if self.deviation is not None:
            tensors["deviation"] = self.deviation.float().contiguous()
        save_file(tensors, str(folder / OUTPUTS_TENSORS))
        meta = {
            "paths": self.paths,
            "mask_paths": self.mask_paths,
            "classes": self.classes,
            "image_size": self.image_size,
            "blur_sigma": self.blur_sigma,
            "pixel_rows": self.pixel_rows,
        }
        (folder / OUTPUTS_JSON).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> StoredOutputs:
        folder = Path(folder)
        if not (folder / OUTPUTS_JSON).is_file() or not (folder / OUTPUTS_TENSORS).is_file():
            raise ConfigError(
                f"{folder} holds no stored evaluation outputs ({OUTPUTS_JSON} + "
                f"{OUTPUTS_TENSORS}, written by `larp eval`)"
            )
        meta = json.loads((folder / OUTPUTS_JSON).read_text())
        tensors = load_file(str(folder / OUTPUTS_TENSORS))
        return cls(
            paths=meta["paths"],
            mask_paths=meta["mask_paths"],
            classes=meta["classes"],
            labels=tensors["labels"].numpy(),
            text_score=tensors["text_score"],
            q=tensors["q"],
            deviation=tensors.get("deviation"),
            final_map=tensors["final_map"],
            image_size=int(meta["image_size"]),
            blur_sigma=float(meta["blur_sigma"]),
            pixel_rows=meta["pixel_rows"],
        )


@dataclass
class EvalReport:
    """Per-class rows (+ "mean"), the deployment threshold and the stored outputs."""

    rows: dict[str, dict[str, float]]
    threshold: float
    lam: float
    top_k: int
    outputs: StoredOutputs

    @property
    def resolution(self) -> str:
        return f"{self.outputs.image_size}x{self.outputs.image_size}"

    def mean_metrics(self) -> dict[str, float]:
        """The class-mean figures (the paper's table row), as plain floats."""
        mean = self.rows["mean"]
        return {key: float(mean[key]) for key in SUMMARY_KEYS if key in mean}

    def to_dict(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "top_k": self.top_k,
            "threshold": self.threshold,
            "resolution": self.resolution,
            "mean": self.mean_metrics(),
            "per_class": self.rows,
        }

    def write(self, folder: str | Path, overlays: int = 8) -> Path:
        """metrics.json, per_class.csv/.md, outputs/ and `overlays` heat-map PNGs per class."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(_json_safe(self.to_dict()), indent=2))
        write_csv(self.rows, folder / "per_class.csv")
        table = format_table_markdown(self.rows, resolution=self.resolution)
        (folder / "per_class.md").write_text(table + "\n")
        self.outputs.save(folder / "outputs")
        if overlays > 0:
            write_overlays(self.outputs, folder / "overlays", per_class=overlays)
        return folder


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_overlays(outputs: StoredOutputs, folder: Path, per_class: int = 8) -> list[Path]:
    """Image | ground-truth outline | heat map for a sample: anomalous images first, per class."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen: list[int] = []
    for name in dict.fromkeys(outputs.classes):
        members = [i for i, c in enumerate(outputs.classes) if c == name]
        members.sort(key=lambda i: -int(outputs.labels[i]))
        chosen.extend(members[:per_class])
    written = []
    size = outputs.image_size
    maps = outputs.anomaly_maps(chosen) if chosen else []
    for index, anomaly in zip(chosen, maps, strict=True):
        image = denormalize(load_image(outputs.paths[index], size))
        rgb = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        mask_path = outputs.mask_paths[index]
        mask = load_mask(mask_path, size)[0].numpy() > 0.5 if mask_path else None
        stem = Path(outputs.paths[index]).stem
        path = folder / f"{outputs.classes[index]}_{index:05d}_{stem}.png"
        overlay_panel(rgb, anomaly, mask).save(path)
        written.append(path)
    return written


def _loader(
    model: LaRPCLIP,
    records: list[ImageRecord],
    cache: FeatureCache | None,
    batch_size: int,
    progress: bool,
    workers: int = 0,
) -> DataLoader:
    if cache is not None:
        keys, _ = cache.fill(records, batch_size, progress=progress)
        dataset = CachedFeatureDataset(cache, keys, records)
    else:
        dataset = AnomalyDataset(records, model.config.image_size)
    pin = next(model.parameters()).device.type == "cuda"
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin
    )


def evaluate(
    model: LaRPCLIP,
    data: str | Sequence[ImageRecord],
    *,
    lam: float | None = None,
    top_k: int | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 8,
    progress: bool = True,
    skip_bad: bool = False,
    precision: str = "auto",
    loader_workers: int = 0,
) -> EvalReport:
    """Metrics of `model` on a dataset spec (or records), at the model's input resolution.

    `loader_workers` decode and resize images in parallel processes (pinned memory on CUDA);
    `precision` is the backbone's (see `LaRPCLIP.predict`)."""
    lam = model.config.lam if lam is None else float(lam)
    top_k = model.config.top_k if top_k is None else int(top_k)
    if lam < 0 or top_k < 1:
        raise ConfigError(f"need λ >= 0 and top-k >= 1; got λ={lam}, k={top_k}")
    records = read_records(data, skip_bad=skip_bad) if isinstance(data, str) else list(data)
    was_training = model.training
    model.eval()
    size = model.config.image_size
    device = next(model.parameters()).device
    pixel = ClassMetrics()
    parts: dict[str, list[torch.Tensor]] = {"text": [], "q": [], "dev": [], "final": []}
    position = 0
    loader = _loader(model, records, cache, batch_size, progress, loader_workers)
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        if "patch_tokens" in batch:
            features = BackboneFeatures(batch["patch_tokens"], batch["global_feature"]).to(device)
        else:
            images = batch["image"].to(device, non_blocking=True)
            with backbone_autocast(device.type, precision):
                features = model.backbone.extract(images)
            features = features.to(torch.float32)
        result = model.predict_features(features, lam, top_k, blur=True, size=size)
        count = result.score.shape[0]
        classes = [r.class_name for r in records[position : position + count]]
        pixel.update(
            classes,
            result.score.cpu().numpy(),
            batch["label"].numpy(),
            result.anomaly_map.cpu().numpy(),
            batch["mask"][:, 0].numpy() > 0.5,
        )
        parts["text"].append(result.text_score.cpu())
        parts["q"].append(result.q.cpu())
        parts["final"].append(result.final_map.cpu())
        if result.prototype_deviation is not None:
            parts["dev"].append(result.prototype_deviation.cpu())
        position += count
    model.train(was_training)
    rows = pixel.compute()
    outputs = StoredOutputs(
        paths=[str(r.image_path) for r in records],
        mask_paths=[str(r.mask_path) if r.mask_path else None for r in records],
        classes=[r.class_name for r in records],
        labels=np.array([r.label for r in records], dtype=np.int64),
        text_score=torch.cat(parts["text"]),
        q=torch.cat(parts["q"]),
        deviation=torch.cat(parts["dev"]) if parts["dev"] else None,
        final_map=torch.cat(parts["final"]),
        image_size=size,
        blur_sigma=model.config.blur_sigma,
        pixel_rows={name: {k: row[k] for k in PIXEL_METRICS} for name, row in rows.items()},
    )
    _, threshold = pixel.overall_f1_max()
    return EvalReport(rows, float(threshold), lam, top_k, outputs)


def rescore(outputs: StoredOutputs, lam: float, top_k: int) -> EvalReport:
    """The report of another (λ, k) from stored outputs, without running the model."""
    if lam < 0 or top_k < 1:
        raise ConfigError(f"need λ >= 0 and top-k >= 1; got λ={lam}, k={top_k}")
    scores = outputs.scores(lam, top_k).numpy()
    image_rows = compute_metrics(outputs.classes, scores, outputs.labels)
    rows = {}
    for name, row in image_rows.items():
        merged = {k: row[k] for k in IMAGE_METRICS}
        merged.update(outputs.pixel_rows.get(name, {}))
        merged.update({k: row[k] for k in row if k not in merged})
        rows[name] = merged
    _, threshold = f1_max(scores, outputs.labels)
    return EvalReport(rows, float(threshold), float(lam), int(top_k), outputs)
