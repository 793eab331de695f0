"""The training loop (paper §3.5 objective, SPEC §1.6 defaults), free of Ray.

`Trainer` runs on one worker of a data-parallel group (or alone): it builds the model, shards the
data, optimises prompts, α and ψ with Adam, evaluates, and hands a checkpoint folder to a `report`
callback every epoch. `larp.train` plugs it into Ray Train; tests and benchmarks call it directly.

Gradients are averaged with an explicit all-reduce instead of DDP: DDP would broadcast every
module parameter at start, i.e. the whole frozen backbone (1.7 GB for ViT-L), while only a few MB
are trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from larp.backbone import BackboneFeatures, FrozenBackbone
from larp.cache import CachedFeatureDataset, FeatureCache
from larp.checkpoint import load_checkpoint, save_checkpoint
from larp.config import LaRPConfig, dataclass_from_dict
from larp.data import AnomalyDataset, ImageRecord, read_records
from larp.errors import ConfigError
from larp.losses import larp_loss
from larp.model import LaRPCLIP

MODEL_DIR = "model"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass(frozen=True)
class TrainConfig:
    """How to train (data, optimiser, schedule, scale, storage); the model is in `LaRPConfig`."""

    train_data: str = "synthetic:source"
    eval_data: str | None = "synthetic:target"
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    storage_path: str = "larp_runs"
    name: str | None = None
    num_to_keep: int = 2
    checkpoint_score_attribute: str | None = None
    max_failures: int = 1
    use_cache: bool = True
    cache_dir: str | None = None
    cache_budget_gb: float = 20.0
    skip_bad: bool = False
    progress: bool = True
    eval_lam: float | None = None
    eval_top_k: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1) (got {self.betas})")
        if self.num_workers < 1:
            problems.append(f"num_workers must be >= 1 (got {self.num_workers})")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            problems.append("cpus_per_worker and gpus_per_worker must be >= 0")
        if self.num_to_keep < 1:
            problems.append(f"num_to_keep must be >= 1 (got {self.num_to_keep})")
        if self.max_failures < -1:
            problems.append(
                f"max_failures must be >= -1 (-1: retry forever; got {self.max_failures})"
            )
        if not self.cache_budget_gb > 0:
            problems.append(f"cache_budget_gb must be > 0 (got {self.cache_budget_gb})")
        if self.eval_lam is not None and self.eval_lam < 0:
            problems.append(f"eval_lam must be >= 0 (got {self.eval_lam})")
        if self.eval_top_k is not None and self.eval_top_k < 1:
            problems.append(f"eval_top_k must be >= 1 (got {self.eval_top_k})")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shard(records: list[ImageRecord], rank: int, world: int) -> list[ImageRecord]:
    """Round-robin shard; every worker gets the same number of items (padding by repetition) so
    all workers run the same number of steps and the all-reduce never waits forever."""
    per_worker = math.ceil(len(records) / world)
    padded = (records * math.ceil(per_worker * world / max(1, len(records))))[: per_worker * world]
    return padded[rank::world]


def batch_features(batch: dict, backbone: FrozenBackbone, device: torch.device) -> BackboneFeatures:
    """Backbone features of a batch: from the cache when present, else a frozen forward pass."""
    if "patch_tokens" in batch:
        return BackboneFeatures(batch["patch_tokens"], batch["global_feature"]).to(device)
    return backbone.extract(batch["image"].to(device))


# ---------------------------------------------------------------------- optimiser state I/O
def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, extra: dict) -> None:
    """Optimizer state as safetensors + JSON (no pickle, like the model checkpoint)."""
    state = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(directory / STATE_TENSORS))
    meta = dict(extra, param_groups=state["param_groups"], scalars=scalars)
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=2))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> dict:
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta.pop("scalars").items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


# ---------------------------------------------------------------------- the loop
ReportFn = Callable[[dict[str, Any], Path | None], None]


class Trainer:
    """One worker's training run; `rank`/`world` come from Ray Train (or 0/1 alone)."""

    def __init__(
        self,
        model_config: LaRPConfig,
        train_config: TrainConfig,
        rank: int = 0,
        world: int = 1,
        device: str | torch.device = "cpu",
        backbone: FrozenBackbone | None = None,
    ) -> None:
        self.model_config, self.config = model_config, train_config
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        seed_everything(train_config.seed)
        self.backbone = backbone or FrozenBackbone(model_config)
        self.model = LaRPCLIP(model_config, backbone=self.backbone).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.trainable_parameters(), lr=train_config.lr, betas=train_config.betas
        )
        self.start_epoch = 0
        self._train_dataset: CachedFeatureDataset | AnomalyDataset | None = None
        self.cache: FeatureCache | None = None
        if train_config.use_cache:
            self.cache = FeatureCache(
                self.backbone,
                train_config.cache_dir,
                budget_bytes=int(train_config.cache_budget_gb * 1024**3),
            )

    # -------------------------------------------------------------- state
    def restore(self, directory: str | Path) -> None:
        """Continue from a checkpoint folder written by `write_checkpoint`."""
        directory = Path(directory)
        restored = load_checkpoint(directory / MODEL_DIR, backbone=self.backbone)
        self.model.load_state_dict(restored.trainable_state_dict(), strict=False)
        meta = load_optimizer(self.optimizer, directory)
        self.start_epoch = int(meta["epoch"]) + 1

    def write_checkpoint(
        self, directory: Path, epoch: int, metrics: dict[str, Any], threshold: float | None
    ) -> None:
        save_checkpoint(
            self.model,
            directory / MODEL_DIR,
            training_data=self.config.train_data,
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            threshold=threshold,
            extra={"epoch": epoch, "train_config": self.config.to_dict()},
        )
        save_optimizer(self.optimizer, directory, {"epoch": epoch})

    # -------------------------------------------------------------- data
    def train_dataset(self) -> CachedFeatureDataset | AnomalyDataset:
        """This worker's shard, built once per run (the cache is filled here, not per epoch)."""
        if self._train_dataset is None:
            records = read_records(self.config.train_data, skip_bad=self.config.skip_bad)
            mine = shard(records, self.rank, self.world)
            if self.cache is not None:
                keys, _ = self.cache.fill(mine, self.config.batch_size, progress=self._progress)
                self._train_dataset = CachedFeatureDataset(self.cache, keys, mine)
            else:
                self._train_dataset = AnomalyDataset(mine, self.model_config.image_size)
        return self._train_dataset

    def train_loader(self, epoch: int) -> DataLoader:
        dataset = self.train_dataset()
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=_collate,
        )

    @property
    def _progress(self) -> bool:
        return self.config.progress and self.rank == 0

    # -------------------------------------------------------------- steps
    def step(self, batch: dict) -> dict[str, float]:
        features = batch_features(batch, self.backbone, self.device)
        out = self.model.forward_features(features)
        loss, parts = larp_loss(
            out, batch["mask"].to(self.device), batch["label"].to(self.device), self.model_config
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            for param in self.model.trainable_parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.world
        self.optimizer.step()
        return parts

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        loader = self.train_loader(epoch)
        totals: dict[str, float] = {}
        count = 0
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", disable=not self._progress
        )
        for batch in bar:
            parts = self.step(batch)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
        means = {k: v / max(count, 1) for k, v in totals.items()}
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            packed = torch.tensor([means[k] for k in sorted(means)], dtype=torch.float64)
            dist.all_reduce(packed)
            means = dict(zip(sorted(means), (packed / self.world).tolist(), strict=True))
        return means

    def evaluate(self) -> tuple[dict[str, float], float | None]:
        """Mean-over-classes metrics on the evaluation set and the F1-max decision threshold."""
        if self.config.eval_data is None:
            return {}, None
        from larp.evaluate import evaluate

        report = evaluate(
            self.model,
            self.config.eval_data,
            lam=self.config.eval_lam,
            top_k=self.config.eval_top_k,
            cache=self.cache,
            batch_size=self.config.batch_size,
            progress=self._progress,
            skip_bad=self.config.skip_bad,
        )
        return report.mean_metrics(), report.threshold

    def run(self, report: ReportFn | None = None) -> dict[str, Any]:
        """Train from `start_epoch` to the end; `report(metrics, checkpoint_dir)` every epoch
        (checkpoint only on rank 0). Returns the last metrics."""
        metrics: dict[str, Any] = {}
        for epoch in range(self.start_epoch, self.config.epochs):
            started = time.perf_counter()
            metrics = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            metrics["epoch_seconds"] = time.perf_counter() - started
            threshold = None
            if self.rank == 0:
                eval_metrics, threshold = self.evaluate()
                metrics.update(eval_metrics)
            if report is None:
                continue
            if self.rank == 0:
                folder = Path(tempfile.mkdtemp(prefix="larp-ckpt-"))
                try:
                    self.write_checkpoint(folder, epoch, metrics, threshold)
                    report(metrics, folder)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            else:
                report(metrics, None)
        return metrics


def _collate(items: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
