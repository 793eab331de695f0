"""Ray Train launcher: `train_loop_per_worker` for `TorchTrainer` and `launch`.

The only module of `larp` that imports Ray (lazily, inside functions), so `import larp` and the
non-training CLI commands stay light. Ray 2.60 runs Train V2: metrics and checkpoints go through
`ray.train.report`, a restarted worker group resumes from `ray.train.get_checkpoint()`, and a job
re-run with the same name and storage path continues where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from larp.config import LaRPConfig
from larp.data import read_records
from larp.trainer import TrainConfig, Trainer


def fault_injection_due(spec: dict | None, epoch: int) -> bool:
    """Testing aid: crash once (marker file) after reporting `spec['epoch']`."""
    if not spec or epoch != int(spec["epoch"]):
        return False
    marker = Path(spec["marker"])
    if marker.exists():
        return False
    marker.write_text("injected")
    return True


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: one data-parallel shard of a LaRP training run."""
    import ray.train
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model_config = LaRPConfig.from_dict(loop_config["model"])
    train_config = TrainConfig.from_dict(loop_config["train"])
    device = "cpu"
    if train_config.use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
    trainer = Trainer(model_config, train_config, rank=rank, world=world, device=device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.restore(folder)
    fault = loop_config.get("fault_injection")
    tracking = loop_config.get("tracking")

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        payload = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(metrics, checkpoint=payload)
        if rank == 0 and tracking:
            from larp.tracking import log_metrics

            log_metrics(tracking["uri"], tracking["run_id"], metrics, step=int(metrics["epoch"]))
        if rank == 0 and fault_injection_due(fault, int(metrics["epoch"])):
            os._exit(1)  # a hard worker death, as an OOM kill or a lost node would be

    trainer.run(report)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (else `RAY_ADDRESS`, which `ray job submit` sets for its driver), or
    start a private local Ray bound to 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            configure_logging=False,
        )


def check_data(train_config: TrainConfig) -> None:
    """Fail before any worker starts if a dataset cannot be read."""
    read_records(train_config.train_data, skip_bad=train_config.skip_bad)
    if train_config.eval_data:
        read_records(train_config.eval_data, skip_bad=train_config.skip_bad)


def build_trainer(
    model_config: LaRPConfig,
    train_config: TrainConfig,
    callbacks: list | None = None,
    fault_injection: dict | None = None,
    tracking: dict | None = None,
):
    """A configured `TorchTrainer` (not started). `tracking` = {"uri", "run_id"} makes rank 0
    log every epoch's metrics to that MLflow run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": train_config.cpus_per_worker}
    if train_config.use_gpu:
        resources["GPU"] = train_config.gpus_per_worker
    scaling = ScalingConfig(
        num_workers=train_config.num_workers,
        use_gpu=train_config.use_gpu,
        resources_per_worker=resources,
    )
    score = train_config.checkpoint_score_attribute
    run_config = RunConfig(
        name=train_config.name or "larp-train",
        storage_path=storage_uri(train_config.storage_path),
        checkpoint_config=CheckpointConfig(
            num_to_keep=train_config.num_to_keep,
            checkpoint_score_attribute=score,
            checkpoint_score_order="max",
        ),
        failure_config=FailureConfig(max_failures=train_config.max_failures),
        callbacks=callbacks,
    )
    loop_config = {"model": model_config.to_dict(), "train": train_config.to_dict()}
    if fault_injection:
        loop_config["fault_injection"] = fault_injection
    if tracking:
        loop_config["tracking"] = tracking
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
    )


def storage_uri(path: str) -> str:
    """Local paths made absolute (Ray needs that); URIs such as s3:// passed through."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def launch(
    model_config: LaRPConfig,
    train_config: TrainConfig,
    *,
    ray_address: str | None = None,
    fault_injection: dict | None = None,
    shared_storage: bool = False,
):
    """Validate, start Ray if needed, train, and return Ray's `Result`. On a multi-node cluster
    a storage path the other nodes cannot see is refused first (`larp.cluster`);
    `shared_storage=True` declares a local path to be on a mount every node shares."""
    from larp.cluster import check_cluster, worker_needs

    check_data(train_config)
    ensure_ray(ray_address)
    check_cluster(
        storage_uri(train_config.storage_path),
        shared=shared_storage,
        needs=worker_needs(train_config),
    )
    trainer = build_trainer(model_config, train_config, fault_injection=fault_injection)
    return trainer.fit()
