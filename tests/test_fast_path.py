"""The fast inference path (reduced-precision backbone, fp32 head) agrees with the fp32 path
within a stated tolerance: 0.01 on scores, 0.02 on map values (probabilities in [0, 1])."""

from __future__ import annotations

import pytest
import torch

from larp import LaRPCLIP, LaRPConfig
from larp.errors import ConfigError

SCORE_TOL, MAP_TOL = 0.01, 0.02
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def model() -> LaRPCLIP:
    torch.manual_seed(0)
    return LaRPCLIP(LaRPConfig.tiny_random()).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_matches_fp32(model, device, precision):
    if device == "cpu" and precision == "fp16":
        pytest.skip("fp16 autocast is a GPU path")
    net = model.to(device)
    images = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1)).to(device)
    ref = net.predict(images, precision="fp32")
    fast = net.predict(images, precision=precision)
    assert fast.score.dtype == torch.float32 and fast.anomaly_map.dtype == torch.float32
    assert (fast.score - ref.score).abs().max() < SCORE_TOL
    assert (fast.text_score - ref.text_score).abs().max() < SCORE_TOL
    assert (fast.anomaly_map - ref.anomaly_map).abs().max() < MAP_TOL
    assert not torch.equal(fast.layer_maps, ref.layer_maps)  # the fast path really ran
    model.to("cpu")


def test_auto_is_fp32_on_cpu(model):
    images = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(
        model.predict(images).score, model.predict(images, precision="fp32").score, atol=0, rtol=0
    )


def test_unknown_precision_is_a_clear_error(model):
    with pytest.raises(ConfigError, match="precision"):
        model.predict(torch.randn(1, 3, 112, 112), precision="int8")


@pytest.mark.slow  # inductor compiles C++ kernels: ~a minute on 2 cores
def test_compiled_vision_pass_matches_eager():
    torch.manual_seed(0)
    eager = LaRPCLIP(LaRPConfig.tiny_random()).eval()
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    ref = eager.predict(images, precision="fp32")
    eager.backbone.compile_vision()
    assert eager.backbone._compiled_vision is not None
    fast = eager.predict(images, precision="fp32")
    torch.testing.assert_close(fast.score, ref.score, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.anomaly_map, ref.anomaly_map, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.layer_maps, ref.layer_maps, atol=1e-4, rtol=0)


def test_unknown_compile_mode_is_a_clear_error(model):
    with pytest.raises(ConfigError, match="compile mode"):
        model.backbone.compile_vision("fastest")
    assert model.backbone._compiled_vision is None
