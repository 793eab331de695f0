"""Training on Ray Train (real TorchTrainer, two CPU workers): loss goes down, checkpoints
reproduce the reported metrics, a killed worker resumes, a re-run continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from larp import LaRPConfig, load_checkpoint
from larp.cache import FeatureCache
from larp.evaluate import evaluate
from larp.trainer import STATE_JSON, TrainConfig
from tests.ray_local import local_ray

pytestmark = pytest.mark.slow

TRAIN = "synthetic:source?n=3&n_train=1"
EVAL = "synthetic:target?n=2&n_train=1"


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2):
        yield


def _config(tmp_path: Path, **changes) -> TrainConfig:
    base = dict(
        train_data=TRAIN,
        eval_data=EVAL,
        epochs=3,
        num_workers=2,
        storage_path=str(tmp_path / "runs"),
        name="run",
        cache_dir=str(tmp_path / "cache"),
        num_to_keep=3,
        progress=False,
        lr=1e-2,
    )
    base.update(changes)
    return TrainConfig(**base)


def _manifests(run_dir: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/model/manifest.json")]
    return sorted(found, key=lambda m: m["extra"]["epoch"])


def test_two_workers_train_and_checkpoint_reproduces_metrics(ray_cluster, tmp_path):
    from larp.train import launch

    config = _config(tmp_path)
    result = launch(LaRPConfig.tiny_random(), config)
    assert result.error is None
    assert result.metrics["epoch"] == 3
    manifests = _manifests(tmp_path / "runs" / "run")
    assert [m["extra"]["epoch"] for m in manifests] == [0, 1, 2]
    losses = [m["metrics"]["loss"] for m in manifests]
    assert losses[-1] < losses[0]
    model = load_checkpoint(Path(result.checkpoint.path) / "model")
    cache = FeatureCache(model.backbone, config.cache_dir)
    report = evaluate(model, EVAL, cache=cache, progress=False)
    for key, value in report.mean_metrics().items():
        assert value == pytest.approx(result.metrics[key], abs=1e-6), key
    assert model.manifest["threshold"] == pytest.approx(report.threshold, abs=1e-6)


def test_killed_worker_resumes_and_rerun_continues(ray_cluster, tmp_path):
    from larp.train import launch

    marker = tmp_path / "fault-marker"
    config = _config(tmp_path, eval_data=None, max_failures=2, name="faulty")
    result = launch(
        LaRPConfig.tiny_random(), config, fault_injection={"epoch": 2, "marker": str(marker)}
    )
    assert marker.exists(), "the fault was not injected"
    assert result.error is None
    assert result.metrics["epoch"] == 3
    state = json.loads((Path(result.checkpoint.path) / STATE_JSON).read_text())
    assert state["epoch"] == 2 and state["param_groups"][0]["lr"] == pytest.approx(1e-2)
    # same name and storage, more epochs: continues from epoch 3 instead of starting over
    longer = launch(LaRPConfig.tiny_random(), config.replace(epochs=4))
    assert longer.error is None and longer.metrics["epoch"] == 4
    epochs = [m["extra"]["epoch"] for m in _manifests(tmp_path / "runs" / "faulty")]
    assert epochs.count(0) <= 1 and 3 in epochs
