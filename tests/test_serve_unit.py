"""Fast tests of the serving layer without a Ray cluster: upload decoding and validation
(`serve/http.py`), builder arguments and autoscaling keys (`serve/settings.py`), the builder's
checkpoint resolution and `serve/config.yaml` against Ray's own schema."""

from __future__ import annotations

import asyncio
import io
import random
import struct
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from larp.data.transforms import pil_to_tensor
from larp.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve.http import (  # noqa: E402
    Limits,
    RequestError,
    decode_heatmap,
    decode_image,
    decode_request_image,
    heatmap_base64,
    image_from_multipart,
    parse_query,
    pixel_cap,
    read_body,
)
from serve.settings import (  # noqa: E402
    BUILD_ARGS,
    ServeSettings,
    parse_build_args,
    validate_autoscaling,
)

SIZE = 112
LIMITS = Limits()


# ---------------------------------------------------------------------------- helpers
def _upright(width: int = 48, height: int = 32) -> Image.Image:
    """A non-square RGB picture with structure in both axes (so a rotation shows)."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def _bilevel_png(width: int, height: int, with_pixels: bool = True) -> bytes:
    """A 1-bit grayscale PNG of any size, a few KB: all-zero rows compress ~1000:1. Without
    pixels it is a header-only file that would fail to decode (proves the size check comes
    before decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    if with_pixels:
        row = b"\x00" * (1 + (width + 7) // 8)
        compressor = zlib.compressobj(9)
        data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
        out += _png_chunk(b"IDAT", data)
    return out + _png_chunk(b"IEND", b"")


def _status(data: bytes, limits: Limits = LIMITS) -> tuple[int, str, str]:
    with pytest.raises(RequestError) as info:
        decode_request_image(data, limits, SIZE)
    return info.value.status, info.value.code, info.value.detail


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- accepted formats
@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_match_pil_to_tensor(fmt):
    img = _upright()
    prepared = decode_request_image(_encode(img, fmt), LIMITS, SIZE)
    assert (prepared.width, prepared.height) == img.size
    assert prepared.format == fmt
    _same(prepared.tensor, pil_to_tensor(img, SIZE))


def test_jpeg_matches_what_larp_predict_reads():
    data = _encode(_upright(), "JPEG", quality=90)
    prepared = decode_request_image(data, LIMITS, SIZE)
    assert prepared.format == "JPEG" and (prepared.width, prepared.height) == (48, 32)
    with Image.open(io.BytesIO(data)) as img:  # what larp.data.transforms.load_image does
        img.load()
        _same(prepared.tensor, pil_to_tensor(img, SIZE))


def test_camera_mpo_jpeg_is_accepted_as_jpeg():
    img = _upright()
    data = _encode(img, "MPO", save_all=True, append_images=[img.transpose(0)])
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == "MPO"
    assert decode_request_image(data, LIMITS, SIZE).format == "JPEG"


# ---------------------------------------------------------------------------- modes and EXIF
def test_grayscale_equals_its_rgb_version():
    gray = _upright().convert("L")
    prepared = decode_request_image(_encode(gray, "PNG"), LIMITS, SIZE)
    _same(prepared.tensor, pil_to_tensor(gray.convert("RGB"), SIZE))


def test_rgba_equals_the_rgb_under_the_alpha():
    rgb = _upright()
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1))))
    prepared = decode_request_image(_encode(rgba, "PNG"), LIMITS, SIZE)
    _same(prepared.tensor, pil_to_tensor(rgb, SIZE))


def test_16bit_equals_its_8bit_version():
    gray8 = np.asarray(_upright().convert("L"), dtype=np.uint16)
    img16 = Image.fromarray(gray8 * 257)  # full 16-bit range: 255 -> 65535
    data = _encode(img16, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")
    prepared = decode_request_image(data, LIMITS, SIZE)
    expected = Image.fromarray(gray8.astype(np.uint8)).convert("RGB")
    _same(prepared.tensor, pil_to_tensor(expected, SIZE))


def test_paletted_equals_its_rgb_version():
    pal = _upright().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    prepared = decode_request_image(_encode(pal, "PNG"), LIMITS, SIZE)
    _same(prepared.tensor, pil_to_tensor(pal.convert("RGB"), SIZE))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_exif_rotated_equals_the_upright_image(fmt):
    upright = _upright(48, 32)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the camera's raw 32x48 pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    prepared = decode_request_image(_encode(stored, fmt, exif=exif), LIMITS, SIZE)
    assert (prepared.width, prepared.height) == (48, 32)  # reported as displayed
    _same(prepared.tensor, pil_to_tensor(upright, SIZE))


# ---------------------------------------------------------------------------- rejected input
@pytest.mark.parametrize(
    "name,make",
    [
        ("GIF", lambda: _encode(_upright().convert("P"), "GIF")),
        ("WEBP", lambda: _encode(_upright(), "WEBP")),
        ("ICO", lambda: _encode(_upright(), "ICO")),
        ("text", lambda: b"hello, this is not an image\n"),
        ("json", lambda: b'{"image": "cat.png"}'),
        ("pdf", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
    ],
)
def test_unsupported_formats_are_415(name, make):
    status, code, detail = _status(make())
    assert (status, code) == (415, "unsupported_media_type")
    assert "PNG, JPEG, BMP, TIFF" in detail
    if name in ("GIF", "WEBP", "ICO"):
        assert name in detail


def _garbage() -> bytes:
    rng = random.Random(7)
    return bytes(rng.getrandbits(8) for _ in range(3000))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _encode(_upright(), "PNG")[:200], id="truncated-png"),
        pytest.param(lambda: _encode(_upright(), "JPEG")[:300], id="truncated-jpeg"),
        pytest.param(lambda: _encode(_upright(), "BMP")[:100], id="truncated-bmp"),
        pytest.param(lambda: _encode(_upright(), "TIFF")[:150], id="truncated-tiff"),
        pytest.param(lambda: b"\x89PNG\r\n\x1a\n" + _garbage(), id="png-magic-garbage"),
        pytest.param(lambda: b"\xff\xd8\xff\xe0" + _garbage(), id="jpeg-magic-garbage"),
        pytest.param(_garbage, id="random-bytes"),
    ],
)
def test_truncated_or_garbage_is_400(make):
    status, code, _ = _status(make())
    assert (status, code) == (400, "undecodable_image")


def test_empty_body_is_400():
    assert _status(b"")[:2] == (400, "empty_body")


def test_too_many_bytes_is_413():
    data = _encode(_upright(), "BMP")
    status, code, detail = _status(data, Limits(max_bytes=len(data) - 1))
    assert (status, code) == (413, "body_too_large")
    assert str(len(data) - 1) in detail


def test_too_many_pixels_is_413_small_in_bytes():
    data = _bilevel_png(10_000, 10_000)
    assert len(data) < 50_000  # 100 Mpx in a few KB
    for limits in (Limits(max_pixels=1_000_000), LIMITS):
        assert _status(data, limits)[:2] == (413, "too_many_pixels")
    status, code, detail = _status(_bilevel_png(5000, 4000), Limits(max_pixels=1_000_000))
    assert (status, code) == (413, "too_many_pixels")
    assert "5000x4000" in detail and "1000000" in detail


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    # the pixel data is missing: decoding would be a 400, the header check answers first
    header_only = _bilevel_png(3000, 3000, with_pixels=False)
    assert _status(header_only, Limits(max_pixels=1_000_000))[:2] == (413, "too_many_pixels")
    assert _status(header_only, Limits(max_pixels=10_000_000))[:2] == (400, "undecodable_image")


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["bomb-warning", "bomb-error"])
def test_pil_decompression_bomb_is_413_not_500(side):
    """Above PIL's own limits (89 Mpx warns, 179 Mpx raises) even a generous server limit
    ends in 413."""
    data = _bilevel_png(side, side, with_pixels=False)
    assert _status(data, Limits(max_pixels=10**12))[:2] == (413, "too_many_pixels")


def test_default_limits():
    assert LIMITS.max_bytes == 20 * 2**20 and LIMITS.max_pixels == 40_000_000
    assert pixel_cap(LIMITS) == 40_000_000
    assert pixel_cap(Limits(max_pixels=10**12)) == Image.MAX_IMAGE_PIXELS  # PIL's bomb guard
    assert decode_image(_bilevel_png(6000, 6000), LIMITS).size == (6000, 6000)


# ---------------------------------------------------------------------------- query, body
def test_parse_query():
    assert parse_query([]).map == "none"
    assert parse_query([("map", "png")]).map == "png"
    assert parse_query([("map", "PNG")]).map == "png"
    for items in ([("map", "jpg")], [("mpa", "png")], [("map", "png"), ("map", "none")]):
        with pytest.raises(RequestError) as info:
            parse_query(items)
        assert (info.value.status, info.value.code) == (422, "invalid_parameter")


async def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _read(data: bytes, content_length: str | None, max_bytes: int) -> bytes:
    return asyncio.run(read_body(_chunks(data), content_length, max_bytes))


def test_read_body_limits():
    data = bytes(5000)
    assert _read(data, "5000", 5000) == data
    assert _read(data, None, 5000) == data
    for content_length in ("5000", None):  # declared, and streamed without a length
        with pytest.raises(RequestError) as info:
            _read(data, content_length, 4999)
        assert info.value.status == 413
    with pytest.raises(RequestError) as info:
        _read(data, "lots", 5000)
    assert info.value.status == 400


def _multipart(files=None, data=None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/detect", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_multipart_field_image():
    png = _encode(_upright(), "PNG")
    body, content_type = _multipart(files={"image": ("a.png", png, "image/gif")})
    assert asyncio.run(image_from_multipart(body, content_type)) == png

    body, content_type = _multipart(files={"file": ("a.png", png, "image/png")})
    with pytest.raises(RequestError) as info:
        asyncio.run(image_from_multipart(body, content_type))
    assert (info.value.status, info.value.code) == (400, "missing_image")
    assert "'file'" in info.value.detail

    with pytest.raises(RequestError) as info:
        asyncio.run(image_from_multipart(b"--nope\r\nbroken", "multipart/form-data"))
    assert info.value.status == 400


def test_heatmap_round_trip_at_upload_size():
    anomaly = torch.linspace(0, 1, SIZE * SIZE).view(SIZE, SIZE)
    image = decode_heatmap(heatmap_base64(anomaly, 300, 200))
    assert image.size == (300, 200) and image.mode == "RGB"
    # absolute colour scale: the top-left (0) is dark blue, the bottom-right (1) red
    assert image.getpixel((0, 0))[2] > 60 and image.getpixel((299, 199))[0] > 200


# ---------------------------------------------------------------------------- builder args
def test_builder_args_are_parsed_from_strings():
    s = parse_build_args(
        {
            "max_batch_size": "4",
            "batch_wait_timeout_s": "0.05",
            "max_replicas": "3",
            "target_ongoing_requests": "6",
            "num_gpus": "0.5",
            "max_body_mb": "1.5",
            "max_megapixels": "2",
            "autoscaling_config": '{"upscale_delay_s": 5}',
            "precision": "BF16",
            "compile": "yes",
        }
    )
    assert s.max_batch_size == 4 and s.batch_wait_timeout_s == 0.05
    assert s.precision == "bf16" and s.compile is True
    assert s.limits == Limits(max_bytes=int(1.5 * 2**20), max_pixels=2_000_000)
    opts = s.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 6,
        "upscale_delay_s": 5,
    }
    assert opts["max_ongoing_requests"] >= 4 and "num_replicas" not in opts


def test_builder_defaults():
    defaults = parse_build_args({})
    assert defaults.precision == "auto" and defaults.compile is False
    assert parse_build_args({"compile": False, "precision": "fp32"}).compile is False
    opts = defaults.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 1.0}  # no GPU asked for by default
    assert opts["max_ongoing_requests"] >= ServeSettings().max_batch_size
    assert opts["autoscaling_config"]["min_replicas"] == 1
    fixed = parse_build_args({"num_replicas": 2}).deployment_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed


def test_builder_rejects_unknown_keys_listing_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        parse_build_args({"max_replica": "3"})
    message = str(info.value)
    assert "'max_replica'" in message and "did you mean 'max_replicas'" in message
    for key in BUILD_ARGS:
        assert key in message


@pytest.mark.parametrize(
    "args,fragment",
    [
        ({"max_batch_size": "eight"}, "max_batch_size must be an integer"),
        ({"max_batch_size": "0"}, "max_batch_size must be >= 1"),
        ({"max_batch_size": True}, "must be an integer"),
        ({"batch_wait_timeout_s": "-1"}, "batch_wait_timeout_s must be >= 0"),
        ({"num_gpus": "many"}, "num_gpus must be a number"),
        ({"max_body_mb": "0"}, "max_body_mb must be > 0"),
        ({"max_megapixels": "nan"}, "must be finite"),
        ({"max_queued_requests": "0"}, "max_queued_requests"),
        ({"max_batch_size": 8, "max_ongoing_requests": 4}, "must be >= max_batch_size"),
        ({"num_replicas": 2, "max_replicas": 4}, "cannot be combined"),
        ({"min_replicas": 3, "max_replicas": 2}, "autoscaling"),
        ({"autoscaling_config": "[1, 2]"}, "must be a mapping"),
        ({"autoscaling_config": "{not json"}, "JSON object"),
        ({"max_replicas": 4, "autoscaling_config": {"max_replicas": 5}}, "different values"),
        ({"precision": "int8"}, "precision must be one of auto, fp32, bf16, fp16"),
        ({"precision": 16}, "precision must be one of"),
        ({"compile": "maybe"}, "compile must be true or false"),
        ({"compile": 1}, "compile must be true or false"),
    ],
)
def test_builder_rejects_bad_values(args, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        parse_build_args(args)
    assert fragment in str(info.value)


def test_max_ongoing_requests_follows_batch_size():
    assert parse_build_args({"max_batch_size": 32}).effective_max_ongoing_requests == 64
    assert parse_build_args({"max_batch_size": 4, "max_ongoing_requests": 4})


def test_only_min_replicas_raises_max_to_fit():
    auto = parse_build_args({"min_replicas": 3}).effective_autoscaling()
    assert auto["min_replicas"] == 3 and auto["max_replicas"] == 3


# ---------------------------------------------------------------------------- autoscaling keys
def test_misspelt_autoscaling_key_is_an_error():
    from ray.serve.config import AutoscalingConfig

    # Ray itself ignores it: that is why we check
    assert AutoscalingConfig(min_replica=5).min_replicas == 1
    with pytest.raises(ConfigError) as info:
        validate_autoscaling({"min_replica": 5})
    assert "'min_replica'" in str(info.value) and "did you mean 'min_replicas'" in str(info.value)
    assert "target_ongoing_requests" in str(info.value)  # valid keys listed
    with pytest.raises(ConfigError, match="unknown autoscaling key"):
        parse_build_args({"autoscaling_config": {"target_num_ongoing_requests_per_replica": 2}})


def test_autoscaling_values_are_checked_by_ray():
    assert validate_autoscaling({"min_replicas": 0, "max_replicas": 4, "upscale_delay_s": 3})
    with pytest.raises(ConfigError, match="invalid autoscaling config"):
        validate_autoscaling({"min_replicas": 5, "max_replicas": 2})


# ---------------------------------------------------------------------------- serve/config.yaml
def test_config_yaml_passes_rays_schema_and_our_checks():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host and schema.http_options.request_timeout_s
    (app,) = schema.applications
    assert app.import_path == "serve.app:build"
    settings = parse_build_args(app.args)  # every arg known, typed and consistent
    assert settings.effective_autoscaling() is not None
    for dep in app.deployments:
        if dep.get("autoscaling_config"):
            validate_autoscaling(dep["autoscaling_config"])


# ---------------------------------------------------------------------------- builder
def test_build_without_any_checkpoint_says_how_to_get_one(tmp_path, monkeypatch):
    from serve.app import build

    monkeypatch.delenv("LARP_CHECKPOINT", raising=False)
    monkeypatch.setenv("LARP_CHAMPION_FILE", str(tmp_path / "none.json"))
    with pytest.raises(CheckpointError) as info:
        build({})
    message = str(info.value)
    assert "checkpoint=" in message and "LARP_CHECKPOINT" in message and "sweep" in message
    with pytest.raises(CheckpointError, match="not found"):
        build({"checkpoint": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="unknown argument"):
        build({"checkpiont": "x"})


def test_build_resolves_the_checkpoint_from_arg_and_env(tmp_path, monkeypatch, backbone):
    from ray.serve import Application

    from larp import LaRPCLIP, save_checkpoint
    from serve.app import build

    ckpt = save_checkpoint(LaRPCLIP(backbone.config, backbone=backbone), tmp_path / "ck")
    assert isinstance(build({"checkpoint": str(ckpt), "max_batch_size": "4"}), Application)
    monkeypatch.setenv("LARP_CHECKPOINT", str(ckpt))
    assert isinstance(build({}), Application)
