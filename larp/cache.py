"""Frozen-feature cache: the backbone's outputs per image, computed once, reused by every epoch,
every worker and every sweep trial.

The backbone is a pure function of (weights, input size, feature layers, V-V setting, image
bytes), so the key is exactly that: a hash of the backbone identity and of the file's content. A
changed file, other weights or another layer choice can never hit a stale entry. Entries are fp16
safetensors files written atomically (temp file + rename), so concurrent writers (Ray workers,
trials) at worst compute the same entry twice. Reads refresh an entry's mtime; the size budget
evicts the least recently used entries, never ones the current dataset needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from larp.backbone import BackboneFeatures, FrozenBackbone
from larp.data import ImageRecord, load_image, load_mask
from larp.errors import ConfigError
from larp.files import file_sha256

DEFAULT_BUDGET_BYTES = 20 * 1024**3
ENTRY_SUFFIX = ".safetensors"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LARP_CACHE_DIR", Path.home() / ".cache" / "larp" / "features"))


@dataclass
class FillStats:
    hits: int = 0
    misses: int = 0
    evicted: int = 0


class FeatureCache:
    """Backbone outputs on disk, keyed by backbone identity and image content."""

    def __init__(
        self,
        backbone: FrozenBackbone,
        root: str | Path | None = None,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        if budget_bytes <= 0:
            raise ConfigError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.backbone = backbone
        self.root = Path(root) if root is not None else default_cache_dir()
        self.budget_bytes = int(budget_bytes)
        cfg = backbone.config
        identity = dict(
            backbone.identity(),
            feature_layers=list(cfg.feature_layers),
            vv_from_layer=cfg.vv_from_layer,
        )
        self.identity = identity
        self.namespace = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        self.folder = self.root / self.namespace[:20]

    # ------------------------------------------------------------------ keys and paths
    def key(self, image_path: str | Path) -> str:
        return hashlib.sha256(f"{self.namespace}:{file_sha256(image_path)}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{ENTRY_SUFFIX}"

    # ------------------------------------------------------------------ entries
    def load(self, key: str) -> BackboneFeatures | None:
        """One entry (no batch dim, fp16) or None when absent or unreadable."""
        path = self.path(key)
        try:
            tensors = load_file(str(path))
            os.utime(path)
        except (FileNotFoundError, SafetensorError, OSError):
            return None
        return BackboneFeatures(tensors["patch_tokens"], tensors["global_feature"])

    def store(self, key: str, features: BackboneFeatures) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ENTRY_SUFFIX, dir=path.parent)
        os.close(handle)
        tensors = {
            "patch_tokens": features.patch_tokens.detach().to("cpu", torch.float16).contiguous(),
            "global_feature": features.global_feature.detach()
            .to("cpu", torch.float16)
            .contiguous(),
        }
        save_file(tensors, tmp)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ filling
    def fill(
        self,
        records: Sequence[ImageRecord],
        batch_size: int = 8,
        num_workers: int = 0,
        progress: bool = True,
        device: str | torch.device = "cpu",
    ) -> tuple[list[str], FillStats]:
        """Make sure every record has an entry; returns the keys (in record order) and stats."""
        keys = [self.key(r.image_path) for r in records]
        stats = FillStats()
        missing = [i for i, k in enumerate(keys) if not self.path(k).is_file()]
        stats.hits = len(keys) - len(missing)
        stats.misses = len(missing)
        if missing:
            images = _ImageOnly([records[i] for i in missing], self.backbone.config.image_size)
            loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
            bar = tqdm(total=len(missing), desc="feature cache", unit="img", disable=not progress)
            position = 0
            for batch in loader:
                feats = self.backbone.extract(batch.to(device))
                for j in range(batch.shape[0]):
                    key = keys[missing[position + j]]
                    self.store(
                        key, BackboneFeatures(feats.patch_tokens[j], feats.global_feature[j])
                    )
                position += batch.shape[0]
                bar.update(batch.shape[0])
            bar.close()
        stats.evicted = self.enforce_budget(keep=set(keys))
        return keys, stats

    def enforce_budget(self, keep: set[str] = frozenset()) -> int:
        """Evict least-recently-used entries until the whole cache fits its budget."""
        entries = []
        total = 0
        for path in self.root.glob(f"*/*/*{ENTRY_SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            total += stat.st_size
            entries.append((stat.st_mtime, stat.st_size, path))
        if total <= self.budget_bytes:
            return 0
        needed = sum(size for _, size, path in entries if path.stem in keep)
        if needed > self.budget_bytes:
            raise ConfigError(
                f"the feature cache budget ({self.budget_bytes / 1e9:.2f} GB) is smaller than this "
                f"dataset's features ({needed / 1e9:.2f} GB); raise --cache-budget-gb or run "
                "with --no-cache"
            )
        evicted = 0
        for _, size, path in sorted(entries):
            if total <= self.budget_bytes:
                break
            if path.stem in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            evicted += 1
        return evicted


class _ImageOnly(Dataset):
    def __init__(self, records: Sequence[ImageRecord], size: int) -> None:
        self.records, self.size = list(records), size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.records[index].image_path, self.size)


class CachedFeatureDataset(Dataset):
    """Training items from the cache: features (fp32), mask and label; no image decoding.

    Items are also kept in memory (fp16 features, bool masks) while they fit `memory_bytes`, so
    epochs after the first touch neither the disk nor the PNG decoder.
    """

    def __init__(
        self,
        cache: FeatureCache,
        keys: Sequence[str],
        records: Sequence[ImageRecord],
        memory_bytes: int = 2 * 1024**3,
    ) -> None:
        if len(keys) != len(records):
            raise ValueError("one cache key per record is needed")
        self.cache, self.keys, self.records = cache, list(keys), list(records)
        self.size = cache.backbone.config.image_size
        self.memory_bytes = memory_bytes
        self._held: dict[int, tuple[BackboneFeatures, torch.Tensor]] = {}
        self._held_bytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[BackboneFeatures, torch.Tensor]:
        record = self.records[index]
        features = self.cache.load(self.keys[index])
        if features is None:
            warnings.warn(
                f"cache entry for {record.image_path} vanished; recomputing", stacklevel=1
            )
            image = load_image(record.image_path, self.size).unsqueeze(0)
            extracted = self.cache.backbone.extract(image)
            features = BackboneFeatures(extracted.patch_tokens[0], extracted.global_feature[0])
            self.cache.store(self.keys[index], features)
            features = features.to(torch.float16)
        return features, _mask_for(record, self.size) > 0.5

    def __getitem__(self, index: int) -> dict:
        held = self._held.get(index)
        if held is None:
            held = self._load(index)
            size = held[0].patch_tokens.nbytes + held[1].numel()
            if self._held_bytes + size <= self.memory_bytes:
                self._held[index] = held
                self._held_bytes += size
        features, mask = held
        return {
            "patch_tokens": features.patch_tokens.float(),
            "global_feature": features.global_feature.float(),
            "mask": mask.float(),
            "label": self.records[index].label,
        }


def _mask_for(record: ImageRecord, size: int) -> torch.Tensor:
    if record.mask_path is None:
        return torch.zeros(1, size, size)
    return load_mask(record.mask_path, size)
