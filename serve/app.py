"""The champion checkpoint as an autoscaled, hardened HTTP detection endpoint on Ray Serve.

    serve run serve.app:deployment                      # LARP_CHECKPOINT, else the champion
    serve run serve.app:build checkpoint=ckpt/ max_batch_size=8 max_replicas=4
    serve deploy serve/config.yaml                      # on a cluster

API (FastAPI ingress):
- `POST /detect[?map=png|none]` — the image as the raw body, or as multipart field `image`.
  200: `score`, `label` (`anomalous` when score >= threshold), `threshold`, `text_score`,
  `map_score`, `width`, `height` (of the upright uploaded image), `checkpoint_id`, and with
  `map=png` `anomaly_map`, a base64 PNG heat map at the image's size.
- `GET /healthz`, `GET /info` (config, checkpoint, threshold and its source, training metrics,
  serving settings, batching counters of the answering replica).
- Errors are `{"error": code, "detail": message}`: 400 empty/undecodable, 413 too many bytes or
  pixels, 415 not PNG/JPEG/BMP/TIFF, 422 bad parameters, 503 timeout. When the deployment's
  queue is full Ray Serve itself answers 503 (plain text, with Retry-After).

A replica loads and verifies the checkpoint once, computes the text embeddings once (eval mode;
`predict` caches them) with a warm-up prediction before it reports healthy, and batches
concurrent requests with `@serve.batch` (*choice*: the decode and the heat-map encoding stay per
request on a small thread pool; only the model call is batched, on one model thread, so the
event loop keeps accepting requests while a batch runs).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in the
# signatures of the ingress methods, which Serve rebuilds (string annotations fail there).

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import larp
from larp.champion import resolve_checkpoint
from larp.checkpoint import load_checkpoint, read_manifest
from larp.data.transforms import pil_to_tensor
from larp.errors import CheckpointError

from .http import (
    ALLOWED_NAMES,
    RequestError,
    decode_request_image,
    error_body,
    heatmap_base64,
    image_from_multipart,
    is_multipart,
    parse_query,
    pixel_cap,
    read_body,
)
from .settings import BUILD_ARGS, ServeSettings, parse_build_args, replace

logger = logging.getLogger("ray.serve")

DEFAULT_THRESHOLD = 0.5
_DEFAULTS = ServeSettings()

api = FastAPI(
    title="LaRP-CLIP anomaly detection",
    version=larp.__version__,
    description="Zero-shot anomaly detection: image score, label and heat map.",
)


# ---------------------------------------------------------------------------- error shape
@api.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return JSONResponse(error_body("invalid_parameter", problems), status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error while answering a request")
    return JSONResponse(
        error_body("internal_error", f"{type(exc).__name__}; the details are in the server log"),
        status_code=500,
    )


# ---------------------------------------------------------------------------- deployment
def _checkpoint_path(explicit: str | None) -> Path:
    """The checkpoint folder to serve (argument, LARP_CHECKPOINT, champion), checked."""
    try:
        path = resolve_checkpoint(explicit).expanduser().resolve()
        read_manifest(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}\nTo serve a checkpoint: `serve run serve.app:build checkpoint=/path/to/ckpt`, "
            "or LARP_CHECKPOINT=/path/to/ckpt serve run serve.app:deployment. A checkpoint is "
            "written by `larp train` or by a sweep (`python tune/sweep.py`, which also records "
            "the champion)."
        ) from exc
    return path


def _finite(value: float) -> float | None:
    """JSON has no NaN/inf: a non-finite score is reported as null."""
    value = float(value)
    return value if math.isfinite(value) else None


@serve.deployment(**_DEFAULTS.deployment_options())
@serve.ingress(api)
class LaRPDetector:
    """One replica: the verified checkpoint, its cached text embeddings and a batch queue."""

    def __init__(self, settings: ServeSettings | dict[str, Any] | None = None) -> None:
        if not isinstance(settings, ServeSettings):
            settings = parse_build_args(settings)
        self.settings = settings
        self.limits = settings.limits
        self.device = self._pick_device(settings.num_gpus)
        self.checkpoint_path = _checkpoint_path(settings.checkpoint)
        self.model = load_checkpoint(self.checkpoint_path, device=self.device)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if settings.compile:
            self.model.backbone.compile_vision()
        manifest = self.model.manifest
        self.manifest = manifest
        self.checkpoint_id = str(manifest.get("checkpoint_id"))
        self.image_size = int(self.model.config.image_size)
        threshold = manifest.get("threshold")
        if isinstance(threshold, (int, float)) and math.isfinite(threshold):
            self.threshold, self.threshold_source = float(threshold), "manifest"
        else:
            self.threshold = DEFAULT_THRESHOLD
            self.threshold_source = (
                f"default: the checkpoint manifest has no decision threshold, so "
                f"{DEFAULT_THRESHOLD} is used; calibrate one (larp eval) for meaningful labels"
            )
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="larp-model")
        self._decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="larp-decode"
        )
        self.infer.set_max_batch_size(settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.stats: dict[str, Any] = {"batches": 0, "images": 0, "batch_sizes": {}}
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (direct construction)
            self.replica_id = "local"
        # warm-up: computes and caches the text embeddings, so the first client is not slower
        blank = pil_to_tensor(Image.new("RGB", (self.image_size, self.image_size)), self.image_size)
        started = time.perf_counter()
        self._run([(blank, True)], count=False)
        logger.info(
            "LaRP replica ready: checkpoint %s (%s) on %s, warm-up %.2fs",
            self.checkpoint_id,
            self.checkpoint_path,
            self.device,
            time.perf_counter() - started,
        )

    @staticmethod
    def _pick_device(num_gpus: float) -> torch.device:
        if num_gpus > 0:
            if torch.cuda.is_available():
                return torch.device("cuda")
            logger.warning("num_gpus=%s but torch sees no CUDA device: running on CPU", num_gpus)
        return torch.device("cpu")

    # ------------------------------------------------------------------ model
    def _run(self, items: list[tuple[torch.Tensor, bool]], count: bool = True) -> list[dict]:
        """One model call on a batch (model thread), at the configured backbone precision."""
        batch = torch.stack([tensor for tensor, _ in items]).to(self.device)
        result = self.model.predict(batch, precision=self.settings.precision)
        score = result.score.float().cpu()
        text_score = result.text_score.float().cpu()
        map_score = result.map_score.float().cpu()
        outputs = []
        for i, (_, want_map) in enumerate(items):
            outputs.append(
                {
                    "score": float(score[i]),
                    "text_score": float(text_score[i]),
                    "map_score": float(map_score[i]),
                    "map": result.anomaly_map[i].float().cpu().numpy() if want_map else None,
                }
            )
        if count:
            self.stats["batches"] += 1
            self.stats["images"] += len(items)
            sizes = self.stats["batch_sizes"]
            sizes[len(items)] = sizes.get(len(items), 0) + 1
        return outputs

    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=0.01)
    async def infer(self, items: list[tuple[torch.Tensor, bool]]) -> list[dict]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_pool, self._run, items)

    async def _detect(self, data: bytes, want_map: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self._decode_pool, decode_request_image, data, self.limits, self.image_size
        )
        out = await self.infer((prepared.tensor, want_map))
        score = out["score"]
        response: dict[str, Any] = {
            "score": _finite(score),
            "label": "anomalous" if score >= self.threshold else "normal",
            "threshold": self.threshold,
            "text_score": _finite(out["text_score"]),
            "map_score": _finite(out["map_score"]),
            "width": prepared.width,
            "height": prepared.height,
            "checkpoint_id": self.checkpoint_id,
        }
        if want_map:
            response["anomaly_map"] = await loop.run_in_executor(
                self._decode_pool, heatmap_base64, out["map"], prepared.width, prepared.height
            )
        return response

    # ------------------------------------------------------------------ HTTP
    @api.post("/detect")
    async def detect(self, request: Request) -> JSONResponse:
        query = parse_query(request.query_params.multi_items())
        content_type = request.headers.get("content-type")
        try:
            body = await read_body(
                request.stream(), request.headers.get("content-length"), self.limits.max_bytes
            )
        except ClientDisconnect:
            return JSONResponse(error_body("client_disconnected", "no body"), status_code=400)
        data = (
            await image_from_multipart(body, content_type) if is_multipart(content_type) else body
        )
        try:
            response = await asyncio.wait_for(
                self._detect(data, query.map == "png"), timeout=self.settings.request_timeout_s
            )
        except asyncio.TimeoutError:
            raise RequestError(
                503,
                "timeout",
                f"the request was not answered within {self.settings.request_timeout_s:g}s "
                "(server overloaded); retry later",
            ) from None
        return JSONResponse(response)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "checkpoint_id": self.checkpoint_id, "device": str(self.device)}

    @api.get("/info")
    async def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_path": str(self.checkpoint_path),
            "created_at": m.get("created_at"),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "metrics": m.get("metrics") or {},
            "training_data": m.get("training_data"),
            "config": m.get("config"),
            "backbone": m.get("backbone"),
            "larp_version": larp.__version__,
            "device": str(self.device),
            "serving": {
                "image_size": self.image_size,
                "formats": list(ALLOWED_NAMES),
                "max_body_bytes": self.limits.max_bytes,
                "max_pixels": pixel_cap(self.limits),
                "max_batch_size": self.settings.max_batch_size,
                "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
                "request_timeout_s": self.settings.request_timeout_s,
                "settings": self.settings.public(),
            },
            "replica_stats": {
                "replica": self.replica_id,
                "batches": self.stats["batches"],
                "images": self.stats["images"],
                "batch_sizes": {str(k): v for k, v in sorted(self.stats["batch_sizes"].items())},
            },
        }

    def check_health(self) -> None:
        """Serve's periodic health check: the model and its text cache must still be there."""
        if self.model is None:
            raise RuntimeError("model not loaded")


# `serve run serve.app:deployment`: the checkpoint from LARP_CHECKPOINT, else the champion, with
# the default settings. It is resolved in the replica, at start-up.
deployment = LaRPDetector.bind()


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder: `serve run serve.app:build key=value ...` or `import_path:
    serve.app:build` with `args:` in a `serve deploy` config.

    Arguments (all optional; unknown keys are an error listing the valid ones):
      checkpoint               checkpoint folder; default LARP_CHECKPOINT, else the champion
      num_replicas             a fixed replica count (disables autoscaling)
      min_replicas, max_replicas, target_ongoing_requests   autoscaling (default 1, 2, and
                               max_batch_size); autoscaling_config: any other keys of Ray's
                               AutoscalingConfig (checked: a misspelt key is an error)
      max_batch_size (8), batch_wait_timeout_s (0.01)       dynamic batching
      max_ongoing_requests     per replica, >= max_batch_size (default max(16, 2*batch))
      max_queued_requests (64) beyond it Ray answers 503; -1 for no limit
      request_timeout_s (30)   decode + queue + model time before a 503 "timeout"
      num_cpus (1), num_gpus (0), decode_threads (2)        per replica
      max_body_mb (20 MiB), max_megapixels (40)             input limits
    The checkpoint is resolved and its manifest checked here, so a bad one fails at once.
    """
    settings = parse_build_args(args)
    settings = replace(settings, checkpoint=str(_checkpoint_path(settings.checkpoint)))
    return LaRPDetector.options(**settings.deployment_options()).bind(settings)


__all__ = ["BUILD_ARGS", "LaRPDetector", "api", "build", "deployment"]
