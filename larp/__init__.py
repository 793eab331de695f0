"""LaRP-CLIP: layer-aware prompts, adaptive fusion with refinement and a prototype branch for
zero-shot anomaly detection on a frozen open_clip backbone.

`import larp` never imports Ray or MLflow; only the Ray Train launcher (`larp.train`) does.
"""

from larp.backbone import BackboneFeatures, FrozenBackbone
from larp.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from larp.config import LaRPConfig
from larp.errors import BackboneError, CheckpointError, ConfigError, InputError, LaRPError
from larp.model import LaRPCLIP, LaRPOutput, LaRPResult

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
