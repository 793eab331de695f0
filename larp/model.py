"""`LaRPCLIP`: the frozen backbone, the prompt learner and the two branches, composed.

The model is split where the gradient stops: `backbone.extract` (frozen, cacheable) gives
`BackboneFeatures`, and `forward_features` (trainable) turns them into maps and scores. Training
from the feature cache therefore runs exactly the same head code as training from images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
from torch import nn

from larp.backbone import BackboneFeatures, FrozenBackbone
from larp.config import LaRPConfig
from larp.errors import ConfigError
from larp.pixel import LayerFusion, Refiner, gaussian_blur, layer_maps, upsample
from larp.prompts import PromptLearner
from larp.prototype import image_scores, prototype_deviation, text_score


@dataclass
class LaRPOutput:
    """The differentiable head outputs at the patch grid (what the losses need)."""

    layer_maps: torch.Tensor  # [B, L, h, w]
    fused_map: torch.Tensor  # [B, h, w]
    error_prior: torch.Tensor  # [B, h, w]
    final_map: torch.Tensor  # [B, h, w]
    text_score: torch.Tensor  # [B]


@dataclass
class LaRPResult:
    """What inference returns for a batch: maps at the patch grid and input size, and scores.

    `q` (mean layer map) and `prototype_deviation` (μ, None when the branch is off) are kept so
    any other (λ, top-k) can be scored from a stored result without running the model.
    """

    layer_maps: torch.Tensor  # [B, L, h, w]
    fused_map: torch.Tensor  # [B, h, w]
    error_prior: torch.Tensor  # [B, h, w]
    final_map: torch.Tensor  # [B, h, w] patch grid
    anomaly_map: torch.Tensor  # [B, H, W] input size (blurred at evaluation)
    q: torch.Tensor  # [B, h, w]
    prototype_deviation: torch.Tensor | None  # [B, h, w]
    text_score: torch.Tensor  # [B]
    map_score: torch.Tensor  # [B]
    score: torch.Tensor  # [B]
    lam: float
    top_k: int

    def labels(self, threshold: float) -> torch.Tensor:
        """1 where the image score reaches the decision threshold."""
        return (self.score >= threshold).long()

    def __getitem__(self, index: int) -> LaRPResult:
        """The result of one image of the batch, keeping the batch dimension."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            is_tensor = isinstance(value, torch.Tensor)
            values[f.name] = value[index : index + 1] if is_tensor else value
        return LaRPResult(**values)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def backbone_autocast(device_type: str, precision: str = "auto"):
    """The autocast context for the backbone forward of the fast inference path."""
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}"
        )
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


class LaRPCLIP(nn.Module):
    """LaRP-CLIP (paper §3). Build with a config; share a `FrozenBackbone` between models to
    avoid loading the same weights twice (a sweep does)."""

    def __init__(self, config: LaRPConfig, backbone: FrozenBackbone | None = None) -> None:
        super().__init__()
        if backbone is not None:
            self._check_shared_backbone(config, backbone)
        self.config = config
        self.backbone = backbone if backbone is not None else FrozenBackbone(config)
        self.prompt_learner = PromptLearner(config, self.backbone)
        self.fusion = LayerFusion(config.num_layers, adaptive=config.adaptive_fusion)
        self.refiner = Refiner(config.refiner_hidden) if config.refiner else None
        # which prompt group each feature layer reads: 0 global, 1 shallow, 2 deep
        groups = [
            (1 if layer in config.shallow_layers else 2) if config.decouple_prompts else 0
            for layer in config.feature_layers
        ]
        self.register_buffer("layer_group", torch.tensor(groups), persistent=False)
        self._text_cache: torch.Tensor | None = None

    @staticmethod
    def _check_shared_backbone(mine: LaRPConfig, backbone: FrozenBackbone) -> None:
        theirs = backbone.config
        for key in ("backbone", "pretrained", "backbone_seed", "image_size"):
            if getattr(mine, key) != getattr(theirs, key):
                raise ConfigError(
                    f"shared backbone differs in {key}: {getattr(theirs, key)!r} vs "
                    f"{getattr(mine, key)!r}"
                )
        for key in ("feature_layers", "vv_from_layer"):
            if getattr(mine, key) != getattr(theirs, key):
                raise ConfigError(f"shared backbone extracts other features ({key} differs)")

    # ------------------------------------------------------------------ state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The only weights LaRP learns (prompts, α, ψ): what a checkpoint stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def train(self, mode: bool = True) -> LaRPCLIP:
        self._text_cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._text_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .double() etc.: the cached text embeddings would keep the old device/dtype
        self._text_cache = None
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ text side
    def text_embeddings(self) -> torch.Tensor:
        """`[G, 2, D]` unit text embeddings; computed once and reused while in eval mode."""
        if self.training or torch.is_grad_enabled():
            self._text_cache = None
            return self.prompt_learner(self.backbone)
        if self._text_cache is None:
            self._text_cache = self.prompt_learner(self.backbone).detach()
        return self._text_cache

    # ------------------------------------------------------------------ head
    def forward_features(
        self, features: BackboneFeatures, text: torch.Tensor | None = None
    ) -> LaRPOutput:
        """The trainable head on backbone features (from images or from the cache)."""
        text = self.text_embeddings() if text is None else text
        patch_tokens = features.patch_tokens.to(text.dtype)
        maps = layer_maps(patch_tokens, text[self.layer_group], self.config.temperature)
        fused, prior = self.fusion(maps)
        final = self.refiner(fused, prior) if self.refiner is not None else fused
        s_text = text_score(
            features.global_feature.to(text.dtype), text[0], self.config.temperature
        )
        return LaRPOutput(maps, fused, prior, final, s_text)

    def forward(self, images: torch.Tensor) -> LaRPOutput:
        return self.forward_features(self.backbone.extract(images))

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(
        self,
        images: torch.Tensor,
        lam: float | None = None,
        top_k: int | None = None,
        blur: bool = True,
        precision: str = "auto",
    ) -> LaRPResult:
        """Anomaly maps and scores for a batch of preprocessed images `[B, 3, S, S]`.

        `precision` applies to the frozen backbone only ("fp32", "bf16", "fp16"; "auto" is bf16
        on CUDA, fp32 elsewhere): the head, the softmaxes, the prototype and the scores always
        run in fp32, where a reduced precision would move scores and ranks.
        """
        if self.training:
            self.eval()
        lam = self.config.lam if lam is None else float(lam)
        top_k = self.config.top_k if top_k is None else int(top_k)
        if lam < 0:
            raise ConfigError(f"lam (λ) must be >= 0; got {lam}")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1; got {top_k}")
        with backbone_autocast(images.device.type, precision):
            features = self.backbone.extract(images)
        features = features.to(torch.float32)
        return self.predict_features(features, lam, top_k, blur, size=images.shape[-1])

    @torch.inference_mode()
    def predict_features(
        self,
        features: BackboneFeatures,
        lam: float,
        top_k: int,
        blur: bool = True,
        size: int | None = None,
    ) -> LaRPResult:
        out = self.forward_features(features)
        q = out.layer_maps.mean(dim=1)
        deviation = None
        if self.config.prototype:
            last = features.patch_tokens[:, -1].float()
            deviation = prototype_deviation(
                q.flatten(1), last, self.config.normal_quantile
            ).view_as(q)
        s_map, score = image_scores(out.text_score, q, deviation, lam, top_k)
        anomaly = upsample(out.final_map, size or self.config.image_size)
        if blur:
            anomaly = gaussian_blur(anomaly, self.config.blur_sigma)
        return LaRPResult(
            layer_maps=out.layer_maps,
            fused_map=out.fused_map,
            error_prior=out.error_prior,
            final_map=out.final_map,
            anomaly_map=anomaly,
            q=q,
            prototype_deviation=deviation,
            text_score=out.text_score,
            map_score=s_map,
            score=score,
            lam=lam,
            top_k=top_k,
        )
