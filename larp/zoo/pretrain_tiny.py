"""Pretraining recipe of the shipped tiny CLIP (`larp-tiny-synthetic`, tag `synthetic`).

    python -m larp.zoo.pretrain_tiny --out DIR --seed 0 --steps 2400 [--install]

A tiny open_clip CLIP (`larp/model_configs/larp-tiny-synthetic.json`: 112 px, 8 px patches,
14x14 grid, vision 4x128, text 4x64, embed 128) is trained from scratch, contrastively, on
images rendered on the fly from randomly made domains of the SOURCE families only
(`make_domain` over `SOURCE_FAMILIES`): the TARGET families stay unseen, so
`synthetic:source -> synthetic:target` remains a zero-shot transfer for the backbone too.

Why the recipe looks like this (choices, measured on this synthetic world):

* Hard negatives. Every batch holds scenes in pairs: the same scene rendered clean and with a
  defect (`render_sample` draws the scene before the defect, so the two images share every
  pixel outside the mask), captioned alike by `larp.zoo.captions.caption_pair`, the captions
  differing only in the defect clause. Telling the two apart is the only way to lower the
  loss on such a pair, so the global feature must encode defects, not only colours and shapes.
  Every defect kind is drawn, the colour-less hard ones (same-colour scratch, texture change,
  missing or misplaced part, warp) included.
* Global loss: open_clip's `ClipLoss` (symmetric InfoNCE) between pooled image features and
  caption features, learnable logit scale, as CLIP.
* Region losses (still image-text contrastive, on the exact masks the generator gives): every
  patch token is contrasted, two ways, against (a) the clean caption of its scene and the
  defect alone ("a small red stain at the top.", `captions.region_phrase`), and (b) two generic
  texts shared by all images (`GENERIC_TEXTS`, "... flawless object." / "... damaged object.").
  Target: the defect's share of the patch (soft, full at `region_full_share`), both classes
  weighted equally. They act on the patch tokens LaRP reads (`ln_post` + `proj` of every
  layer, on the original path and on the V-V path from `vv_from_layer` on, exactly as
  `larp.backbone` computes them). Without them a contrastively trained ViT's patch tokens carry
  the image's content and localise little; with per-image texts only (a), the defect direction
  differs image by image and is learnt very slowly (measured: region loss still ~0.65 after
  600 steps); the shared texts (b) give one direction for every domain and the words LaRP's
  prompt templates use. Their logit scale is learnt like CLIP's (starting at 1/0.07, LaRP's
  temperature; it is not part of the released weights), and both weigh 3x the CLIP loss: at
  1x the CLIP loss took over the shared tower and the region losses hardly moved.
* Image-level generic loss: the pooled feature against the same two generic texts, labelled
  by the image, which is what LaRP's image score (`s_text`) compares the global feature with.
* Length: 2,400 steps of 8 clean/defective pairs took 927 s (15.5 min) on the 2-core VM this
  was made on (fp32, 2 threads). 3,600 steps lowered the training losses further but transferred
  no better to the target families (bench/bench_demo.py: 84.1 against 85.5 pixel AUROC).
* Deterministic by seed: batch `k` is drawn from `np.random.default_rng([seed, k])`, the model
  is initialised under `torch.manual_seed(seed)`, and nothing else is random. Bit-identical
  reruns need the same thread count and precision (float reductions depend on them).

Outputs in `--out`: `larp-tiny-synthetic.safetensors` (fp16 state dict; open_clip loads it into
the fp32 model, converting on copy) and `larp-tiny-synthetic.json` (the manifest: model config,
recipe and its version, seed, steps, loss curve, sha256 of the weights file, reference outputs
on a fixed input). `--install` copies both into `larp/zoo/weights/`, where
`LaRPConfig(backbone="larp-tiny-synthetic", pretrained="synthetic")` finds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from larp.backbone import _vision_block, register_model_configs
from larp.data.synthetic import (
    DOMAINS,
    GENERATOR_VERSION,
    SOURCE_FAMILIES,
    make_domain,
    render_sample,
)
from larp.data.transforms import pil_to_tensor
from larp.zoo import MODEL_NAME, TAG, WEIGHTS_DIR, file_sha256, manifest_path_for
from larp.zoo.captions import caption_pair, region_phrase

RECIPE_VERSION = 1
WEIGHTS_FILE = f"{MODEL_NAME}.safetensors"
# The fixed input of the stored reference outputs (a TARGET domain: never trained on).
REFERENCE_DOMAIN = "weave_olive"
REFERENCE_SEED = 0
GENERIC_TEXTS = ("a photo of a flawless object.", "a photo of a damaged object.")
REFERENCE_TEXTS = ("a photo of a flawless woven texture.", "a photo of a damaged object.")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines a pretraining run (stored in the manifest)."""

    seed: int = 0
    steps: int = 2400
    pairs_per_batch: int = 8  # a batch holds 2x this many images (clean + defective)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    region_weight: float = 3.0
    region_temperature: float = 0.07  # initial value when learned
    # learn the region logits' scale like CLIP's logit scale (kept out of the released weights):
    # two texts differing in one word start at cosine ~0.98, and at a fixed 1/0.07 the patch
    # tokens then get almost no gradient
    learn_region_scale: bool = True
    region_full_share: float = 0.25  # a patch this much covered by the defect is fully defective
    # what a defect patch is contrasted with: "phrase" (the defect alone, "a red stain at the
    # top.") or "caption" (the whole defect caption of the image)
    region_text: str = "phrase"
    # weight of the same region loss against two generic texts shared by every image
    # (`GENERIC_TEXTS`): one "defect direction" for all domains, learnt far faster than
    # per-image texts alone, and the notion LaRP's prompts ("... damaged object.") build on
    generic_weight: float = 3.0
    # the same two generic texts against the pooled feature, labelled by the image (defective or
    # not): what LaRP's image score compares its global feature with
    global_generic_weight: float = 1.0
    vv_from_layer: int | None = 2
    render_size: int = 128  # rendered like the `synthetic:` sets, then resized to the model input
    precision: str = "fp32"  # or "bf16" (CPU autocast; faster where the CPU supports it)
    model_name: str = MODEL_NAME

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.steps < 1 or self.pairs_per_batch < 1:
            raise ValueError("steps and pairs_per_batch must be >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.region_text not in ("phrase", "caption"):
            raise ValueError(f"region_text must be phrase or caption, got {self.region_text!r}")
        if self.vv_from_layer is not None and self.vv_from_layer < 1:
            raise ValueError("vv_from_layer is 1-based (or None)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


# ---------------------------------------------------------------------------------- data
@dataclass
class Batch:
    images: torch.Tensor  # [2P, 3, S, S] normalised; clean, defective, clean, defective, ...
    region_share: torch.Tensor  # [2P, N] defect share of each patch
    captions: list[str]  # [2P]
    phrases: list[str]  # [P] the defect of pair p alone (region caption)


def _render_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, ...]:
    family = SOURCE_FAMILIES[int(rng.integers(len(SOURCE_FAMILIES)))]
    domain = make_domain(family, rng)
    kinds = list(domain.defect_kinds)
    scene_seed = int(rng.integers(2**62))
    clean, _, clean_info = render_sample(domain, None, np.random.default_rng(scene_seed), size)
    while True:  # a draw that cannot place a visible defect (rare) takes another kind
        kind = kinds.pop(int(rng.integers(len(kinds))))
        try:
            bad, mask, bad_info = render_sample(
                domain, kind, np.random.default_rng(scene_seed), size
            )
            break
        except RuntimeError:
            if not kinds:
                raise
    return clean, clean_info, bad, mask, bad_info


def make_batch(config: PretrainConfig, step: int, image_size: int, grid: int) -> Batch:
    """Batch `step` of the run: a pure function of (seed, step)."""
    rng = np.random.default_rng([config.seed, step])
    size = config.render_size
    images, shares, captions, phrases = [], [], [], []
    for _ in range(config.pairs_per_batch):
        clean, clean_info, bad, mask, bad_info = _render_pair(rng, size)
        normal_caption, defect_caption = caption_pair(clean_info, bad_info, rng, size)
        phrases.append(region_phrase(bad_info, size))
        for picture, caption in ((clean, normal_caption), (bad, defect_caption)):
            images.append(pil_to_tensor(Image.fromarray(picture), image_size))
            captions.append(caption)
        share = F.interpolate(
            torch.from_numpy(mask).float()[None, None], size=(grid, grid), mode="area"
        ).flatten()
        shares.extend([torch.zeros_like(share), share])
    return Batch(torch.stack(images), torch.stack(shares), captions, phrases)


# ---------------------------------------------------------------------------------- model
def create_model(config: PretrainConfig) -> nn.Module:
    """The open_clip CLIP to train, initialised by open_clip under `torch.manual_seed(seed)`."""
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = open_clip.create_model(config.model_name, pretrained=None)
    model.train()
    return model


def image_tokens(
    model: nn.Module, images: torch.Tensor, vv_from_layer: int | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Global feature `[B, D]` and the projected patch tokens `[B, N, D]` of every layer (the
    original path at each layer, plus the V-V path from `vv_from_layer` on), with gradients.

    The same arithmetic as `larp.backbone.FrozenBackbone.extract` (same `_vision_block`)."""
    visual = model.visual
    x = visual._embeds(images)
    vv: torch.Tensor | None = None
    tokens: list[torch.Tensor] = []
    for index, block in enumerate(visual.transformer.resblocks):
        if vv_from_layer is not None and index + 1 == vv_from_layer:
            vv = x
        x, vv = _vision_block(block, x, vv)
        tokens.append(x[:, 1:])
        if vv is not None:
            tokens.append(vv[:, 1:])
    patches = [visual.ln_post(t) @ visual.proj for t in tokens]
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj, patches


def region_loss(
    patches: list[torch.Tensor],
    normal_text: torch.Tensor,
    defect_text: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Per-patch two-way contrast (clean caption vs defect caption of the patch's own scene),
    soft targets, the two classes weighted equally; the mean over the given token sets."""
    texts = torch.stack([normal_text, defect_text], dim=1)  # [B, 2, D], unit
    pos_w = target / target.sum().clamp_min(1e-6)
    neg_w = (1 - target) / (1 - target).sum().clamp_min(1e-6)
    total = patches[0].new_zeros(())
    for feats in patches:
        feats = F.normalize(feats.float(), dim=-1)
        logp = (torch.einsum("bnd,bkd->bnk", feats, texts) * scale).log_softmax(-1)
        total = total - 0.5 * ((pos_w * logp[..., 1]).sum() + (neg_w * logp[..., 0]).sum())
    return total / len(patches)


def _optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    def no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
        {
            "params": [p for n, p in params if not no_decay(n, p)],
            "weight_decay": config.weight_decay,
        },
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=1e-6)


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step(
    model: nn.Module,
    batch: Batch,
    tokenizer,
    config: PretrainConfig,
    loss_fn: nn.Module,
    region_scale: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    full_share = config.region_full_share
    target = (batch.region_share / full_share).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
        global_feature, patches = image_tokens(model, batch.images, config.vv_from_layer)
        texts = batch.captions + (batch.phrases if config.region_text == "phrase" else [])
        text = model.encode_text(tokenizer(texts + list(GENERIC_TEXTS)))
    text, generic = text[: len(texts)], F.normalize(text[len(texts) :].float(), dim=-1)
    n_images = batch.images.shape[0]
    image_n = F.normalize(global_feature.float(), dim=-1)
    text_n = F.normalize(text.float(), dim=-1)
    clip = loss_fn(image_n, text_n[:n_images], model.logit_scale.exp())
    # Both images of pair p are contrasted with the pair's clean caption (2p) and its defect
    # text: the defect phrase, or the defect caption (2p+1).
    pair_text = text_n[:n_images].view(-1, 2, text_n.shape[-1])
    normal_text = pair_text[:, 0].repeat_interleave(2, dim=0)
    defect = text_n[n_images:] if config.region_text == "phrase" else pair_text[:, 1]
    defect_text = defect.repeat_interleave(2, dim=0)
    tau = region_scale.exp()
    region = region_loss(patches, normal_text, defect_text, target, tau)
    loss = clip + config.region_weight * region
    parts = {"loss": 0.0, "clip": clip.item(), "region": region.item(), "generic": 0.0}
    parts["global"] = 0.0
    parts["region_scale"] = tau.item()
    if config.generic_weight > 0:
        n = normal_text.shape[0]
        shared = region_loss(
            patches, generic[0].expand(n, -1), generic[1].expand(n, -1), target, tau
        )
        loss = loss + config.generic_weight * shared
        parts["generic"] = shared.item()
    if config.global_generic_weight > 0:
        defective = (batch.region_share.sum(-1) > 0).long()
        logits = image_n @ generic.T * tau
        whole = F.cross_entropy(logits, defective)
        loss = loss + config.global_generic_weight * whole
        parts["global"] = whole.item()
    parts["loss"] = loss.item()
    return loss, parts


def pretrain(
    config: PretrainConfig,
    progress: bool = True,
    snapshot_every: int = 0,
    snapshot_dir: Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the tiny CLIP; returns the model and a log (seconds, loss curve).

    Batches are rendered in this process: a DataLoader worker process made each step several
    times slower on a 2-core machine (the two compete for the same cores)."""
    model = create_model(config)
    tokenizer = open_clip.get_tokenizer(config.model_name)
    image_size = int(model.visual.image_size[0])
    grid = int(model.visual.grid_size[0])
    region_scale = nn.Parameter(
        torch.tensor(math.log(1.0 / config.region_temperature)),
        requires_grad=config.learn_region_scale,
    )
    optimizer = _optimizer(model, config)
    optimizer.add_param_group({"params": [region_scale], "weight_decay": 0.0})
    loss_fn = open_clip.loss.ClipLoss()
    curve: list[list[float]] = []
    recent: list[dict[str, float]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress, unit="step")
    for step in bar:
        batch = make_batch(config, step, image_size, grid)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss, parts = train_step(model, batch, tokenizer, config, loss_fn, region_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            region_scale.clamp_(0, math.log(100))
        recent.append(parts)
        bar.set_postfix(
            clip=f"{parts['clip']:.3f}",
            region=f"{parts['region']:.3f}",
            generic=f"{parts['generic']:.3f}",
            glob=f"{parts['global']:.3f}",
        )
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            mean = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
            curve.append(
                [step + 1, mean["loss"], mean["clip"], mean["region"], mean["generic"]]
                + [mean["global"], mean["region_scale"]]
            )
            recent = []
        if snapshot_every and snapshot_dir is not None and (step + 1) % snapshot_every == 0:
            snapshot_dir.mkdir(parents=True, exist_ok=True)
            save_weights(model, snapshot_dir / f"step{step + 1:05d}.safetensors")
    model.eval()
    log = {
        "seconds": round(time.perf_counter() - started, 1),
        # CPU time of the training process (all its threads; the render worker not counted):
        # on a busy shared machine wall time says little about the recipe's own cost.
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "threads": torch.get_num_threads(),
        "final_loss": curve[-1][1] if curve else None,
        "loss_curve_columns": [
            "step",
            "loss",
            "clip",
            "region",
            "generic",
            "global",
            "region_scale",
        ],
        "loss_curve": [[int(c[0])] + [round(v, 4) for v in c[1:]] for c in curve],
    }
    return model, log


# ---------------------------------------------------------------------------------- files
def save_weights(model: nn.Module, path: Path) -> None:
    """fp16 safetensors of the whole state dict (what open_clip's `create_model` loads)."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def reference_input(image_size: int) -> torch.Tensor:
    image, _, _ = render_sample(
        DOMAINS[REFERENCE_DOMAIN], None, np.random.default_rng(REFERENCE_SEED), 128
    )
    return pil_to_tensor(Image.fromarray(image), image_size)[None]


@torch.no_grad()
def reference_outputs(model: nn.Module, model_name: str) -> dict[str, Any]:
    """Outputs on a fixed input that a loaded copy must reproduce (tests compare within 1e-3)."""
    image_size = int(model.visual.image_size[0])
    tokenizer = open_clip.get_tokenizer(model_name)
    image = model.encode_image(reference_input(image_size))[0]
    text = model.encode_text(tokenizer(list(REFERENCE_TEXTS)))
    return {
        "image": f"render_sample({REFERENCE_DOMAIN!r}, None, default_rng({REFERENCE_SEED}), 128)"
        f" -> pil_to_tensor(., {image_size})",
        "global_feature": [round(float(v), 6) for v in image],
        "texts": list(REFERENCE_TEXTS),
        "text_features": [[round(float(v), 6) for v in row] for row in text],
    }


def write_release(model: nn.Module, config: PretrainConfig, log: dict, out: Path) -> Path:
    """Weights + manifest in `out`; the manifest's reference outputs come from the file as
    open_clip loads it (fp16 -> fp32), not from the in-memory fp32 model."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_weights(model, weights)
    register_model_configs()
    loaded = open_clip.create_model(config.model_name, pretrained=str(weights)).eval()
    model_cfg = open_clip.get_model_config(config.model_name)
    manifest = {
        "name": config.model_name,
        "tag": TAG,
        "file": WEIGHTS_FILE,
        "sha256": file_sha256(weights),
        "bytes": weights.stat().st_size,
        "dtype": "float16",
        "open_clip_config": model_cfg,
        "recipe": {
            "module": "larp.zoo.pretrain_tiny",
            "version": RECIPE_VERSION,
            **config.to_dict(),
            "families": list(SOURCE_FAMILIES),
            "synthetic_generator_version": GENERATOR_VERSION,
        },
        "training": {
            **log,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
        },
        "reference": reference_outputs(loaded, config.model_name),
    }
    path = manifest_path_for(weights)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def install(out: Path) -> None:
    """Copy a release from `out` into the package (`larp/zoo/weights/`)."""
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    for src in (weights, manifest_path_for(weights)):
        shutil.copyfile(src, WEIGHTS_DIR / src.name)
        (WEIGHTS_DIR / src.name).chmod(0o644)


def main(argv: list[str] | None = None) -> int:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m larp.zoo.pretrain_tiny",
        description="Pretrain the shipped tiny CLIP on the synthetic SOURCE world.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--pairs", type=int, default=defaults.pairs_per_batch,
                        help="scene pairs per batch (images per batch = 2x)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--region-weight", type=float, default=defaults.region_weight)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=defaults.precision)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="also save weights every N steps under OUT/snapshots")  # fmt: skip
    parser.add_argument("--install", action="store_true",
                        help="copy the result into larp/zoo/weights (the shipped weights)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(
        defaults,
        seed=args.seed,
        steps=args.steps,
        pairs_per_batch=args.pairs,
        lr=args.lr,
        region_weight=args.region_weight,
        precision=args.precision,
    )
    model, log = pretrain(
        config,
        progress=not args.no_progress,
        snapshot_every=args.snapshot_every,
        snapshot_dir=args.out / "snapshots",
    )
    manifest = write_release(model, config, log, args.out)
    print(f"wrote {args.out / WEIGHTS_FILE} and {manifest} in {log['seconds']:.0f} s "
          f"(final loss {log['final_loss']:.4f})")  # fmt: skip
    if args.install:
        install(args.out)
        print(f"installed into {WEIGHTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
