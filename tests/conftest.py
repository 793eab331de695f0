"""Shared fixtures for the model tests: one tiny random open_clip, built once per session.

Every `FrozenBackbone` the tests need (other feature layers, V-V on/off) wraps the same frozen
`clip` module, so the towers are built once. Tests must never modify that module in place; one
that needs altered weights takes a `copy.deepcopy`.
"""

from __future__ import annotations

import pytest
import torch

from larp.backbone import FrozenBackbone, create_clip
from larp.config import LaRPConfig

# The configurations that tests parametrise over (SPEC §1.5 ablations and the V-V switch).
CONFIGS = {
    "tiny": LaRPConfig.tiny_random(),
    "tiny-vv-off": LaRPConfig.tiny_random(vv_from_layer=None),
    "tiny-anomalyclip": LaRPConfig.tiny_random().anomalyclip(),
    "tiny-2layers": LaRPConfig.tiny_random(feature_layers=(2, 4), shallow_layers=(2,)),
}


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread():
    """One intra-op thread: the tiny model's ops are far too small to split, and on the 2-core
    CI machines, with other processes busy, two spinning threads made the suite ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_config() -> LaRPConfig:
    return LaRPConfig.tiny_random()


@pytest.fixture(scope="session")
def clip(tiny_config):
    """The frozen random-init `larp-tiny-random` CLIP (seeded by `backbone_seed`)."""
    return create_clip(tiny_config)


@pytest.fixture(scope="session")
def make_backbone(clip, tiny_config):
    """`make_backbone(config)`: a `FrozenBackbone` for `config` that shares the session's CLIP."""
    made: dict[tuple, FrozenBackbone] = {}
    shared_keys = ("backbone", "pretrained", "backbone_seed", "image_size")

    def make(config: LaRPConfig) -> FrozenBackbone:
        if any(getattr(config, k) != getattr(tiny_config, k) for k in shared_keys):
            return FrozenBackbone(config)
        key = (config.feature_layers, config.vv_from_layer, config.prompt_depth)
        if key not in made:
            made[key] = FrozenBackbone(config, clip=clip)
        return made[key]

    return make


@pytest.fixture(scope="session")
def backbone(make_backbone, tiny_config) -> FrozenBackbone:
    return make_backbone(tiny_config)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """Two random 112x112 'preprocessed' images, the same in every test."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(2, 3, 112, 112, generator=generator)


@pytest.fixture(params=sorted(CONFIGS), ids=sorted(CONFIGS))
def any_config(request) -> LaRPConfig:
    """Each of the parametrised configurations in turn."""
    return CONFIGS[request.param]
