"""Data: dataset specs and readers, the synthetic generator, image/mask transforms.

Imports only numpy, PIL and torch (never Ray or MLflow), so any process can load data.
"""

from .dataset import AnomalyDataset, load_dataset
from .errors import DatasetError, DatasetWarning
from .readers import KINDS, parse_spec, read_records
from .records import ImageRecord
from .synthetic import generate_set
from .transforms import denormalize, load_image, load_mask, pil_to_tensor

__all__ = [
    "KINDS",
    "AnomalyDataset",
    "DatasetError",
    "DatasetWarning",
    "ImageRecord",
    "denormalize",
    "generate_set",
    "load_dataset",
    "load_image",
    "load_mask",
    "parse_spec",
    "pil_to_tensor",
    "read_records",
]
