"""LaRP-CLIP: layer-aware prompts, adaptive fusion with refinement and a prototype branch for
zero-shot anomaly detection on a frozen open_clip backbone.

`import larp` never imports Ray or MLflow; only the Ray Train launcher (`larp.train`) does.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Public names -> defining module. Resolved lazily (PEP 562) so light modules such as
# `larp.metrics` and `larp.data` do not pay for importing torch and open_clip.
_EXPORTS = {
    "BackboneFeatures": "larp.backbone",
    "FrozenBackbone": "larp.backbone",
    "load_checkpoint": "larp.checkpoint",
    "read_manifest": "larp.checkpoint",
    "save_checkpoint": "larp.checkpoint",
    "LaRPConfig": "larp.config",
    "BackboneError": "larp.errors",
    "CheckpointError": "larp.errors",
    "ConfigError": "larp.errors",
    "InputError": "larp.errors",
    "LaRPError": "larp.errors",
    "LaRPCLIP": "larp.model",
    "LaRPOutput": "larp.model",
    "LaRPResult": "larp.model",
}

if TYPE_CHECKING:
    from larp.backbone import BackboneFeatures, FrozenBackbone
    from larp.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from larp.config import LaRPConfig
    from larp.errors import BackboneError, CheckpointError, ConfigError, InputError, LaRPError
    from larp.model import LaRPCLIP, LaRPOutput, LaRPResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'larp' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "BackboneError",
    "BackboneFeatures",
    "CheckpointError",
    "ConfigError",
    "FrozenBackbone",
    "InputError",
    "LaRPCLIP",
    "LaRPConfig",
    "LaRPError",
    "LaRPOutput",
    "LaRPResult",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
]
