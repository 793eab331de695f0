"""Where the best checkpoint of the last sweep is recorded, so `serve` and users can find it.

The sweep registers the champion in the MLflow Model Registry (alias `champion`) and also writes a
small JSON pointer file; the server reads the pointer so it needs no MLflow server to start.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from larp.errors import CheckpointError

DEFAULT_POINTER = Path("larp_runs") / "champion.json"


def pointer_path() -> Path:
    """`LARP_CHAMPION_FILE`, else `./larp_runs/champion.json`."""
    return Path(os.environ.get("LARP_CHAMPION_FILE", DEFAULT_POINTER)).expanduser()


def write_champion(checkpoint: str | Path, info: dict[str, Any], path: Path | None = None) -> Path:
    """Record `checkpoint` (a LaRP checkpoint folder) as the champion, atomically."""
    path = path or pointer_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(info, checkpoint=str(Path(checkpoint).resolve()))
    handle, tmp = tempfile.mkstemp(prefix=".champion.", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        json.dump(payload, out, indent=2)
    os.replace(tmp, path)
    return path


def read_champion(path: Path | None = None) -> dict[str, Any]:
    """The champion record; a clear error saying how to get one when there is none."""
    path = path or pointer_path()
    if not path.is_file():
        raise CheckpointError(
            f"no champion checkpoint recorded at {path}. Run a sweep first "
            "(`python tune/sweep.py`), or point to a checkpoint with LARP_CHECKPOINT=/path/to/ckpt "
            "(a folder written by `larp train`), or set LARP_CHAMPION_FILE."
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"champion record {path} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or "checkpoint" not in record:
        raise CheckpointError(f"champion record {path} names no checkpoint")
    return record


def resolve_checkpoint(explicit: str | None = None) -> Path:
    """The checkpoint to serve: `explicit`, else `LARP_CHECKPOINT`, else the champion."""
    chosen = explicit or os.environ.get("LARP_CHECKPOINT")
    if chosen:
        return Path(chosen).expanduser()
    return Path(read_champion()["checkpoint"])
