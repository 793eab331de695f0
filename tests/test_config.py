"""`LaRPConfig`: the SPEC defaults, presets, dict/YAML round trips and validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import CONFIGS

from larp.config import TINY_RANDOM_BACKBONE, TINY_SYNTHETIC_BACKBONE, LaRPConfig
from larp.errors import ConfigError, LaRPError

SWITCHES = ("decouple_prompts", "adaptive_fusion", "refiner", "prototype")


def test_defaults_are_the_spec_values():
    cfg = LaRPConfig()
    assert cfg.backbone == "ViT-L-14-336-quickgelu" and cfg.pretrained == "openai"
    assert cfg.image_size == 518
    assert cfg.feature_layers == (6, 12, 18, 24)
    assert cfg.shallow_layers == (6, 12) and cfg.deep_layers == (18, 24)
    assert cfg.vv_from_layer == 6
    assert (cfg.n_ctx, cfg.prompt_depth, cfg.n_deep_tokens) == (12, 9, 4)
    assert cfg.prompt_init_std == 0.02
    assert cfg.temperature == 0.07
    assert cfg.refiner_hidden == 16 and cfg.blur_sigma == 4.0
    assert (cfg.lam, cfg.top_k, cfg.normal_quantile) == (1.0, 8, 0.5)
    assert all(getattr(cfg, s) for s in SWITCHES)
    assert (cfg.lambda_f, cfg.lambda_r, cfg.lambda_delta, cfg.focal_gamma) == (1.0, 0.5, 0.2, 2.0)
    assert cfg.num_layers == 4


def test_tiny_presets_and_overrides():
    shipped = LaRPConfig.tiny()
    assert shipped.backbone == TINY_SYNTHETIC_BACKBONE and shipped.pretrained == "synthetic"
    cfg = LaRPConfig.tiny_random()
    assert cfg.backbone == TINY_RANDOM_BACKBONE and cfg.pretrained is None
    # one geometry, two backbones
    assert shipped.replace(backbone=cfg.backbone, pretrained=None) == cfg
    assert cfg.image_size == 112 and cfg.feature_layers == (1, 2, 3, 4)
    assert cfg.shallow_layers == (1, 2) and cfg.deep_layers == (3, 4)
    assert cfg.prompt_depth == 4
    assert LaRPConfig.tiny_random(top_k=7).top_k == 7
    with pytest.raises(ConfigError):
        LaRPConfig.tiny_random(top_k=0)


def test_anomalyclip_turns_off_exactly_the_four_switches():
    cfg = LaRPConfig.tiny_random(lam=2.0, top_k=3)
    base = cfg.anomalyclip()
    assert not any(getattr(base, s) for s in SWITCHES)
    changed = {
        f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)
    }
    assert changed == set(SWITCHES)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dict_round_trip(name):
    cfg = CONFIGS[name]
    data = cfg.to_dict()
    # plain JSON types only (the dict goes into checkpoint manifests and MLflow params)
    assert json.loads(json.dumps(data)) == data
    assert isinstance(data["feature_layers"], list)
    back = LaRPConfig.from_dict(json.loads(json.dumps(data)))
    assert back == cfg
    assert isinstance(back.feature_layers, tuple) and isinstance(back.shallow_layers, tuple)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_yaml_round_trip(name, tmp_path):
    cfg = CONFIGS[name]
    path = tmp_path / "config.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    assert LaRPConfig.from_yaml(path) == cfg


def test_yaml_keeps_null_vv_and_partial_files_use_defaults(tmp_path):
    cfg = LaRPConfig.tiny_random(vv_from_layer=None)
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert "vv_from_layer: null" in path.read_text()
    assert LaRPConfig.from_yaml(path).vv_from_layer is None
    partial = tmp_path / "partial.yaml"
    partial.write_text("lam: 4.0\nfeature_layers: [6, 12, 18, 24]\n")
    loaded = LaRPConfig.from_yaml(partial)
    assert loaded.lam == 4.0 and loaded == LaRPConfig(lam=4.0)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert LaRPConfig.from_yaml(empty) == LaRPConfig()


def test_unknown_keys_are_listed():
    data = LaRPConfig.tiny_random().to_dict()
    data["lamda"] = 1.0
    data["topk"] = 3
    with pytest.raises(ConfigError) as info:
        LaRPConfig.from_dict(data)
    message = str(info.value)
    assert "lamda" in message and "topk" in message
    assert "lam" in message  # the valid keys are named too


def test_unknown_keys_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("refiner_layers: 3\n")
    with pytest.raises(ConfigError, match="refiner_layers"):
        LaRPConfig.from_yaml(path)


@pytest.mark.parametrize("data", [[1, 2], "lam: 1", 3])
def test_non_mapping_is_refused(data):
    with pytest.raises(ConfigError, match="mapping"):
        LaRPConfig.from_dict(data)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        LaRPConfig.from_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lam: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        LaRPConfig.from_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        LaRPConfig.from_yaml(listing)


def test_wrong_value_type_is_a_config_error():
    with pytest.raises(ConfigError):
        LaRPConfig.from_dict({"feature_layers": "abc"})
    with pytest.raises(ConfigError):
        LaRPConfig.from_dict({"lam": "much"})


INVALID = [
    ({"lam": -0.1}, "lam"),
    ({"top_k": 0}, "top_k"),
    ({"feature_layers": ()}, "feature_layers"),
    ({"feature_layers": (0, 1, 2, 3)}, "1-based"),
    ({"feature_layers": (1, 1, 2, 3)}, "duplicates"),
    ({"feature_layers": (2, 1, 3, 4)}, "increasing"),
    ({"shallow_layers": (1, 5)}, "not feature layers"),
    ({"shallow_layers": ()}, "empty"),
    ({"shallow_layers": (1, 2, 3, 4)}, "deep"),
    ({"shallow_layers": (1, 1)}, "duplicates"),
    ({"vv_from_layer": 0}, "vv_from_layer"),
    ({"temperature": 0.0}, "temperature"),
    ({"normal_quantile": 0.0}, "normal_quantile"),
    ({"normal_quantile": 1.5}, "normal_quantile"),
    ({"blur_sigma": -1.0}, "blur_sigma"),
    ({"n_ctx": 0}, "n_ctx"),
    ({"n_deep_tokens": 13}, "n_deep_tokens"),
    ({"prompt_depth": 0}, "prompt_depth"),
    ({"image_size": 0}, "image_size"),
    ({"refiner_hidden": 0}, "refiner_hidden"),
    ({"lambda_f": -1.0}, "lambda_f"),
    ({"lambda_r": -0.5}, "lambda_r"),
    ({"lambda_delta": -0.2}, "lambda_delta"),
]


@pytest.mark.parametrize("change,words", INVALID, ids=[str(c) for c, _ in INVALID])
def test_invalid_values_are_refused(change, words):
    with pytest.raises(ConfigError, match=words):
        LaRPConfig.tiny_random(**change)
    with pytest.raises(ConfigError):
        LaRPConfig.from_dict({**LaRPConfig.tiny_random().to_dict(), **change})
    # replace() validates too
    with pytest.raises(ConfigError):
        LaRPConfig.tiny_random().replace(**change)


def test_config_errors_are_larp_errors():
    assert issubclass(ConfigError, LaRPError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "change",
    [{"lam": 0.0}, {"lam": 4.0}, {"top_k": 1}, {"vv_from_layer": None}, {"blur_sigma": 0.0}],
)
def test_boundary_values_are_accepted(change):
    assert LaRPConfig.tiny_random(**change)


def test_partition_is_disjoint_and_covering_by_construction():
    for cfg in [*CONFIGS.values(), LaRPConfig(), LaRPConfig.tiny_random(shallow_layers=(3,))]:
        if not cfg.decouple_prompts:
            continue
        shallow, deep = set(cfg.shallow_layers), set(cfg.deep_layers)
        assert shallow and deep and not shallow & deep
        assert shallow | deep == set(cfg.feature_layers)


def test_shared_prompts_do_not_need_a_partition():
    # With one prompt group (AnomalyCLIP) there is nothing to partition.
    cfg = LaRPConfig.tiny_random(decouple_prompts=False, shallow_layers=())
    assert cfg.deep_layers == cfg.feature_layers


def test_config_is_frozen():
    cfg = LaRPConfig.tiny_random()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lam = 2.0  # type: ignore[misc]
