"""Bad sweep configs fail before Ray or any trial starts, with a message naming the problem."""

from __future__ import annotations

import pytest

from larp.cli import load_run_config
from larp.config import LaRPConfig
from larp.data import DatasetError
from larp.errors import ConfigError
from larp.sweep import SweepConfig, main, parse_args

SMALL = {"train_data": "synthetic:source?n=2&n_train=1", "eval_data": "synthetic:target?n=2"}


def test_default_grid_is_three_partitions_by_25_scorings():
    sweep = SweepConfig()
    assert list(sweep.variants()) == ["shallow=1", "shallow=1-2", "shallow=1-2-3"]
    assert len(sweep.lams) * len(sweep.top_ks) == 25


def test_tiny_presets_train_at_their_own_lr_unless_told():
    assert SweepConfig().base_model().backbone == "larp-tiny-synthetic"
    assert SweepConfig().train_config().lr == 1e-4
    assert SweepConfig(preset="tiny-random").train_config().lr == 1e-4
    assert SweepConfig(train={"lr": 5e-4}).train_config().lr == 5e-4
    assert SweepConfig(preset="default").train_config().lr == 1e-3  # the paper's


def test_cli_run_config_defaults(tmp_path):
    model, train = load_run_config(None)
    assert model == LaRPConfig.tiny() and train == {"lr": 1e-4}
    only_train = tmp_path / "train.yaml"
    only_train.write_text("train:\n  epochs: 3\n")
    assert load_run_config(str(only_train)) == (LaRPConfig.tiny(), {"lr": 1e-4, "epochs": 3})
    own_model = tmp_path / "model.yaml"
    own_model.write_text("model:\n  backbone: ViT-B-16\n  pretrained: null\ntrain:\n  epochs: 3\n")
    model, train = load_run_config(str(own_model))
    assert model.backbone == "ViT-B-16" and train == {"epochs": 3}  # no tiny defaults


def test_ablation_mode_trains_the_table4_variants_with_the_baseline():
    variants = SweepConfig(mode="ablation").variants()
    assert variants["anomalyclip"] == dict(
        decouple_prompts=False, adaptive_fusion=False, refiner=False, prototype=False
    )
    assert "larp" in variants and len(variants) == 5


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"lams": [1.0, -0.5]}, ConfigError, "lams"),
        ({"top_ks": [0, 4]}, ConfigError, "top_ks"),
        ({"partitions": [[5]]}, ConfigError, "shallow=5"),
        ({"partitions": [[1, 2, 3, 4]]}, ConfigError, "deep prompt group"),
        ({"metric": "accuracy"}, ConfigError, "metric"),
        ({"search": "bayes"}, ConfigError, "search"),
        ({"model": {"lam": -1}}, ConfigError, "lam"),
        ({"train": {"epochs": 0}}, ConfigError, "epochs"),
        ({"train": {"eval_data": "mvtec:/does/not/exist"}}, DatasetError, "does not exist"),
    ],
)
def test_invalid_configs_fail_validation(changes, error, match):
    data = {"train": dict(SMALL)}
    for key, value in changes.items():
        if isinstance(value, dict) and key in data:
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(error, match=match):
        SweepConfig.from_dict(data).validate()


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="lambdas"):
        SweepConfig.from_dict({"lambdas": [1]})


def test_flags_and_yaml_merge(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("lams: [0, 2]\ntrain:\n  epochs: 3\nmodel:\n  top_k: 2\n")
    sweep = parse_args(["--config", str(path), "--top-ks", "1,2", "--partitions", "1;1,2"])
    assert sweep.lams == [0, 2] and sweep.top_ks == [1, 2]
    assert sweep.partitions == [[1], [1, 2]]
    assert sweep.train["epochs"] == 3 and sweep.model["top_k"] == 2


def test_main_reports_errors_without_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--lams", "-1", "--train-data", SMALL["train_data"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lams" in err
    assert not (tmp_path / "larp_runs").exists()


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SweepConfig().tracking_uri_absolute() == f"sqlite:///{tmp_path}/mlflow.db"
