"""The frozen open_clip backbone: feature-layer patch tokens, the V-V path, the global feature and
a text pass that accepts learned prompt embeddings and injected text-layer tokens.

The backbone is a pure function of the image and never trains, which is what lets the feature
cache (`larp.cache`) and a sweep share one forward pass across epochs and trials. The vision pass
is written out block by block (instead of calling `encode_image`) so the original and the V-V
paths share one `in_proj` per block: the V-V path then costs one extra attention and `out_proj`,
not a second tower.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from larp.config import LaRPConfig
from larp.errors import BackboneError, ConfigError, InputError

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make LaRP's own open_clip model names (e.g. `larp-tiny-random`) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass
class BackboneFeatures:
    """What the frozen backbone gives the trainable head: all LaRP needs from an image.

    `patch_tokens` is `[B, L, N, D]` (projected, not normalised) for the L feature layers and
    `global_feature` is `[B, D]`, equal to open_clip's `encode_image`.
    """

    patch_tokens: torch.Tensor
    global_feature: torch.Tensor

    def to(self, *args, **kwargs) -> BackboneFeatures:
        return BackboneFeatures(
            self.patch_tokens.to(*args, **kwargs), self.global_feature.to(*args, **kwargs)
        )


def _resolve_weights(config: LaRPConfig) -> str | None:
    """Turn `config.pretrained` into something open_clip's `create_model` accepts, or explain."""
    pretrained = config.pretrained
    if pretrained is None:
        return None
    from larp.zoo import shipped_weights_path  # local import: zoo imports this module

    shipped = shipped_weights_path(config.backbone, pretrained)
    if shipped is not None:
        return str(shipped)
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    if any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith(
        (".safetensors", ".bin", ".pt", ".pth")
    ):
        raise BackboneError(f"backbone weights file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(config.backbone)
    if pretrained not in tags:
        raise BackboneError(
            f"open_clip has no pretrained tag {pretrained!r} for {config.backbone!r}; "
            f"known tags: {tags or 'none'}. Pass a local weights file path instead."
        )
    return pretrained


def create_clip(config: LaRPConfig) -> nn.Module:
    """Build the open_clip CLIP named by the config, frozen and in eval mode.

    A random initialisation (`pretrained=None`) is seeded by `backbone_seed`, so two processes
    building the same config get the same backbone and the same weights checksum.
    """
    register_model_configs()
    if config.backbone not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model {config.backbone!r} (see open_clip.list_models())"
        )
    weights = _resolve_weights(config)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.backbone_seed)
            clip = open_clip.create_model(
                config.backbone,
                pretrained=weights,
                force_image_size=config.image_size,
            )
    except BackboneError:
        raise
    except Exception as exc:  # download failures, bad files, shape mismatches
        raise BackboneError(
            f"could not build {config.backbone!r} with weights {config.pretrained!r}: {exc}. "
            "Weights cannot be downloaded on offline machines: pass a local file as `pretrained`."
        ) from exc
    if not isinstance(clip, open_clip.CLIP) or not hasattr(clip.visual, "transformer"):
        raise BackboneError(
            f"{config.backbone!r} is not a plain open_clip ViT CLIP; LaRP needs its blocks"
        )
    if getattr(clip.visual, "attn_pool", None) is not None:
        raise BackboneError(f"{config.backbone!r} uses attentional pooling, which LaRP does not")
    clip.eval()
    for param in clip.parameters():
        param.requires_grad_(False)
    return clip


def state_checksum(module: nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, dtypes, bytes), in name order.

    Used as the backbone's identity in checkpoints and cache keys: it holds for random, tagged
    and file weights alike, and changes with any weight.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, w = x.shape
    return x.view(b, t, heads, w // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _vision_block(
    block: nn.Module, x: torch.Tensor, vv: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One open_clip `ResidualAttentionBlock`, plus the V-V residual when `vv` is given.

    Equal to `block(x)`; the V-V branch reuses the block's own value projection of `ln_1(x)`.
    """
    attn: nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (_split_heads(part, heads) for part in qkv.chunk(3, dim=-1))
    out = attn.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
    x_out = x + block.ls_1(out)
    x_out = x_out + block.ls_2(block.mlp(block.ln_2(x_out)))
    if vv is not None:
        vv_out = attn.out_proj(_merge_heads(F.scaled_dot_product_attention(v, v, v)))
        vv = vv + block.ls_1(vv_out)
    return x_out, vv


class FrozenBackbone(nn.Module):
    """An open_clip CLIP that only ever runs forward; the identity of LaRP's frozen half."""

    def __init__(self, config: LaRPConfig, clip: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else create_clip(config)
        visual = self.clip.visual
        self.num_vision_layers = len(visual.transformer.resblocks)
        self.patch_size = int(visual.conv1.kernel_size[0])
        if config.image_size % self.patch_size:
            raise BackboneError(
                f"image_size {config.image_size} is not a multiple of the patch size "
                f"{self.patch_size} of {config.backbone!r}"
            )
        self.grid_size = config.image_size // self.patch_size
        bad = [layer for layer in config.feature_layers if layer > self.num_vision_layers]
        if bad:
            raise BackboneError(
                f"feature_layers {bad} exceed the {self.num_vision_layers} vision layers of "
                f"{config.backbone!r}"
            )
        if config.vv_from_layer is not None and config.vv_from_layer > self.num_vision_layers:
            raise BackboneError(
                f"vv_from_layer {config.vv_from_layer} exceeds the {self.num_vision_layers} "
                f"vision layers of {config.backbone!r}"
            )
        text_layers = len(self.clip.transformer.resblocks)
        if config.prompt_depth > text_layers:
            raise BackboneError(
                f"prompt_depth {config.prompt_depth} exceeds the {text_layers} text layers of "
                f"{config.backbone!r}"
            )
        self.embed_dim = int(visual.proj.shape[1])
        self.text_width = int(self.clip.token_embedding.weight.shape[1])
        self._checksum: str | None = None
        self._compiled_vision = None  # set by compile_vision()

    # ------------------------------------------------------------------ identity
    @property
    def weights_checksum(self) -> str:
        if self._checksum is None:
            self._checksum = state_checksum(self.clip)
        return self._checksum

    def identity(self) -> dict:
        """What a checkpoint or cache entry must agree with to be used with this backbone."""
        return {
            "name": self.config.backbone,
            "pretrained": self.config.pretrained,
            "image_size": self.config.image_size,
            "weights_sha256": self.weights_checksum,
        }

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Stay in eval mode whatever the parent does: the backbone is never trained."""
        return super().train(False)

    # ------------------------------------------------------------------ vision
    def check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise InputError(
                f"images must be a float tensor (normalised as OpenAI CLIP), got {images.dtype}"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        size = self.config.image_size
        if h % self.patch_size or w % self.patch_size:
            raise InputError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}"
            )
        if (h, w) != (size, size):
            raise InputError(
                f"image size {h}x{w} does not match the model's input size {size}x{size}; "
                "resize with larp.data.load_image or build the model with that image_size"
            )

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> BackboneFeatures:
        """Feature-layer patch tokens and the global feature of a batch of images."""
        self.check_images(images)
        run = self._compiled_vision or self._vision_pass
        patch_tokens, global_feature = run(images)
        return BackboneFeatures(patch_tokens.clone(), global_feature)

    def _vision_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.clip.visual
        cfg = self.config
        dtype = visual.conv1.weight.dtype
        x = visual._embeds(images.to(dtype))
        wanted = set(cfg.feature_layers)
        vv_from = cfg.vv_from_layer
        vv: torch.Tensor | None = None
        taken: list[torch.Tensor] = []
        for index, block in enumerate(visual.transformer.resblocks):
            layer = index + 1
            if vv_from is not None and layer == vv_from:
                vv = x
            x, vv = _vision_block(block, x, vv)
            if layer in wanted:
                source = vv if vv is not None else x
                taken.append(source[:, 1:])
        tokens = torch.stack(taken, dim=1)  # [B, L, N, W]
        patch_tokens = visual.ln_post(tokens) @ visual.proj
        pooled, _ = visual._pool(x)
        return patch_tokens, pooled @ visual.proj

    def compile_vision(self, mode: str | None = None) -> FrozenBackbone:
        """Run the vision pass through `torch.compile` from now on (optional fast path).

        Worth it on a GPU serving or evaluating many batches of one shape: the first batch of
        each new shape pays the compilation (seconds to a minute), later ones run fused kernels.
        Results equal the eager pass within float tolerance (tests/test_fast_path.py). `mode` is
        `torch.compile`'s ("default", "reduce-overhead", "max-autotune").
        """
        modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if mode not in modes:
            raise ConfigError(f"compile mode must be one of {modes[1:]}; got {mode!r}")
        self._compiled_vision = torch.compile(self._vision_pass, mode=mode, dynamic=False)
        return self

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return open_clip.get_tokenizer(self.config.backbone)(texts)

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.clip.token_embedding(token_ids)

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        eot_index: torch.Tensor,
        deep_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text tower on given token embeddings `[S, T, W]`, with optional text-layer tokens.

        `deep_tokens` `[S, depth-1, n, W]` overwrite hidden positions `1..n` before text blocks
        `1..depth-1` (0-based), as AnomalyCLIP's compound prompts do. Gradients flow to
        `embeddings` and `deep_tokens`; the tower itself stays frozen. Returns unnormalised
        projected features `[S, D]`.
        """
        clip = self.clip
        # Causal attention: nothing after the last EOT token can reach an EOT output, so the
        # padding (77 - ~20 positions for LaRP's templates) is cut off. Same result, ~4x less work.
        length = int(eot_index.max()) + 1
        embeddings = embeddings[:, :length]
        x = embeddings + clip.positional_embedding[:length].to(embeddings.dtype)
        attn_mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        depth = 0 if deep_tokens is None else deep_tokens.shape[1]
        for index, block in enumerate(clip.transformer.resblocks):
            if 1 <= index <= depth:
                inject = deep_tokens[:, index - 1]
                x = torch.cat([x[:, :1], inject, x[:, 1 + inject.shape[1] :]], dim=1)
            x = block(x, attn_mask=attn_mask)
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return pooled @ clip.text_projection
