"""Builder arguments of the detection endpoint: parsed, typed and checked before Ray sees them.

`serve run serve.app:build key=value ...` passes every value as a string and a `serve deploy`
config passes YAML types; both go through `parse_build_args`. Unknown keys are errors (with the
valid ones listed), and so are unknown autoscaling keys: Ray's `AutoscalingConfig` ignores a
misspelt key silently, which would leave a deployment that never scales the way it was asked to.
Ray itself is imported only to read `AutoscalingConfig`'s fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from larp.config import PRECISION_CHOICES
from larp.errors import ConfigError

from .http import MB, Limits

# Autoscaling keys that may also be given at the top level of the builder args.
AUTOSCALING_SHORTCUTS = ("min_replicas", "max_replicas", "target_ongoing_requests")
DEFAULT_MIN_REPLICAS = 1
DEFAULT_MAX_REPLICAS = 2


@dataclass(frozen=True)
class ServeSettings:
    """Everything the builder accepts (see `build` in `serve/app.py` for the meaning)."""

    checkpoint: str | None = None
    # replicas: a fixed count, or autoscaling between min and max
    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    autoscaling_config: dict[str, Any] | None = None
    # batching and load shedding
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64
    request_timeout_s: float = 30.0
    # resources per replica
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    decode_threads: int = 2
    # model: backbone precision ("auto": bf16 on CUDA, fp32 on CPU; the head stays fp32) and
    # torch.compile of the vision pass (worth it on GPUs; the first batch of each size compiles)
    precision: str = "auto"
    compile: bool = False
    # input limits
    max_body_mb: float = 20.0
    max_megapixels: float = 40.0

    # ------------------------------------------------------------------ derived
    @property
    def effective_max_ongoing_requests(self) -> int:
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return max(16, 2 * self.max_batch_size)

    @property
    def limits(self) -> Limits:
        return Limits(
            max_bytes=max(1, int(self.max_body_mb * MB)),
            max_pixels=max(1, int(self.max_megapixels * 1e6)),
        )

    def effective_autoscaling(self) -> dict[str, Any] | None:
        """The autoscaling config Ray gets (None with a fixed `num_replicas`)."""
        if self.num_replicas is not None:
            return None
        merged: dict[str, Any] = {
            "min_replicas": DEFAULT_MIN_REPLICAS,
            "max_replicas": DEFAULT_MAX_REPLICAS,
            "target_ongoing_requests": self.max_batch_size,
        }
        merged.update(self.autoscaling_config or {})
        for key in AUTOSCALING_SHORTCUTS:
            value = getattr(self, key)
            if value is not None:
                merged[key] = value
        if merged["min_replicas"] > merged["max_replicas"] and (
            self.max_replicas is None and "max_replicas" not in (self.autoscaling_config or {})
        ):
            merged["max_replicas"] = merged["min_replicas"]  # only min given: let it fit
        return merged

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `LaRPDetector.options(...)`."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus > 0:
            actor["num_gpus"] = self.num_gpus
        options: dict[str, Any] = {
            "max_ongoing_requests": self.effective_max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
            # a missing or refused checkpoint will not fix itself: fail the deploy quickly
            "max_constructor_retry_count": 3,
        }
        autoscaling = self.effective_autoscaling()
        if autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = autoscaling
        return options

    def public(self) -> dict[str, Any]:
        """The settings as given (for /info and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


BUILD_ARGS = tuple(f.name for f in fields(ServeSettings))


def parse_build_args(args: Mapping[str, Any] | None) -> ServeSettings:
    """Builder args (strings from the CLI or typed values from YAML) -> checked `ServeSettings`."""
    args = dict(args or {})
    unknown = sorted(k for k in args if k not in BUILD_ARGS)
    if unknown:
        raise ConfigError(
            f"unknown argument(s) {', '.join(map(repr, unknown))}{_did_you_mean(unknown, BUILD_ARGS)}"
            f"; valid arguments: {', '.join(BUILD_ARGS)}"
        )
    values: dict[str, Any] = {}
    for name, raw in args.items():
        values[name] = _PARSERS[name](name, raw)
    settings = ServeSettings(**values)
    _check(settings)
    return settings


def _check(s: ServeSettings) -> None:
    _at_least("max_batch_size", s.max_batch_size, 1)
    _at_least("batch_wait_timeout_s", s.batch_wait_timeout_s, 0)
    _at_least("num_cpus", s.num_cpus, 0)
    _at_least("num_gpus", s.num_gpus, 0)
    _at_least("decode_threads", s.decode_threads, 1)
    _positive("max_body_mb", s.max_body_mb)
    _positive("max_megapixels", s.max_megapixels)
    _positive("request_timeout_s", s.request_timeout_s)
    if s.max_queued_requests != -1 and s.max_queued_requests < 1:
        raise ConfigError(
            f"max_queued_requests must be >= 1, or -1 for no limit; got {s.max_queued_requests}"
        )
    if s.max_ongoing_requests is not None and s.max_ongoing_requests < s.max_batch_size:
        raise ConfigError(
            f"max_ongoing_requests ({s.max_ongoing_requests}) must be >= max_batch_size "
            f"({s.max_batch_size}): a replica can never fill a batch larger than the requests it "
            "is allowed to hold"
        )
    autoscaling_given = [k for k in AUTOSCALING_SHORTCUTS if getattr(s, k) is not None]
    if s.autoscaling_config:
        autoscaling_given.append("autoscaling_config")
    if s.num_replicas is not None:
        _at_least("num_replicas", s.num_replicas, 1)
        if autoscaling_given:
            raise ConfigError(
                f"num_replicas fixes the replica count; it cannot be combined with "
                f"{', '.join(autoscaling_given)} (autoscaling). Give one or the other."
            )
        return
    if s.autoscaling_config:
        clash = [
            k
            for k in AUTOSCALING_SHORTCUTS
            if getattr(s, k) is not None
            and k in s.autoscaling_config
            and s.autoscaling_config[k] != getattr(s, k)
        ]
        if clash:
            raise ConfigError(
                f"{', '.join(clash)} given both as an argument and in autoscaling_config with "
                "different values"
            )
    validate_autoscaling(s.effective_autoscaling())


def validate_autoscaling(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check an autoscaling dict against Ray's `AutoscalingConfig`: unknown keys (which Ray would
    ignore) and invalid values are `ConfigError`s. Returns a plain dict copy."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    if not isinstance(config, Mapping):
        raise ConfigError(f"autoscaling_config must be a mapping, got {type(config).__name__}")
    valid = tuple(AutoscalingConfig.model_fields)
    unknown = sorted(k for k in config if k not in valid)
    if unknown:
        raise ConfigError(
            f"unknown autoscaling key(s) {', '.join(map(repr, unknown))}"
            f"{_did_you_mean(unknown, valid)}; Ray would silently ignore them. Valid keys: "
            f"{', '.join(valid)}"
        )
    try:
        AutoscalingConfig(**config)
    except (ValidationError, ValueError, TypeError) as exc:
        raise ConfigError(f"invalid autoscaling config {dict(config)}: {exc}") from exc
    return dict(config)


# ---------------------------------------------------------------------------- value parsers
def _did_you_mean(unknown: list[str], valid: tuple[str, ...]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        if close:
            hints.append(f"{close[0]!r} for {key!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _is_none(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null"))


def _int(name: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"{name} must be an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    raise ConfigError(f"{name} must be an integer, got {raw!r}")


def _float(name: str, raw: Any) -> float:
    if not isinstance(raw, bool) and isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    else:
        raise ConfigError(f"{name} must be a number, got {raw!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {raw!r}")
    return value


def _optional(parse):
    def parse_optional(name: str, raw: Any):
        return None if _is_none(raw) else parse(name, raw)

    return parse_optional


def _str(name: str, raw: Any) -> str | None:
    if _is_none(raw):
        return None
    if not isinstance(raw, str):
        raise ConfigError(f"{name} must be a path string, got {raw!r}")
    return raw


def _choice(*choices: str):
    def parse_choice(name: str, raw: Any) -> str:
        if not isinstance(raw, str) or raw.strip().lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
        return raw.strip().lower()

    return parse_choice


def _bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _number(name: str, raw: Any) -> int | float:
    value = _float(name, raw)
    return int(value) if value.is_integer() else value


def _dict(name: str, raw: Any) -> dict[str, Any] | None:
    if _is_none(raw):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name} must be a mapping (YAML) or a JSON object: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name} must be a mapping, got {raw!r}")
    return dict(raw)


_PARSERS = {
    "checkpoint": _str,
    "num_replicas": _optional(_int),
    "min_replicas": _optional(_int),
    "max_replicas": _optional(_int),
    "target_ongoing_requests": _optional(_number),
    "autoscaling_config": _dict,
    "max_batch_size": _int,
    "batch_wait_timeout_s": _float,
    "max_ongoing_requests": _optional(_int),
    "max_queued_requests": _int,
    "request_timeout_s": _float,
    "num_cpus": _float,
    "num_gpus": _float,
    "decode_threads": _int,
    "precision": _choice(*PRECISION_CHOICES),
    "compile": _bool,
    "max_body_mb": _float,
    "max_megapixels": _float,
}
assert set(_PARSERS) == set(BUILD_ARGS), "every builder argument needs a parser"


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def replace(settings: ServeSettings, **changes: Any) -> ServeSettings:
    return dataclasses.replace(settings, **changes)
