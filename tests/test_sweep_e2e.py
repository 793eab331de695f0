"""The sweep end to end on a reduced grid (real Ray Tune + Ray Train + MLflow on sqlite), and
resume after the driver is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from larp import load_checkpoint
from larp.cache import FeatureCache
from larp.evaluate import evaluate
from larp.sweep import SweepConfig, run_sweep
from larp.tracking import KIND_TAG, SWEEP_TAG, client
from tests.ray_local import local_ray

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "synthetic:source?n=3&n_train=1"
EVAL = "synthetic:target?n=3&n_train=1"


def _sweep(tmp_path: Path, name: str, **changes) -> SweepConfig:
    data = dict(
        partitions=[[1], [1, 2]],
        lams=[0.0, 1.0],
        top_ks=[1, 4],
        train={
            "train_data": TRAIN,
            "eval_data": EVAL,
            "epochs": 2,
            "cache_dir": str(tmp_path / "cache"),
        },
        name=name,
        storage_path=str(tmp_path / "runs"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    data.update(changes)
    return SweepConfig.from_dict(data)


def _runs(uri: str, sweep: str, kind: str | None = None):
    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name("larp")
    query = f"tags.`{SWEEP_TAG}` = '{sweep}'"
    if kind:
        query += f" and tags.`{KIND_TAG}` = '{kind}'"
    return mlflow_client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)


def _train_dirs(tmp_path: Path, sweep: str) -> dict[str, int]:
    runs = tmp_path / "runs"
    return {
        d.name: len([c for c in d.glob("checkpoint_*") if c.is_dir()])
        for d in runs.glob(f"{sweep}-shallow*")
        if d.is_dir() and not d.name.endswith("champion")
    }


def test_sweep_end_to_end(tmp_path):
    sweep = _sweep(tmp_path, "e2e")
    with local_ray():
        summary = run_sweep(sweep)
    uri = sweep.tracking_uri_absolute()
    assert summary["failed_trials"] == 0
    train_runs = _runs(uri, "e2e", "train")
    score_runs = _runs(uri, "e2e", "score")
    assert len(train_runs) == 2 and len(score_runs) == 2 * 2 * 2
    assert all(r.info.status == "FINISHED" for r in train_runs + score_runs)
    mlflow_client = client(uri)
    for run in train_runs:
        assert run.data.params["model.shallow_layers"] in ("[1]", "[1, 2]")
        history = mlflow_client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2]
        assert {"pixel_auroc", "image_auroc"} <= set(run.data.metrics)
    parents = {r.info.run_id for r in train_runs}
    for run in score_runs:
        assert run.data.tags["mlflow.parentRunId"] in parents
        assert run.data.params["trained"] == "False"
        assert {"image_auroc", "image_ap", "pixel_auroc", "aupro"} <= set(run.data.metrics)
        assert "loss" not in run.data.metrics
    # the (λ, k) scorings trained nothing: one Train run per variant, one checkpoint per epoch
    assert _train_dirs(tmp_path, "e2e") == {"e2e-shallow_1": 2, "e2e-shallow_1-2": 2}
    # the champion is registered, loads, and carries its best (λ, k)
    version = mlflow_client.get_model_version_by_alias("larp-detector", "champion")
    best = summary["best"]
    assert version.run_id == best["run_id"]
    champion = load_checkpoint(summary["champion"]["checkpoint"])
    assert (champion.config.lam, champion.config.top_k) == (best["lam"], best["top_k"])
    # re-scoring from stored outputs matches a fresh evaluation at the same (λ, k)
    cache = FeatureCache(champion.backbone, tmp_path / "cache")
    fresh = evaluate(champion, EVAL, cache=cache, progress=False).mean_metrics()
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro"):
        assert fresh[key] == pytest.approx(best[key], abs=1e-6), key


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_resume_after_killed_driver(tmp_path):
    sweep = _sweep(tmp_path, "resume", max_concurrent=1)
    uri = sweep.tracking_uri_absolute()
    args = [
        sys.executable, str(ROOT / "tune" / "sweep.py"),
        "--config", str(tmp_path / "sweep.yaml"),
    ]  # fmt: skip
    import yaml

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep.to_dict()))
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="larp-ray-", dir="/tmp"))
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True
    )
    try:

        def one_trial_done() -> bool:
            if not (tmp_path / "mlflow.db").exists():
                return False
            try:
                runs = _runs(uri, "resume", "train")
            except Exception:
                return False
            return any(r.info.status == "FINISHED" for r in runs)

        _wait_for(one_trial_done, 900, "the first trial to finish")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
        first.wait(timeout=30)
    finished_before = {
        r.data.tags["larp.key"]
        for r in _runs(uri, "resume", "train")
        if r.info.status == "FINISHED"
    }
    dirs_before = _train_dirs(tmp_path, "resume")
    second = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    train_runs = _runs(uri, "resume", "train")
    score_runs = _runs(uri, "resume", "score")
    assert len(train_runs) == 2 and len(score_runs) == 8, "runs were duplicated"
    assert not [r for r in train_runs + score_runs if r.info.status == "RUNNING"]
    dirs_after = _train_dirs(tmp_path, "resume")
    for key in finished_before:
        folder = "resume-" + key.replace("=", "_")
        assert dirs_after[folder] == dirs_before[folder], f"{key} was trained again"
    assert "champion" in second.stdout
