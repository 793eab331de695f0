"""Scale-out end to end on a simulated multi-node Ray cluster on this machine: a head and two
worker nodes (`ray.cluster_utils.Cluster`, 1 CPU each, 127.0.0.1, private temp dir), one MLflow
tracking server started here (SQLite backend, proxied artifacts) standing in for the head's.

- head-local storage and a SQLite tracking file are refused before any work starts;
- a 2-worker training (0.9 CPU each, so no node holds both) runs on two nodes;
- a 2-partition sweep on shared storage trains on more than one node and every MLflow run lands
  in the one tracking server.

Everything started here is stopped here: the driver disconnects, `Cluster.shutdown()` stops the
nodes it started, the MLflow server's process group is terminated by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from larp import LaRPConfig, load_checkpoint
from larp.cluster import SHARED_ENV
from larp.errors import ConfigError
from larp.sweep import SweepConfig, run_sweep
from larp.tracking import KIND_TAG, SWEEP_TAG, client
from larp.trainer import TrainConfig

pytestmark = pytest.mark.slow

TRAIN = "synthetic:source?n=3&n_train=1"
EVAL = "synthetic:target?n=3&n_train=1"
WORKER_NODES = 2


@pytest.fixture(scope="module")
def cluster():
    """Head + 2 worker nodes of 1 CPU each; this driver connected to the head."""
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # own temp dir: session files and the "current cluster" address file stay out of /tmp/ray
    temp_dir = tempfile.mkdtemp(prefix="larp-rc-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another Ray is connected in this process"
    sim = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        for _ in range(WORKER_NODES):
            sim.add_node(num_cpus=1)
        sim.wait_for_nodes(timeout=120)
        ray.init(address=sim.address, configure_logging=False, log_to_driver=False)
        yield sim
    finally:
        ray.shutdown()
        sim.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (SQLite backend, artifacts proxied through the server, as
    cluster.yaml runs it on the head); yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "w")
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("mlflow server not ready after 180 s")
            time.sleep(1.0)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # its process group: the server and workers
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    """Storage every node sees (on one machine, any directory); declared shared by each test."""
    return tmp_path_factory.mktemp("shared")


def _actors() -> dict[str, dict]:
    from ray._private.state import actors

    return actors()


def _train_worker_nodes(before: set[str]) -> list[str]:
    """Node ids of the Ray Train workers started since the snapshot `before`."""
    return [
        info["Address"]["NodeID"]
        for actor_id, info in _actors().items()
        if actor_id not in before and "RayTrainWorker" in info["ActorClassName"]
    ]


def _alive_node_ids() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_cluster_is_multi_node(cluster):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 1 + WORKER_NODES


def test_head_local_storage_and_tracking_refused_before_work(cluster, tmp_path, monkeypatch):
    from larp.train import launch

    monkeypatch.delenv(SHARED_ENV, raising=False)
    before = set(_actors())
    config = TrainConfig(
        train_data=TRAIN,
        eval_data=None,
        epochs=1,
        num_workers=2,
        cpus_per_worker=0.9,
        storage_path=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    with pytest.raises(ConfigError, match=f"{1 + WORKER_NODES} alive nodes"):
        launch(LaRPConfig.tiny_random(), config)
    sweep = SweepConfig.from_dict(
        dict(
            partitions=[[1]],
            lams=[1.0],
            top_ks=[1],
            train={"train_data": TRAIN, "eval_data": EVAL, "epochs": 1},
            name="refused",
            storage_path=str(tmp_path / "shared-runs"),
            shared_storage=True,  # storage is fine now; the SQLite file is still head-local
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        )
    )
    with pytest.raises(ConfigError, match="MLflow server on the head"):
        run_sweep(sweep)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    assert _train_worker_nodes(before) == [], "a Ray Train worker started despite the refusal"


def test_two_workers_train_on_two_nodes(cluster, shared_dir, monkeypatch):
    from larp.train import launch

    monkeypatch.setenv(SHARED_ENV, str(shared_dir))  # declared shared through the environment
    before = set(_actors())
    config = TrainConfig(
        train_data=TRAIN,
        eval_data=None,
        epochs=1,
        num_workers=2,
        cpus_per_worker=0.9,  # two workers never fit on one 1-CPU node
        storage_path=str(shared_dir / "runs"),
        name="spread",
        cache_dir=str(shared_dir / "cache"),
        progress=False,
    )
    result = launch(LaRPConfig.tiny_random(), config)
    assert result.error is None
    assert result.metrics["epoch"] == 1
    nodes = _train_worker_nodes(before)
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"workers not spread: {nodes}"
    assert set(nodes) <= _alive_node_ids()
    checkpoint = Path(result.checkpoint.path)
    assert checkpoint.is_relative_to(shared_dir / "runs" / "spread")
    load_checkpoint(checkpoint / "model")  # written by rank 0, readable by the driver


def test_sweep_spreads_over_nodes_and_logs_to_one_server(
    cluster, tracking_server, shared_dir, monkeypatch
):
    monkeypatch.delenv(SHARED_ENV, raising=False)
    before = set(_actors())
    sweep = SweepConfig.from_dict(
        dict(
            partitions=[[1], [1, 2]],
            lams=[0.0, 1.0],
            top_ks=[1],
            max_concurrent=2,
            train={
                "train_data": TRAIN,
                "eval_data": EVAL,
                "epochs": 1,
                "cache_dir": str(shared_dir / "cache"),
            },
            name="multi",
            storage_path=str(shared_dir / "runs"),
            shared_storage=True,  # declared shared through the flag's field
            tracking_uri=tracking_server,
        )
    )
    summary = run_sweep(sweep)
    assert summary["failed_trials"] == 0
    nodes = _train_worker_nodes(before)
    assert len(nodes) == 2, f"expected one Train worker per trial, got {nodes}"
    assert len(set(nodes)) == 2, f"both trials trained on one node: {nodes}"

    mlflow_client = client(tracking_server)
    exp = mlflow_client.get_experiment_by_name("larp")
    runs = mlflow_client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'multi'", max_results=100
    )
    kinds = sorted(r.data.tags[KIND_TAG] for r in runs)
    assert kinds == ["score"] * 4 + ["train"] * 2  # 2 trainings, 2 variants × 2 λ × 1 k
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        # artifacts went through the server, not to a disk of whichever node logged them
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        if run.data.tags[KIND_TAG] == "train":
            history = mlflow_client.get_metric_history(run.info.run_id, "loss")
            assert [m.step for m in history] == [1]  # logged by rank 0 on a worker node
            names = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
            assert {"checkpoint", "evaluation"} <= names
    version = mlflow_client.get_model_version_by_alias("larp-detector", "champion")
    assert version.run_id == summary["best"]["run_id"]
    champion = Path(summary["champion"]["checkpoint"])
    assert champion.is_relative_to(shared_dir / "runs")
    load_checkpoint(champion)
