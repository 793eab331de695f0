"""The frozen backbone (SPEC §1.1): global feature, feature-layer tokens, the V-V path, the text
pass with injected tokens, identity checksums and input checks, all against open_clip itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS
from torch import nn

from larp.backbone import FrozenBackbone, create_clip, state_checksum
from larp.config import LaRPConfig
from larp.errors import BackboneError, InputError

ATOL = 1e-5


def reference_tokens(clip, images, layers):
    """Ordinary block outputs of `layers` (1-based) via open_clip's own `forward_intermediates`,
    through `ln_post` and `proj`, class token dropped: `[B, L, N, D]`."""
    out = clip.visual.forward_intermediates(
        images,
        indices=[layer - 1 for layer in layers],
        normalize_intermediates=True,
        output_fmt="NLC",
    )
    return torch.stack([t @ clip.visual.proj for t in out["image_intermediates"]], dim=1)


def vv_reference(clip, images, vv_from, layers):
    """An independent V-V path: `nn.MultiheadAttention` whose q/k/v projections are all the
    block's value projection, called with query = key = value = `ln_1(orig)`."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = visual._embeds(images)
        orig = [x]  # orig[i] = input of block i (0-based) = output of block i-1
        for block in blocks:
            orig.append(block(orig[-1]))
        vv = orig[vv_from - 1]
        outs = {}
        for index in range(vv_from - 1, len(blocks)):
            block = blocks[index]
            width = block.attn.embed_dim
            mha = nn.MultiheadAttention(width, block.attn.num_heads, batch_first=True)
            w_v = block.attn.in_proj_weight[2 * width :]
            b_v = block.attn.in_proj_bias[2 * width :]
            mha.in_proj_weight.copy_(torch.cat([w_v, w_v, w_v]))
            mha.in_proj_bias.copy_(torch.cat([b_v, b_v, b_v]))
            mha.out_proj.load_state_dict(block.attn.out_proj.state_dict())
            h = block.ln_1(orig[index])
            vv = vv + mha(h, h, h, need_weights=False)[0]
            outs[index + 1] = vv
    return torch.stack(
        [visual.ln_post(outs[layer][:, 1:]) @ visual.proj for layer in layers], dim=1
    )


# ---------------------------------------------------------------------------------- vision
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_global_feature_is_encode_image(name, make_backbone, images):
    bb = make_backbone(CONFIGS[name])
    feats = bb.extract(images)
    with torch.no_grad():
        expected = bb.clip.encode_image(images)
    torch.testing.assert_close(feats.global_feature, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_feature_shapes(name, make_backbone, images):
    cfg = CONFIGS[name]
    feats = make_backbone(cfg).extract(images)
    assert feats.patch_tokens.shape == (2, cfg.num_layers, 14 * 14, 64)
    assert feats.global_feature.shape == (2, 64)
    assert not feats.patch_tokens.requires_grad and not feats.global_feature.requires_grad


@pytest.mark.parametrize("layers", [(1, 2, 3, 4), (2, 4), (3,)])
def test_without_vv_tokens_are_the_ordinary_block_outputs(layers, make_backbone, images):
    bb = make_backbone(
        LaRPConfig.tiny_random(
            feature_layers=layers,
            shallow_layers=layers[:1],
            decouple_prompts=len(layers) > 1,
            vv_from_layer=None,
        )
    )
    feats = bb.extract(images)
    expected = reference_tokens(bb.clip, images, layers)
    torch.testing.assert_close(feats.patch_tokens, expected, atol=ATOL, rtol=0)


def test_vv_leaves_earlier_layers_and_changes_later_ones(make_backbone, images):
    cfg = LaRPConfig.tiny_random(vv_from_layer=3)
    feats = make_backbone(cfg).extract(images).patch_tokens
    plain = make_backbone(cfg.replace(vv_from_layer=None)).extract(images).patch_tokens
    for i, layer in enumerate(cfg.feature_layers):
        if layer < 3:
            torch.testing.assert_close(feats[:, i], plain[:, i], atol=0, rtol=0)
        else:
            assert (feats[:, i] - plain[:, i]).abs().max() > 1e-2, layer
    # and the global feature does not see the V-V path at all
    torch.testing.assert_close(
        make_backbone(cfg).extract(images).global_feature,
        make_backbone(cfg.replace(vv_from_layer=None)).extract(images).global_feature,
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("vv_from", [1, 2, 4])
def test_vv_path_matches_an_independent_computation(vv_from, make_backbone, images):
    cfg = LaRPConfig.tiny_random(vv_from_layer=vv_from)
    bb = make_backbone(cfg)
    feats = bb.extract(images)
    later = [layer for layer in cfg.feature_layers if layer >= vv_from]
    expected = vv_reference(bb.clip, images, vv_from, later)
    got = feats.patch_tokens[:, [cfg.feature_layers.index(layer) for layer in later]]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_vv_single_layer_by_hand(backbone, images):
    """The first V-V layer written out with plain tensor ops: vv = x + out_proj(SDPA(v, v, v))."""
    visual = backbone.clip.visual
    cfg = backbone.config  # vv_from_layer = 2
    block0, block1 = visual.transformer.resblocks[:2]
    with torch.no_grad():
        x1 = block0(visual._embeds(images))
        attn = block1.attn
        width, heads = attn.embed_dim, attn.num_heads
        v = F.linear(
            block1.ln_1(x1), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :]
        )
        b, t, _ = v.shape
        vh = v.view(b, t, heads, width // heads).transpose(1, 2)  # [B, h, T, d]
        weights = (vh @ vh.transpose(-1, -2) / (width // heads) ** 0.5).softmax(dim=-1)
        mixed = (weights @ vh).transpose(1, 2).reshape(b, t, width)
        vv2 = x1 + attn.out_proj(mixed)
        expected = visual.ln_post(vv2[:, 1:]) @ visual.proj
    got = backbone.extract(images).patch_tokens[:, cfg.feature_layers.index(2)]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_extract_is_deterministic_and_batch_independent(backbone, images):
    both = backbone.extract(images)
    one = backbone.extract(images[1:])
    torch.testing.assert_close(both.patch_tokens[1:], one.patch_tokens, atol=ATOL, rtol=0)
    torch.testing.assert_close(both.global_feature[1:], one.global_feature, atol=ATOL, rtol=0)
    again = backbone.extract(images)
    assert torch.equal(both.patch_tokens, again.patch_tokens)


# ---------------------------------------------------------------------------------- frozen
def test_backbone_is_frozen_and_stays_in_eval(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.clip.training
    assert not backbone.clip.visual.transformer.resblocks[0].training


def test_identity_and_checksum(backbone, tiny_config, clip):
    ident = backbone.identity()
    assert ident == {
        "name": "larp-tiny-random",
        "pretrained": None,
        "image_size": 112,
        "weights_sha256": backbone.weights_checksum,
    }
    assert len(ident["weights_sha256"]) == 64
    # a rebuild with the same seed has the same weights; another seed does not
    assert state_checksum(create_clip(tiny_config)) == backbone.weights_checksum
    assert state_checksum(create_clip(tiny_config.replace(backbone_seed=1))) != (
        backbone.weights_checksum
    )
    # any single weight changes it, including a 0-dim one (logit_scale)
    changed = copy.deepcopy(clip)
    with torch.no_grad():
        changed.logit_scale.add_(1e-3)
    assert state_checksum(changed) != backbone.weights_checksum
    changed = copy.deepcopy(clip)
    with torch.no_grad():
        changed.visual.transformer.resblocks[3].mlp.c_fc.bias[5] += 1e-6
    assert state_checksum(changed) != backbone.weights_checksum


# ---------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "bad,words",
    [
        (torch.randn(3, 112, 112), "shape"),
        (torch.randn(2, 1, 112, 112), "shape"),
        (torch.randn(2, 4, 112, 112), "shape"),
        (torch.zeros(2, 3, 112, 112, dtype=torch.uint8), "float"),
        (torch.zeros(2, 3, 112, 112, dtype=torch.int64), "float"),
        (torch.randn(2, 3, 116, 116), "multiple of the patch"),
        (torch.randn(2, 3, 112, 116), "multiple of the patch"),
        (torch.randn(2, 3, 120, 120), "input size"),
        (torch.randn(2, 3, 112, 104), "input size"),
    ],
)
def test_bad_images_raise_input_error(bad, words, backbone):
    with pytest.raises(InputError, match=words):
        backbone.extract(bad)


def test_non_tensor_input(backbone, images):
    with pytest.raises(InputError, match="torch.Tensor"):
        backbone.extract(images.numpy())


@pytest.mark.parametrize(
    "change,words",
    [
        ({"backbone": "no-such-model"}, "unknown open_clip model"),
        ({"feature_layers": (2, 5), "shallow_layers": (2,)}, "exceed"),
        ({"vv_from_layer": 5}, "vv_from_layer"),
        ({"prompt_depth": 5}, "prompt_depth"),
        ({"image_size": 100}, "multiple of the patch"),
        ({"pretrained": "/nonexistent/weights.safetensors"}, "not found"),
        ({"pretrained": "no-such-tag"}, "no pretrained tag"),
    ],
)
def test_bad_backbone_configs(change, words):
    with pytest.raises(BackboneError, match=words):
        FrozenBackbone(LaRPConfig.tiny_random(**change))


# ---------------------------------------------------------------------------------- text
def _tokens(backbone, texts):
    ids = backbone.tokenize(texts)
    return ids, backbone.token_embeddings(ids), ids.argmax(dim=-1)


def test_text_pass_equals_encode_text(backbone):
    ids, emb, eot = _tokens(backbone, ["a photo of a damaged bottle.", "object", "x x x x"])
    got = backbone.encode_text_embeddings(emb, eot)
    with torch.no_grad():
        expected = backbone.clip.encode_text(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _block_io(backbone, run):
    """Record each text block's input and output while `run()` executes."""
    inputs, outputs, handles = [], [], []
    for block in backbone.clip.transformer.resblocks:
        handles.append(block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone())))
        handles.append(block.register_forward_hook(lambda m, a, o: outputs.append(o.clone())))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, inputs, outputs


def test_injected_tokens_overwrite_only_positions_1_to_n(backbone):
    _, emb, eot = _tokens(backbone, ["X X X X X X object.", "X X X X X X damaged object."])
    n, depth = 3, 2  # tokens before text blocks 1 and 2 (0-based); blocks 0 and 3 untouched
    deep = torch.randn(2, depth, n, backbone.text_width)
    _, inputs, outputs = _block_io(
        backbone, lambda: backbone.encode_text_embeddings(emb, eot, deep)
    )
    assert len(inputs) == 4
    pos = backbone.clip.positional_embedding
    length = int(eot.max()) + 1  # the causal pass stops at the last EOT token
    assert inputs[0].shape[1] == length < emb.shape[1]
    torch.testing.assert_close(inputs[0], emb[:, :length] + pos[:length], atol=0, rtol=0)
    for index in (1, 2):
        x, prev = inputs[index], outputs[index - 1]
        torch.testing.assert_close(x[:, 1 : 1 + n], deep[:, index - 1], atol=0, rtol=0)
        torch.testing.assert_close(x[:, :1], prev[:, :1], atol=0, rtol=0)
        torch.testing.assert_close(x[:, 1 + n :], prev[:, 1 + n :], atol=0, rtol=0)
    torch.testing.assert_close(inputs[3], outputs[2], atol=0, rtol=0)


def test_injected_tokens_change_the_output(backbone):
    _, emb, eot = _tokens(backbone, ["X X X X object.", "X X X X damaged object."])
    plain = backbone.encode_text_embeddings(emb, eot)
    zero = backbone.encode_text_embeddings(emb, eot, torch.zeros(2, 3, 4, backbone.text_width))
    rand = backbone.encode_text_embeddings(emb, eot, torch.randn(2, 3, 4, backbone.text_width))
    assert (zero - plain).abs().max() > 1e-3
    assert (rand - zero).abs().max() > 1e-3
    # injecting exactly what is already there is a no-op: injection is a pure overwrite
    _, inputs, _ = _block_io(backbone, lambda: backbone.encode_text_embeddings(emb, eot))
    same = torch.stack([inputs[i][:, 1:5] for i in (1, 2, 3)], dim=1)
    torch.testing.assert_close(
        backbone.encode_text_embeddings(emb, eot, same), plain, atol=ATOL, rtol=0
    )


def test_text_gradients_reach_inputs_not_the_tower(backbone):
    _, emb, eot = _tokens(backbone, ["X X X X object."])
    emb = emb.clone().requires_grad_(True)
    deep = torch.randn(1, 3, 4, backbone.text_width, requires_grad=True)
    backbone.encode_text_embeddings(emb, eot, deep).square().sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert deep.grad is not None and all(deep.grad[0, i].abs().sum() > 0 for i in range(3))
    assert all(p.grad is None for p in backbone.parameters())
