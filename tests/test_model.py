"""`LaRPCLIP` composed (SPEC §1): outputs against the parts, ablation switches, gradients,
the inference text cache and input validation."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS

from larp.config import LaRPConfig
from larp.errors import ConfigError, InputError
from larp.losses import larp_loss
from larp.model import LaRPCLIP, LaRPResult
from larp.pixel import gaussian_blur, layer_maps, upsample
from larp.prototype import prototype_deviation, text_score, top_k_mean


def build(make_backbone, config: LaRPConfig, seed: int = 0) -> LaRPCLIP:
    torch.manual_seed(seed)
    return LaRPCLIP(config, make_backbone(config))


def perturb(model: LaRPCLIP, seed: int = 7) -> LaRPCLIP:
    """Give every trainable tensor a non-trivial value (α ≠ 0, ψ not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def synthetic_batch(images):
    masks = torch.zeros(2, 112, 112)
    masks[0, 30:70, 40:90] = 1.0
    return images, masks, torch.tensor([1, 0])


def count_prompt_passes(model, monkeypatch) -> list:
    calls = []
    original = model.prompt_learner.forward

    def counted(backbone):
        calls.append(1)
        return original(backbone)

    monkeypatch.setattr(model.prompt_learner, "forward", counted)
    return calls


# ---------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_predict_is_the_composition_of_the_parts(name, make_backbone, images):
    cfg = CONFIGS[name]
    model = perturb(build(make_backbone, cfg))
    res = model.predict(images)
    L = cfg.num_layers
    assert res.layer_maps.shape == (2, L, 14, 14)
    assert res.final_map.shape == res.fused_map.shape == res.q.shape == (2, 14, 14)
    assert res.anomaly_map.shape == (2, 112, 112)
    assert res.score.shape == res.text_score.shape == res.map_score.shape == (2,)
    assert (res.lam, res.top_k) == (cfg.lam, cfg.top_k)

    # recompute every stage from the parts
    feats = model.backbone.extract(images)
    with torch.no_grad():
        text = model.prompt_learner(model.backbone)
    groups = [
        (1 if layer in cfg.shallow_layers else 2) if cfg.decouple_prompts else 0
        for layer in cfg.feature_layers
    ]
    maps = layer_maps(feats.patch_tokens, text[groups], cfg.temperature)
    torch.testing.assert_close(res.layer_maps, maps, atol=1e-5, rtol=0)
    omega = model.fusion.weights().detach().view(1, -1, 1, 1)
    fused = (omega * maps).sum(1)
    prior = (omega * (maps - fused[:, None]).abs()).sum(1)
    torch.testing.assert_close(res.fused_map, fused, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.error_prior, prior, atol=1e-5, rtol=0)
    if cfg.refiner:
        with torch.no_grad():
            final = model.refiner(fused, prior)
        assert (final - fused).abs().max() > 1e-4  # perturbed ψ is not the identity
    else:
        final = fused
    torch.testing.assert_close(res.final_map, final, atol=1e-5, rtol=0)
    assert res.final_map.min() >= 0 and res.final_map.max() <= 1
    s_text = text_score(feats.global_feature, text[0], cfg.temperature)
    torch.testing.assert_close(res.text_score, s_text, atol=1e-5, rtol=0)
    q = maps.mean(1)
    torch.testing.assert_close(res.q, q, atol=1e-5, rtol=0)
    if cfg.prototype:
        mu = prototype_deviation(q.flatten(1), feats.patch_tokens[:, -1], 0.5).view_as(q)
        torch.testing.assert_close(res.prototype_deviation, mu, atol=1e-5, rtol=0)
        aux = 0.5 * (q + mu.clamp(0, 1))
    else:
        assert res.prototype_deviation is None
        aux = q
    s_map = top_k_mean(aux.flatten(1), cfg.top_k)
    torch.testing.assert_close(res.map_score, s_map, atol=1e-5, rtol=0)
    expected = (s_text + cfg.lam * s_map) / (1 + cfg.lam)
    torch.testing.assert_close(res.score, expected, atol=1e-5, rtol=0)
    blurred = gaussian_blur(upsample(final, 112), cfg.blur_sigma)
    torch.testing.assert_close(res.anomaly_map, blurred, atol=1e-5, rtol=0)


def test_each_layer_reads_its_own_prompt_group(make_backbone, images):
    cfg = LaRPConfig.tiny_random()  # shallow (1, 2), deep (3, 4)
    model = perturb(build(make_backbone, cfg))
    assert model.layer_group.tolist() == [1, 1, 2, 2]
    feats = model.backbone.extract(images)
    res = model.predict(images)
    with torch.no_grad():
        text = model.prompt_learner(model.backbone)
    for i, group in enumerate([1, 1, 2, 2]):
        for g in range(3):
            maps = layer_maps(feats.patch_tokens[:, i : i + 1], text[g : g + 1], cfg.temperature)
            close = torch.allclose(res.layer_maps[:, i : i + 1], maps, atol=1e-5)
            assert close == (g == group), (i, g)


def test_blur_and_overrides(make_backbone, images):
    cfg = LaRPConfig.tiny_random()
    model = perturb(build(make_backbone, cfg))
    plain = model.predict(images, blur=False)
    torch.testing.assert_close(plain.anomaly_map, upsample(plain.final_map, 112), atol=1e-6, rtol=0)
    other = model.predict(images, lam=4.0, top_k=1)
    assert (other.lam, other.top_k) == (4.0, 1)
    s_map = top_k_mean((0.5 * (plain.q + plain.prototype_deviation.clamp(0, 1))).flatten(1), 1)
    torch.testing.assert_close(other.map_score, s_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(other.score, (plain.text_score + 4 * s_map) / 5, atol=1e-6, rtol=0)
    torch.testing.assert_close(other.final_map, plain.final_map, atol=0, rtol=0)
    with pytest.raises(ConfigError):
        model.predict(images, lam=-1.0)
    with pytest.raises(ConfigError):
        model.predict(images, top_k=0)


def test_predict_is_per_image_and_deterministic(make_backbone, images):
    model = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    both = model.predict(images)
    one = model.predict(images[1:])
    for name in ("final_map", "anomaly_map", "prototype_deviation", "score"):
        torch.testing.assert_close(getattr(both, name)[1:], getattr(one, name), atol=1e-5, rtol=0)
    again = model.predict(images)
    assert torch.equal(both.score, again.score) and torch.equal(both.anomaly_map, again.anomaly_map)


def test_result_indexing_and_labels(make_backbone, images):
    res = build(make_backbone, LaRPConfig.tiny_random()).predict(images)
    first = res[1]
    assert isinstance(first, LaRPResult)
    assert first.anomaly_map.shape == (1, 112, 112) and first.lam == res.lam
    assert torch.equal(first.score, res.score[1:])
    threshold = res.score.mean().item()
    assert res.labels(threshold).tolist() == [int(s >= threshold) for s in res.score.tolist()]


@pytest.mark.parametrize(
    "bad,words",
    [
        (torch.randn(3, 112, 112), "shape"),
        (torch.zeros(1, 3, 112, 112, dtype=torch.int32), "float"),
        (torch.randn(1, 3, 115, 115), "multiple of the patch"),
        (torch.randn(1, 3, 224, 224), "input size"),
    ],
)
def test_bad_inputs(bad, words, make_backbone):
    model = build(make_backbone, LaRPConfig.tiny_random())
    with pytest.raises(InputError, match=words):
        model.predict(bad)
    with pytest.raises(InputError):
        model(bad)


def test_a_shared_backbone_must_match(make_backbone):
    bb = make_backbone(LaRPConfig.tiny_random())
    for change in ({"backbone_seed": 1}, {"vv_from_layer": None}, {"feature_layers": (2, 4)}):
        cfg = LaRPConfig.tiny_random(**change, shallow_layers=(2,))
        with pytest.raises(ConfigError):
            LaRPCLIP(cfg, bb)


# ---------------------------------------------------------------------------------- ablations
def test_ablation_parameters(make_backbone):
    full = build(make_backbone, LaRPConfig.tiny_random())
    names = set(full.trainable_state_dict())
    assert names == {
        "prompt_learner.context",
        "prompt_learner.deep_tokens",
        "fusion.alpha",
        "refiner.conv1.weight",
        "refiner.conv1.bias",
        "refiner.conv2.weight",
        "refiner.conv2.bias",
    }
    assert {n for n, _ in full.named_parameters() if not n.startswith("backbone.")} == names

    shared = build(make_backbone, LaRPConfig.tiny_random(decouple_prompts=False))
    assert shared.prompt_learner.context.shape[0] == 1
    assert shared.layer_group.tolist() == [0, 0, 0, 0]

    fixed = build(make_backbone, LaRPConfig.tiny_random(adaptive_fusion=False))
    assert "fusion.alpha" not in dict(fixed.named_parameters())
    assert "fusion.alpha" not in fixed.trainable_state_dict()
    torch.testing.assert_close(fixed.fusion.weights(), torch.full((4,), 0.25))

    no_ref = build(make_backbone, LaRPConfig.tiny_random(refiner=False))
    assert no_ref.refiner is None
    assert not [n for n in no_ref.trainable_state_dict() if n.startswith("refiner")]

    base = build(make_backbone, LaRPConfig.tiny_random().anomalyclip())
    assert set(base.trainable_state_dict()) == {
        "prompt_learner.context",
        "prompt_learner.deep_tokens",
    }


def _same(a: LaRPResult, b: LaRPResult, names):
    for name in names:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=0)


def _copy_shared(src: LaRPCLIP, dst: LaRPCLIP) -> None:
    mine = dst.trainable_state_dict()
    state = {
        k: v
        for k, v in src.trainable_state_dict().items()
        if k in mine and v.shape == mine[k].shape
    }
    dst.load_state_dict(state, strict=False)


def test_refiner_off_equals_an_untrained_refiner(make_backbone, images):
    on = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    with torch.no_grad():  # zero-init last conv: ψ is the identity again
        on.refiner.conv2.weight.zero_()
        on.refiner.conv2.bias.zero_()
    off = build(make_backbone, LaRPConfig.tiny_random(refiner=False), seed=5)
    _copy_shared(on, off)
    a, b = on.predict(images), off.predict(images)
    _same(
        a,
        b,
        [
            "layer_maps",
            "fused_map",
            "error_prior",
            "final_map",
            "anomaly_map",
            "q",
            "prototype_deviation",
            "text_score",
            "map_score",
            "score",
        ],
    )
    torch.testing.assert_close(b.final_map, b.fused_map, atol=0, rtol=0)


def test_refiner_off_changes_only_the_final_map(make_backbone, images):
    on = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    off = build(make_backbone, LaRPConfig.tiny_random(refiner=False))
    _copy_shared(on, off)
    a, b = on.predict(images), off.predict(images)
    _same(
        a,
        b,
        [
            "layer_maps",
            "fused_map",
            "error_prior",
            "q",
            "prototype_deviation",
            "text_score",
            "map_score",
            "score",
        ],
    )
    assert (a.final_map - b.final_map).abs().max() > 1e-4
    assert (a.anomaly_map - b.anomaly_map).abs().max() > 1e-4


def test_prototype_off_changes_only_the_image_score(make_backbone, images):
    on = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    off = build(make_backbone, LaRPConfig.tiny_random(prototype=False))
    _copy_shared(on, off)
    a, b = on.predict(images), off.predict(images)
    _same(
        a,
        b,
        ["layer_maps", "fused_map", "error_prior", "final_map", "anomaly_map", "q", "text_score"],
    )
    assert b.prototype_deviation is None
    torch.testing.assert_close(b.map_score, top_k_mean(b.q.flatten(1), 4), atol=1e-6, rtol=0)
    assert (a.map_score - b.map_score).abs().max() > 1e-4


def test_adaptive_fusion_off_equals_alpha_zero(make_backbone, images):
    on = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    off = build(make_backbone, LaRPConfig.tiny_random(adaptive_fusion=False))
    _copy_shared(on, off)
    a, b = on.predict(images), off.predict(images)
    _same(a, b, ["layer_maps", "q", "prototype_deviation", "text_score"])
    assert (a.fused_map - b.fused_map).abs().max() > 1e-4  # α ≠ 0 in `on`
    torch.testing.assert_close(b.fused_map, b.layer_maps.mean(1), atol=1e-6, rtol=0)
    with torch.no_grad():
        on.fusion.alpha.zero_()
    on.eval()
    _same(on.predict(images), b, ["fused_map", "error_prior", "final_map", "score"])


def test_decouple_off_reads_group_zero_everywhere(make_backbone, images):
    on = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    off = build(make_backbone, LaRPConfig.tiny_random(decouple_prompts=False))
    with torch.no_grad():  # the single group is the full model's global group
        off.prompt_learner.context.copy_(on.prompt_learner.context[:1])
        off.prompt_learner.deep_tokens.copy_(on.prompt_learner.deep_tokens[:1])
    _copy_shared(on, off)  # α and ψ (prompt shapes differ, so those are skipped)
    a, b = on.predict(images), off.predict(images)
    _same(a, b, ["text_score"])
    feats = on.backbone.extract(images)
    with torch.no_grad():
        text = on.prompt_learner(on.backbone)
    global_maps = layer_maps(feats.patch_tokens, text[[0, 0, 0, 0]], 0.07)
    torch.testing.assert_close(b.layer_maps, global_maps, atol=1e-5, rtol=0)
    assert (a.layer_maps - b.layer_maps).abs().max() > 1e-4


def test_anomalyclip_mode(make_backbone, images):
    full = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    base = build(make_backbone, LaRPConfig.tiny_random().anomalyclip())
    with torch.no_grad():
        base.prompt_learner.context.copy_(full.prompt_learner.context[:1])
        base.prompt_learner.deep_tokens.copy_(full.prompt_learner.deep_tokens[:1])
    a, b = full.predict(images), base.predict(images)
    _same(a, b, ["text_score"])
    mean = b.layer_maps.mean(1)
    torch.testing.assert_close(b.fused_map, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.final_map, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.q, mean, atol=1e-6, rtol=0)
    assert b.prototype_deviation is None
    s_map = top_k_mean(mean.flatten(1), 4)
    torch.testing.assert_close(b.score, (b.text_score + s_map) / 2, atol=1e-6, rtol=0)
    feats = full.backbone.extract(images)
    with torch.no_grad():
        text = full.prompt_learner(full.backbone)
    torch.testing.assert_close(
        b.layer_maps, layer_maps(feats.patch_tokens, text[[0, 0, 0, 0]], 0.07), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_reach_the_head_only(name, make_backbone, images):
    cfg = CONFIGS[name]
    model = build(make_backbone, cfg)
    model.train()
    assert not model.backbone.training
    x, masks, labels = synthetic_batch(images)
    total, _ = larp_loss(model(x), masks, labels, cfg)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("backbone.")}
    assert grads["prompt_learner.context"].abs().sum() > 0
    assert grads["prompt_learner.deep_tokens"].abs().sum() > 0
    if cfg.adaptive_fusion:
        assert grads["fusion.alpha"].abs().sum() > 0
    if cfg.refiner:  # last conv is zero: the gradient reaches it first
        assert grads["refiner.conv2.weight"].abs().sum() > 0
    for p in model.backbone.parameters():
        assert not p.requires_grad and p.grad is None


def test_one_adam_step_lowers_the_loss(make_backbone, images):
    cfg = LaRPConfig.tiny_random()
    model = build(make_backbone, cfg)
    model.train()
    x, masks, labels = synthetic_batch(images)
    feats = model.backbone.extract(x)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, betas=(0.5, 0.999))
    before = [p.detach().clone() for p in model.backbone.parameters()]
    loss0, _ = larp_loss(model.forward_features(feats), masks, labels, cfg)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    loss1, _ = larp_loss(model.forward_features(feats), masks, labels, cfg)
    assert loss1.item() < loss0.item()
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters(), strict=True))
    assert len(model.trainable_parameters()) == 7


# ---------------------------------------------------------------------------------- text cache
def test_text_embeddings_are_computed_once_at_inference(make_backbone, images, monkeypatch):
    model = build(make_backbone, LaRPConfig.tiny_random())
    model.eval()
    calls = count_prompt_passes(model, monkeypatch)
    first = model.predict(images)
    second = model.predict(images)
    assert len(calls) == 1
    assert torch.equal(first.score, second.score)
    with torch.no_grad():
        model(images)  # eval + no grad: the cache serves plain forward too
    assert len(calls) == 1

    model.train()
    model.predict(images)  # predict switches back to eval: recomputed once
    assert len(calls) == 2
    model.predict(images)
    assert len(calls) == 2

    model.load_state_dict(model.trainable_state_dict(), strict=False)
    model.predict(images)
    assert len(calls) == 3

    model.float()  # moving/casting the model drops the cache too
    model.predict(images)
    assert len(calls) == 4


def test_training_forward_is_never_cached(make_backbone, images, monkeypatch):
    model = build(make_backbone, LaRPConfig.tiny_random())
    model.train()
    calls = count_prompt_passes(model, monkeypatch)
    out1 = model(images)
    out2 = model(images)
    assert len(calls) == 2
    assert out1.text_score.requires_grad and out2.layer_maps.requires_grad
    # an optimiser step is visible to the next predict
    before = model.predict(images).score
    model.train()
    with torch.no_grad():
        model.prompt_learner.context.add_(torch.randn_like(model.prompt_learner.context))
    after = model.predict(images).score
    assert (after - before).abs().max() > 1e-5


def test_cached_embeddings_equal_fresh_ones(make_backbone, images):
    model = perturb(build(make_backbone, LaRPConfig.tiny_random()))
    model.eval()
    cached = model.predict(images)
    with torch.no_grad():
        fresh = model.forward_features(
            model.backbone.extract(images), text=model.prompt_learner(model.backbone)
        )
    torch.testing.assert_close(cached.final_map, fresh.final_map, atol=0, rtol=0)
    torch.testing.assert_close(cached.text_score, fresh.text_score, atol=0, rtol=0)
