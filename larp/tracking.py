"""MLflow bookkeeping for sweeps: idempotent runs keyed by tags, so a resumed sweep finds its
runs instead of duplicating them, and champion registration in the Model Registry.

MLflow is imported lazily; `import larp` does not need it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SWEEP_TAG = "larp.sweep"
KEY_TAG = "larp.key"
KIND_TAG = "larp.kind"  # "train" (one per training trial) or "score" (one per λ, k)
PARENT_TAG = "mlflow.parentRunId"
MODEL_NAME = "larp-detector"
CHAMPION_ALIAS = "champion"


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str) -> str:
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name)


def find_run(tracking_uri: str, exp_id: str, sweep: str, key: str):
    runs = client(tracking_uri).search_runs(
        [exp_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KEY_TAG}` = '{key}'",
        max_results=1,
    )
    return runs[0] if runs else None


def get_or_create_run(
    tracking_uri: str,
    exp_id: str,
    sweep: str,
    key: str,
    kind: str,
    name: str,
    parent_id: str | None = None,
) -> tuple[str, bool]:
    """(run id, existed). An existing unfinished run is reopened (RUNNING) rather than copied."""
    mlflow_client = client(tracking_uri)
    existing = find_run(tracking_uri, exp_id, sweep, key)
    if existing is not None:
        if existing.info.status != "FINISHED":
            mlflow_client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, existing.info.status == "FINISHED"
    tags = {SWEEP_TAG: sweep, KEY_TAG: key, KIND_TAG: kind}
    if parent_id:
        tags[PARENT_TAG] = parent_id
    run = mlflow_client.create_run(exp_id, tags=tags, run_name=name)
    return run.info.run_id, False


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    mlflow_client = client(tracking_uri)
    existing = mlflow_client.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), 100):
        mlflow_client.log_batch(run_id, params=fresh[start : start + 100])


def log_metrics(
    tracking_uri: str, run_id: str, metrics: dict[str, Any], step: int | None = None
) -> None:
    """Log the finite numeric entries of `metrics` (NaN/inf are not metrics MLflow can plot)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [
        Metric(k, float(v), now, step or 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    if entries:
        client(tracking_uri).log_batch(run_id, metrics=entries)


def log_artifacts(
    tracking_uri: str, run_id: str, folder: str | Path, artifact_path: str | None = None
) -> None:
    client(tracking_uri).log_artifacts(run_id, str(folder), artifact_path)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def close_dangling_runs(tracking_uri: str, exp_id: str, sweep: str) -> int:
    """Mark runs of `sweep` still RUNNING (their process died) as FAILED; returns the count."""
    mlflow_client = client(tracking_uri)
    dangling = mlflow_client.search_runs(
        [exp_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    for run in dangling:
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
    return len(dangling)


def register_champion(
    tracking_uri: str, run_id: str, artifact_path: str, model_name: str = MODEL_NAME
) -> str:
    """Register `runs:/run_id/artifact_path` as a new version with alias `champion`."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        mlflow_client.get_registered_model(model_name)
    except MlflowException:
        mlflow_client.create_registered_model(model_name)
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = mlflow_client.create_model_version(model_name, source, run_id=run_id)
    mlflow_client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return str(version.version)
