"""Checkpoints (SPEC §1.7): round trip, manifest contents, and refusal of bad checkpoints."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from safetensors.torch import load_file, save_file

from larp.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    file_sha256,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from larp.config import LaRPConfig
from larp.errors import CheckpointError
from larp.model import LaRPCLIP

RESULT_FIELDS = (
    "layer_maps",
    "fused_map",
    "error_prior",
    "final_map",
    "anomaly_map",
    "q",
    "text_score",
    "map_score",
    "score",
)


def trained(make_backbone, config: LaRPConfig, seed: int = 0) -> LaRPCLIP:
    """A model whose trainable tensors all differ from their initial values."""
    torch.manual_seed(seed)
    model = LaRPCLIP(config, make_backbone(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture
def saved(make_backbone, tmp_path):
    model = trained(make_backbone, LaRPConfig.tiny_random())
    path = save_checkpoint(
        model,
        tmp_path / "ckpt",
        training_data={"dataset": "synthetic:source", "split": "test"},
        metrics={"pixel_auroc": 0.75},
        threshold=0.42,
        extra={"run_id": "abc"},
    )
    return model, path


def rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    for key, value in changes.items():
        manifest[key] = value
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def rewrite_weights(path: Path, state: dict) -> None:
    save_file(state, str(path / WEIGHTS_FILE))
    weights = json.loads((path / MANIFEST_FILE).read_text())["weights"]
    rewrite_manifest(path, weights={**weights, "sha256": file_sha256(path / WEIGHTS_FILE)})


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_gives_identical_outputs(name, make_backbone, images, tmp_path):
    cfg = CONFIGS[name]
    model = trained(make_backbone, cfg)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", backbone=make_backbone(cfg))
    assert not loaded.training and loaded.config == cfg
    a, b = model.predict(images), loaded.predict(images)
    for field in RESULT_FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    state_a, state_b = model.trainable_state_dict(), loaded.trainable_state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_round_trip_builds_its_own_backbone(saved, images):
    model, path = saved
    loaded = load_checkpoint(path)  # no backbone given: rebuilt from the manifest's config
    assert loaded.backbone is not model.backbone
    assert torch.equal(model.predict(images).score, loaded.predict(images).score)
    # the manifest path works as well as the folder
    assert load_checkpoint(path / MANIFEST_FILE, backbone=model.backbone).checkpoint_dir == path


def test_manifest_contents(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]  # no temp files
    directory, manifest = read_manifest(path)
    assert directory == path
    assert manifest["format"] == "larp-checkpoint" and manifest["format_version"] == 1
    assert manifest["config"] == model.config.to_dict()
    assert LaRPConfig.from_dict(manifest["config"]) == model.config
    assert manifest["backbone"] == {
        "name": "larp-tiny-random",
        "pretrained": None,
        "image_size": 112,
        "weights_sha256": model.backbone.weights_checksum,
    }
    sha = file_sha256(path / WEIGHTS_FILE)
    assert manifest["weights"] == {"file": WEIGHTS_FILE, "sha256": sha}
    assert manifest["checkpoint_id"] == sha[:12]
    assert manifest["training_data"] == {"dataset": "synthetic:source", "split": "test"}
    assert manifest["metrics"] == {"pixel_auroc": 0.75}
    assert manifest["threshold"] == 0.42 and manifest["extra"] == {"run_id": "abc"}
    # weights hold the trained tensors only (a few KB here), never the backbone
    stored = load_file(str(path / WEIGHTS_FILE))
    assert set(stored) == set(model.trainable_state_dict())
    assert not any(k.startswith("backbone.") for k in stored)
    loaded = load_checkpoint(path, backbone=model.backbone)
    assert loaded.manifest["threshold"] == 0.42


def test_saving_again_replaces_the_checkpoint(saved, make_backbone, images):
    model, path = saved
    other = trained(make_backbone, LaRPConfig.tiny_random(), seed=9)
    save_checkpoint(other, path)
    loaded = load_checkpoint(path, backbone=model.backbone)
    assert torch.equal(loaded.predict(images).score, other.predict(images).score)
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]


# ---------------------------------------------------------------------------------- refusals
def test_tampered_weights_are_refused(saved):
    model, path = saved
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path, backbone=model.backbone)


def test_manifest_for_another_backbone_is_refused(saved, make_backbone):
    model, path = saved
    config = json.loads((path / MANIFEST_FILE).read_text())["config"]
    # the manifest's config names seed 1: that backbone's weights have another checksum
    rewrite_manifest(path, config={**config, "backbone_seed": 1})
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_checkpoint(path)
    # ... and the seed-0 backbone passed in is not the one the manifest names
    with pytest.raises(CheckpointError, match="backbone"):
        load_checkpoint(path, backbone=model.backbone)


def test_other_backbone_identity_is_refused(saved):
    model, path = saved
    backbone = json.loads((path / MANIFEST_FILE).read_text())["backbone"]
    rewrite_manifest(path, backbone={**backbone, "weights_sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_checkpoint(path, backbone=model.backbone)
    rewrite_manifest(path, backbone={**backbone, "name": "ViT-B-16"})
    with pytest.raises(CheckpointError, match="name"):
        load_checkpoint(path, backbone=model.backbone)


def test_a_given_backbone_with_other_features_is_refused(saved, make_backbone):
    model, path = saved
    other = make_backbone(LaRPConfig.tiny_random(vv_from_layer=None))
    with pytest.raises(CheckpointError):
        load_checkpoint(path, backbone=other)


class _Marker:
    """Unpickling this touches a file: proof that a loader executed pickle code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_weights_are_refused_without_being_unpickled(saved, tmp_path):
    model, path = saved
    marker = tmp_path / "unpickled"
    state = {k: v for k, v in model.trainable_state_dict().items()}
    state["evil"] = _Marker(str(marker))
    with open(path / WEIGHTS_FILE, "wb") as handle:
        pickle.dump(state, handle)
    rewrite_manifest(
        path, weights={"file": WEIGHTS_FILE, "sha256": file_sha256(path / WEIGHTS_FILE)}
    )
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path, backbone=model.backbone)
    assert not marker.exists()


def test_a_torch_pt_file_is_not_a_checkpoint(saved, tmp_path):
    model, _ = saved
    pt = tmp_path / "model.pt"
    torch.save(model.trainable_state_dict(), pt)
    with pytest.raises(CheckpointError, match="not a LaRP checkpoint"):
        load_checkpoint(pt, backbone=model.backbone)
    folder = tmp_path / "pt_only"
    folder.mkdir()
    torch.save(model.trainable_state_dict(), folder / "model.pt")
    with pytest.raises(CheckpointError, match=MANIFEST_FILE):
        load_checkpoint(folder, backbone=model.backbone)


def test_random_and_missing_files(saved, tmp_path):
    model, path = saved
    junk = tmp_path / "junk.bin"
    junk.write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    # random bytes as the weights file, with a matching checksum
    (path / WEIGHTS_FILE).write_bytes(junk.read_bytes())
    rewrite_manifest(path, weights={"file": WEIGHTS_FILE, "sha256": file_sha256(junk)})
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path, backbone=model.backbone)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="weights missing"):
        load_checkpoint(path, backbone=model.backbone)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(path, backbone=model.backbone)


@pytest.mark.parametrize(
    "text,words",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "not a LaRP checkpoint manifest"),
        ('{"format": "something-else"}', "not a LaRP checkpoint manifest"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
)
def test_bad_manifest_files(saved, text, words):
    model, path = saved
    if isinstance(text, bytes):
        (path / MANIFEST_FILE).write_bytes(text)
    else:
        (path / MANIFEST_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(path, backbone=model.backbone)


def test_bad_manifest_sections(saved):
    model, path = saved
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    rewrite_manifest(path, format_version=2)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path, backbone=model.backbone)
    for section in ("config", "backbone", "weights"):
        rewrite_manifest(path, **{**manifest, section: None})
        with pytest.raises(CheckpointError, match=section):
            load_checkpoint(path, backbone=model.backbone)
    rewrite_manifest(path, **{**manifest, "config": {**manifest["config"], "lam": -1.0}})
    with pytest.raises(CheckpointError, match="config is invalid"):
        load_checkpoint(path, backbone=model.backbone)
    rewrite_manifest(path, **{**manifest, "config": {**manifest["config"], "mystery": 1}})
    with pytest.raises(CheckpointError, match="mystery"):
        load_checkpoint(path, backbone=model.backbone)


def test_missing_unexpected_and_misshapen_keys(saved):
    model, path = saved
    state = load_file(str(path / WEIGHTS_FILE))
    rewrite_weights(path, {k: v for k, v in state.items() if k != "fusion.alpha"})
    with pytest.raises(CheckpointError, match=r"missing \['fusion.alpha'\]"):
        load_checkpoint(path, backbone=model.backbone)
    rewrite_weights(path, {**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected \['extra.weight'\]"):
        load_checkpoint(path, backbone=model.backbone)
    rewrite_weights(path, {**state, "fusion.alpha": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="fusion.alpha has shape"):
        load_checkpoint(path, backbone=model.backbone)


def test_checkpoint_of_an_ablation_does_not_fit_the_full_config(saved, make_backbone):
    model, path = saved
    base = trained(make_backbone, LaRPConfig.tiny_random().anomalyclip())
    save_file(
        {k: v.contiguous() for k, v in base.trainable_state_dict().items()},
        str(path / WEIGHTS_FILE),
    )
    rewrite_manifest(
        path, weights={"file": WEIGHTS_FILE, "sha256": file_sha256(path / WEIGHTS_FILE)}
    )
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path, backbone=model.backbone)
