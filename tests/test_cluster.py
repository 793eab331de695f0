"""`cluster.yaml` against Ray's own schema and config preparation (no cloud calls), its
commands against the real CLIs' option parsers, and the multi-node storage/tracking refusal of
`larp.cluster` on fake node lists (fast: no Ray cluster is started)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from larp.cluster import (
    SHARED_ENV,
    ClusterWarning,
    check_cluster,
    cluster_problems,
    declared_shared,
    spans_nodes,
    worker_needs,
)
from larp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin, "ray is not installed"
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


# ---------------------------------------------------------------------- cluster.yaml vs Ray
def test_cluster_yaml_passes_rays_schema(config):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(config, _ray_schema())


def test_cluster_yaml_passes_rays_config_preparation_and_validation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # what `ray up` does before it talks to AWS: merge the provider defaults, then validate
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # our setup runs on every node, before the head-only setup
    assert (
        prepared["head_setup_commands"][: len(config["setup_commands"])]
        == (config["setup_commands"])
    )
    assert prepared["worker_setup_commands"] == config["setup_commands"]


def test_cluster_layout_cpu_head_autoscaled_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["min_workers"] == head["max_workers"] == 0
    assert head["resources"] == {"CPU": 0}, "the head must not take training work"
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")), "GPU instance type"
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= config["max_workers"]


def test_setup_installs_the_project_with_its_constraints(config):
    setup = " ; ".join(config["setup_commands"])
    assert 'pip install -c constraints.txt -e ".[all]"' in setup
    # the checkout the setup installs is this repository, where serve/config.yaml expects it
    mounts = config["file_mounts"]
    serve = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    env = serve["applications"][0]["runtime_env"]["env_vars"]
    assert (ROOT / mounts[env["PYTHONPATH"]] / "constraints.txt").is_file()
    assert f"cd {env['PYTHONPATH'].replace('/home/ubuntu', '~')} && pip install" in setup
    # the champion pointer serve reads lies on the shared mount every node has
    assert env["LARP_CHAMPION_FILE"].startswith("/mnt/larp/")
    assert "mount -t nfs4" in setup and " /mnt/larp" in setup


def _commands(config: dict, key: str, program: str) -> list[str]:
    """The argument strings following `program` in the commands of `key`."""
    found = []
    for command in config[key]:
        for match in re.finditer(re.escape(program) + r" (.*?)(?:'|;|>|$)", command):
            found.append(match.group(1).strip())
    return found


def test_head_starts_an_mlflow_server_with_valid_flags(config):
    from mlflow.cli import server

    (args,) = _commands(config, "head_start_ray_commands", "mlflow server")
    params = server.make_context("server", shlex.split(args)).params  # unknown flags raise
    assert params["backend_store_uri"].startswith("sqlite:////home/ubuntu/")
    assert params["artifacts_destination"].startswith("s3://")
    assert params["serve_artifacts"], "workers upload artifacts through the server"
    assert params["port"] == 5000
    assert params["allowed_hosts"] is None  # MLflow's default: localhost + private IPs only


def test_ray_start_commands_parse_and_keep_the_dashboard_private(config):
    from ray.scripts.scripts import start

    (head,) = _commands(config, "head_start_ray_commands", "ray start")
    (worker,) = _commands(config, "worker_start_ray_commands", "ray start")
    head_params = start.make_context("start", shlex.split(head)).params
    assert head_params["head"] and head_params["dashboard_host"] == "127.0.0.1"
    assert head_params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    worker_params = start.make_context("start", shlex.split(worker)).params
    assert worker_params["address"] == "$RAY_HEAD_IP:6379"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in text
        assert f"{SHARED_ENV}=/mnt/larp" in text
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def test_network_is_closed_except_ssh_from_the_user(config):
    # Ray's auto-created security group opens SSH to 0.0.0.0/0: every node type names ours
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["SecurityGroupIds"] == ["REPLACE_WITH_SECURITY_GROUP_ID"], (
            name
        )
    assert "security_group" not in config["provider"]
    header = CLUSTER_YAML.read_text().split("cluster_name:")[0]
    assert "--port 22" in header and "<your public IP>/32" in header
    assert "0.0.0.0/0" not in yaml.safe_dump(config)  # no rule opens anything to everyone


def test_every_placeholder_is_obvious_and_documented(config):
    text = CLUSTER_YAML.read_text()
    values = yaml.safe_dump(config)
    used = set(re.findall(r"REPLACE_WITH_[A-Z_]*[A-Z]", values))
    assert {
        "REPLACE_WITH_REGION",
        "REPLACE_WITH_AMI_ID",
        "REPLACE_WITH_KEY_NAME",
        "REPLACE_WITH_BUCKET",
        "REPLACE_WITH_SECURITY_GROUP_ID",
        "REPLACE_WITH_EFS_ID",
    } <= used
    header = text.split("cluster_name:")[0]
    for token in used:
        assert re.search(rf"^#\s+{token}\s+\S", header, re.M), f"{token} is not documented"


# ---------------------------------------------------------------------- the refusal
def _node(ip: str = "10.0.0.1", alive: bool = True, **resources) -> dict:
    return {
        "NodeID": f"{ip}-{len(resources)}",
        "Alive": alive,
        "NodeManagerAddress": ip,
        "Resources": resources or {"CPU": 8.0},
    }


ONE = [_node("10.0.0.1")]
THREE = [_node("10.0.0.1"), _node("10.0.0.2", GPU=1.0, CPU=8.0), _node("10.0.0.3")]
NO_ENV: dict[str, str] = {}


def test_single_node_accepts_anything(tmp_path):
    errors, notes = cluster_problems(str(tmp_path), "sqlite:///mlflow.db", nodes=ONE, env=NO_ENV)
    assert errors == notes == []


def test_dead_nodes_do_not_count(tmp_path):
    nodes = [*ONE, _node("10.0.0.2", alive=False), _node("10.0.0.3", alive=False)]
    assert spans_nodes(nodes) is None
    assert cluster_problems(str(tmp_path), nodes=nodes, env=NO_ENV) == ([], [])


@pytest.mark.parametrize("storage", ["larp_runs", "/home/ubuntu/larp_runs", "file:///tmp/runs"])
def test_multi_node_refuses_a_local_storage_path(storage):
    with pytest.raises(ConfigError) as info:
        check_cluster(storage, nodes=THREE, env=NO_ENV)
    message = str(info.value)
    assert "3 alive nodes" in message and "is a local path" in message
    assert "s3://" in message and "--shared-storage" in message and SHARED_ENV in message


@pytest.mark.parametrize("storage", ["s3://bucket/larp", "gs://bucket/larp", "abfs://c@a/larp"])
def test_multi_node_accepts_remote_storage(storage):
    assert check_cluster(storage, "http://10.0.0.1:5000", nodes=THREE, env=NO_ENV) == []


def test_declared_shared_storage_is_accepted(tmp_path):
    local = str(tmp_path / "runs")
    assert check_cluster(local, nodes=THREE, shared=True, env=NO_ENV) == []
    assert check_cluster(local, nodes=THREE, env={SHARED_ENV: "1"}) == []
    assert check_cluster(local, nodes=THREE, env={SHARED_ENV: f"/nfs:{tmp_path}"}) == []
    with pytest.raises(ConfigError, match="declared now: paths under /mnt/larp"):
        check_cluster(local, nodes=THREE, env={SHARED_ENV: "/mnt/larp"})
    with pytest.raises(ConfigError, match="declared now: nothing"):
        check_cluster(local, nodes=THREE, env={SHARED_ENV: "0"})


def test_shared_declaration_syntax():
    assert declared_shared(env={SHARED_ENV: "yes"}).everything
    assert not declared_shared(env={}).covers(Path("/mnt/larp/x"))
    roots = declared_shared(env={SHARED_ENV: "/mnt/larp:/data"})
    assert roots.covers(Path("/mnt/larp/runs")) and not roots.covers(Path("/mnt/larpx"))
    with pytest.raises(ConfigError, match="absolute mount roots"):
        declared_shared(env={SHARED_ENV: "shared_dir"})


def test_multi_node_refuses_a_head_local_tracking_store(tmp_path):
    storage = "s3://bucket/larp"
    for uri in ("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/m.db", "mlruns", "file:///tmp/m"):
        with pytest.raises(ConfigError, match="MLflow server on the head") as info:
            check_cluster(storage, uri, nodes=THREE, env=NO_ENV)
        assert "tracking URI" in str(info.value)
    # declared shared: a file store passes, SQLite passes with a warning about NFS locking
    env = {SHARED_ENV: str(tmp_path)}
    assert check_cluster(storage, f"file://{tmp_path}/mlruns", nodes=THREE, env=env) == []
    with pytest.warns(ClusterWarning, match="SQLite on a shared network file system"):
        notes = check_cluster(storage, f"sqlite:///{tmp_path}/m.db", nodes=THREE, env=env)
    assert len(notes) == 1


def test_loopback_tracking_server_refused_only_across_hosts():
    storage = "s3://bucket/larp"
    with pytest.raises(ConfigError, match="loopback host 127.0.0.1"):
        check_cluster(storage, "http://127.0.0.1:5000", nodes=THREE, env=NO_ENV)
    with pytest.raises(ConfigError, match="loopback host localhost"):
        check_cluster(storage, "http://localhost:5000", nodes=THREE, env=NO_ENV)
    same_host = [_node("127.0.0.1"), _node("127.0.0.1"), _node("127.0.0.1")]
    assert check_cluster(storage, "http://127.0.0.1:5000", nodes=same_host, env=NO_ENV) == []
    assert check_cluster(storage, "https://mlflow.example.com", nodes=THREE, env=NO_ENV) == []


def test_a_head_that_cannot_hold_a_worker_counts_as_multi_node(tmp_path):
    from larp.trainer import TrainConfig

    cpu_head = [_node("10.0.0.1", CPU=0.0)]  # cluster.yaml's head; GPU workers at min 0
    needs = worker_needs(TrainConfig(use_gpu=True))
    assert needs == {"CPU": 1.0, "GPU": 1.0}
    assert "join later" in spans_nodes(cpu_head, needs)
    with pytest.raises(ConfigError, match="join later"):
        check_cluster(str(tmp_path), nodes=cpu_head, needs=needs, env=NO_ENV)
    assert check_cluster("s3://b/runs", nodes=cpu_head, needs=needs, env=NO_ENV) == []
    # a node that fits the worker keeps the work on one node
    assert spans_nodes([_node("10.0.0.1", CPU=8.0, GPU=1.0)], needs) is None


# ---------------------------------------------------------------------- wired in, before work
def test_launch_refuses_before_any_worker_starts(tmp_path, monkeypatch):
    from larp import LaRPConfig, cluster, train
    from larp.trainer import TrainConfig

    monkeypatch.delenv(SHARED_ENV, raising=False)
    monkeypatch.setattr(train, "ensure_ray", lambda address=None: None)
    monkeypatch.setattr(cluster, "cluster_nodes", lambda: THREE)

    def no_trainer(*args, **kwargs):
        raise AssertionError("the trainer was built despite the refusal")

    monkeypatch.setattr(train, "build_trainer", no_trainer)
    config = TrainConfig(
        train_data="synthetic:source?n=3&n_train=1",
        eval_data=None,
        storage_path=str(tmp_path / "runs"),
    )
    with pytest.raises(ConfigError, match="3 alive nodes"):
        train.launch(LaRPConfig.tiny_random(), config, ray_address="10.0.0.1:6379")
    assert not (tmp_path / "runs").exists()


def test_sweep_refuses_before_any_trial_or_tracking_store(tmp_path, monkeypatch):
    from larp import cluster, sweep, train

    monkeypatch.delenv(SHARED_ENV, raising=False)
    monkeypatch.setattr(train, "ensure_ray", lambda address=None: None)
    monkeypatch.setattr(cluster, "cluster_nodes", lambda: THREE)
    config = sweep.parse_args(
        [
            "--train-data", "synthetic:source?n=3&n_train=1",
            "--eval-data", "synthetic:target?n=3&n_train=1",
            "--storage-path", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--ray-address", "10.0.0.1:6379",
        ]
    )  # fmt: skip
    assert config.shared_storage is False
    with pytest.raises(ConfigError) as info:
        sweep.run_sweep(config)
    assert "storage_path" in str(info.value) and "tracking URI" in str(info.value)
    assert not (tmp_path / "mlflow.db").exists(), "the tracking store was created anyway"
    # --shared-storage declares the storage path; the SQLite file on it is then only warned about
    shared = sweep.parse_args(
        ["--storage-path", str(tmp_path / "runs"), "--shared-storage", "--ray-address", "x:1"]
    )
    assert shared.shared_storage is True
    runs = tmp_path / "runs"
    errors, notes = cluster_problems(
        str(runs), f"sqlite:///{runs}/mlflow.db", nodes=THREE, shared=True, env=NO_ENV
    )
    assert errors == [] and len(notes) == 1
    # the flag declares the storage path only, not every local path
    errors, _ = cluster_problems(
        str(runs), f"sqlite:///{tmp_path}/mlflow.db", nodes=THREE, shared=True, env=NO_ENV
    )
    assert len(errors) == 1 and "tracking URI" in errors[0]
