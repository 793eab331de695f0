"""End to end: the detection endpoint on a real Ray Serve, on 127.0.0.1, in its own Ray.

One Serve instance for the module (a tiny random checkpoint, one replica, batches of up to 4,
low input limits so the 413s are cheap). Scores are compared with what `larp predict` computes
(`load_checkpoint(dir).predict(pil_to_tensor(img, size)[None])`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: bind 127.0.0.1

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

from larp import LaRPCLIP, LaRPConfig, load_checkpoint, save_checkpoint  # noqa: E402
from larp.data.transforms import pil_to_tensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow

MAX_BATCH = 4
READY_TIMEOUT_S = 120
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _picture(seed: int, width: int = 80, height: int = 60) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, checkpoint_dir, checkpoint_id); Ray and Serve torn down afterwards."""
    import ray
    from ray import serve

    from serve.app import build

    tmp = tmp_path_factory.mktemp("serve")
    ckpt = save_checkpoint(LaRPCLIP(LaRPConfig.tiny_random()), tmp / "ckpt", threshold=0.5)
    ray_dir = tempfile.mkdtemp(prefix="larp-ray-")  # short: Ray's socket paths have a limit
    port = _free_port()
    # for `serve.app:deployment` (no args): replicas inherit the environment Ray starts with
    old_env = os.environ.get("LARP_CHECKPOINT")
    os.environ["LARP_CHECKPOINT"] = str(ckpt)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_dir)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build(
            {
                "checkpoint": str(ckpt),
                "num_replicas": 1,
                "max_batch_size": MAX_BATCH,
                "batch_wait_timeout_s": 0.05,
                "max_ongoing_requests": 8,
                "max_queued_requests": 8,
                "max_body_mb": 1,
                "max_megapixels": 1,
                "decode_threads": 2,
            }
        )
        serve.run(app, name="larp", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base + "/healthz")
        yield base, ckpt, load_checkpoint(ckpt).manifest["checkpoint_id"]
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)
            if old_env is None:
                os.environ.pop("LARP_CHECKPOINT", None)
            else:
                os.environ["LARP_CHECKPOINT"] = old_env


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {READY_TIMEOUT_S}s (last: {last!r})")


@pytest.fixture(scope="module")
def reference(server):
    """What `larp predict` computes for an image: the same checkpoint, the same transform."""
    _, ckpt, _ = server
    model = load_checkpoint(ckpt)
    size = model.config.image_size

    def predict(img: Image.Image) -> dict[str, float]:
        result = model.predict(pil_to_tensor(img, size)[None])
        return {k: float(getattr(result, k)[0]) for k in ("score", "text_score", "map_score")}

    return predict


def _close(got: dict, want: dict) -> None:
    for key in ("score", "text_score", "map_score"):
        assert got[key] == pytest.approx(want[key], abs=TOL), key


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    assert body["detail"]
    return body


# ---------------------------------------------------------------------------- tests
def test_healthz_and_info_report_the_checkpoint(server):
    base, ckpt, checkpoint_id = server
    health = httpx.get(base + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["checkpoint_id"] == checkpoint_id
    info = httpx.get(base + "/info", timeout=10).json()
    assert info["checkpoint_id"] == checkpoint_id
    assert info["checkpoint_path"] == str(Path(ckpt).resolve())
    assert info["threshold"] == 0.5 and info["threshold_source"] == "manifest"
    assert info["config"]["image_size"] == 112 and "metrics" in info
    assert info["serving"]["max_batch_size"] == MAX_BATCH


def test_same_score_as_larp_predict(server, reference):
    base, _, checkpoint_id = server
    img = _picture(0)
    want = reference(img)
    with httpx.Client(base_url=base, timeout=30) as client:
        raw = client.post("/detect", content=_png(img))
        assert raw.status_code == 200, raw.text
        body = raw.json()
        _close(body, want)
        assert body["label"] == ("anomalous" if body["score"] >= 0.5 else "normal")
        assert (body["width"], body["height"]) == (80, 60)
        assert body["threshold"] == 0.5 and body["checkpoint_id"] == checkpoint_id
        assert "anomaly_map" not in body

        form = client.post("/detect", files={"image": ("x.png", _png(img), "image/png")})
        _close(form.json(), want)

        with_map = client.post("/detect", params={"map": "png"}, content=_png(img)).json()
        _close(with_map, want)
        heat = Image.open(io.BytesIO(base64.b64decode(with_map["anomaly_map"])))
        assert heat.format == "PNG" and heat.size == (80, 60)


def test_batched_requests_equal_sequential_ones(server):
    base, _, _ = server
    images = [_png(_picture(seed, 64 + seed, 48)) for seed in range(1, 9)]
    with httpx.Client(base_url=base, timeout=30) as client:
        sequential = [client.post("/detect", content=data).json() for data in images]
        before = client.get("/info").json()["replica_stats"]

    async def burst():
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await asyncio.gather(*(client.post("/detect", content=d) for d in images))

    concurrent = [r.json() for r in asyncio.run(burst())]
    for seq, con in zip(sequential, concurrent, strict=True):
        _close(con, seq)
        assert (con["width"], con["height"]) == (seq["width"], seq["height"])
    after = httpx.get(base + "/info", timeout=10).json()["replica_stats"]
    assert after["images"] - before["images"] == len(images)
    assert after["batches"] - before["batches"] < len(images)  # some requests shared a batch
    assert max(int(k) for k in after["batch_sizes"]) <= MAX_BATCH


def _gif() -> bytes:
    buf = io.BytesIO()
    _picture(3).convert("P").save(buf, format="GIF")
    return buf.getvalue()


BAD_INPUTS = [
    ("empty", {"content": b""}, 400, "empty_body"),
    ("garbage", {"content": bytes(range(256)) * 8}, 400, "undecodable_image"),
    ("truncated", {"content": _png(_picture(4))[:300]}, 400, "undecodable_image"),
    ("text", {"content": b"definitely not an image"}, 415, "unsupported_media_type"),
    ("gif", {"content": _gif()}, 415, "unsupported_media_type"),
    ("too-many-bytes", {"content": b"\x89PNG" + bytes(2**20)}, 413, "body_too_large"),
    ("too-many-pixels", {"content": _png(Image.new("1", (2000, 1000)))}, 413, "too_many_pixels"),
    ("map=jpg", {"content": b"x", "params": {"map": "jpg"}}, 422, "invalid_parameter"),
    ("unknown-param", {"content": b"x", "params": {"mpa": "png"}}, 422, "invalid_parameter"),
    (
        "multipart-no-image",
        {"files": {"file": ("x.png", b"abc", "image/png")}},
        400,
        "missing_image",
    ),
]


@pytest.mark.parametrize(
    "name,request_kwargs,status,code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_its_status_and_json(server, name, request_kwargs, status, code):
    base, _, _ = server
    r = httpx.post(base + "/detect", timeout=30, **request_kwargs)
    _error(r, status, code)


def test_unknown_route_is_json_too(server):
    base, _, _ = server
    _error(httpx.get(base + "/nope", timeout=10), 404, "not_found")
    _error(httpx.get(base + "/detect", timeout=10), 405, "method_not_allowed")


def test_bounded_burst_no_5xx_but_503_and_replica_survives(server):
    base, _, checkpoint_id = server
    good = [_png(_picture(seed)) for seed in range(10, 14)]
    bad = [b"", b"garbage" * 50, _gif()]
    payloads = [(good + bad)[i % 7] for i in range(40)]
    statuses: list[int] = []

    async def run(concurrency: int, items: list[bytes]) -> None:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def one(data: bytes) -> None:
                async with gate:
                    r = await client.post("/detect", content=data)
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        assert r.status_code == 503 or "error" in r.json(), r.text

            await asyncio.wait_for(asyncio.gather(*(one(d) for d in items)), timeout=60)

    started = time.monotonic()
    asyncio.run(run(8, payloads))  # 40 requests, 8 in flight
    asyncio.run(run(32, [good[0]] * 32))  # a flood past max_ongoing + max_queued (8 + 8)
    assert time.monotonic() - started < 90
    print("burst statuses:", {s: statuses.count(s) for s in sorted(set(statuses))})
    assert len(statuses) == 72
    server_errors = sorted({s for s in statuses if s >= 500 and s != 503})
    assert not server_errors, statuses
    assert set(statuses) <= {200, 400, 415, 503}
    assert statuses.count(200) >= 20
    health = httpx.get(base + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["checkpoint_id"] == checkpoint_id
    assert httpx.post(base + "/detect", content=good[0], timeout=30).status_code == 200


def test_module_level_deployment_serves_larp_checkpoint(server):
    """`serve run serve.app:deployment`: no arguments, the checkpoint from LARP_CHECKPOINT."""
    from ray import serve

    from serve.app import deployment

    base, _, checkpoint_id = server
    serve.run(deployment, name="plain", route_prefix="/plain", blocking=False)
    try:
        _wait_ready(base + "/plain/healthz")
        assert httpx.get(base + "/plain/info", timeout=10).json()["checkpoint_id"] == checkpoint_id
        r = httpx.post(base + "/plain/detect", content=_png(_picture(0)), timeout=30)
        assert r.status_code == 200 and r.json()["checkpoint_id"] == checkpoint_id
    finally:
        serve.delete("plain")
