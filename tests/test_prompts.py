"""The layer-aware prompt learner (SPEC §1.2): groups, templates, one batched text pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from larp.config import LaRPConfig
from larp.errors import ConfigError
from larp.prompts import PromptLearner, prompt_templates


def make(make_backbone, **changes) -> PromptLearner:
    cfg = LaRPConfig.tiny_random(**changes)
    torch.manual_seed(0)
    return PromptLearner(cfg, make_backbone(cfg))


class CountingBackbone:
    """Wraps `encode_text_embeddings` of a backbone to count and record its calls."""

    def __init__(self, backbone, monkeypatch):
        self.calls = []
        original = backbone.encode_text_embeddings

        def counted(embeddings, eot_index, deep_tokens=None):
            self.calls.append((embeddings, eot_index, deep_tokens))
            return original(embeddings, eot_index, deep_tokens)

        monkeypatch.setattr(backbone, "encode_text_embeddings", counted)


def test_templates():
    assert prompt_templates(3) == ("X X X object.", "X X X damaged object.")


@pytest.mark.parametrize("decouple,groups", [(True, 3), (False, 1)])
def test_groups_and_parameter_shapes(decouple, groups, make_backbone, backbone):
    learner = make(make_backbone, decouple_prompts=decouple)
    assert len(learner.groups) == groups
    width = backbone.text_width
    assert learner.context.shape == (groups, 2, 12, width)
    assert learner.deep_tokens.shape == (groups, 3, 4, width)  # prompt_depth 4 -> 3 layers
    assert {n for n, _ in learner.named_parameters()} == {"context", "deep_tokens"}
    # frozen template embeddings are buffers, not saved (rebuilt from the backbone)
    assert set(learner.state_dict()) == {"context", "deep_tokens"}


def test_prompt_depth_one_has_no_deep_tokens(make_backbone):
    learner = make(make_backbone, prompt_depth=1)
    assert learner.deep_tokens is None
    assert {n for n, _ in learner.named_parameters()} == {"context"}


def test_initialisation_std(make_backbone):
    learner = make(make_backbone, n_ctx=12)
    values = torch.cat([learner.context.flatten(), learner.deep_tokens.flatten()])
    assert abs(values.mean()) < 0.003
    assert 0.018 < values.std() < 0.022


def test_sequences_splice_the_contexts(make_backbone, backbone):
    learner = make(make_backbone)
    seq = learner.sequences()
    assert seq.shape == (6, 77, backbone.text_width)
    ids = backbone.tokenize(list(prompt_templates(12)))
    templates = backbone.token_embeddings(ids)
    for g in range(3):
        for s in range(2):
            row = seq[2 * g + s]  # group-major, normal first
            torch.testing.assert_close(row[1:13], learner.context[g, s], atol=0, rtol=0)
            torch.testing.assert_close(row[:1], templates[s, :1], atol=0, rtol=0)
            torch.testing.assert_close(row[13:], templates[s, 13:], atol=0, rtol=0)
    # the abnormal template is one word longer: "damaged"
    assert learner.eot_index.tolist() == [ids[0].argmax().item(), ids[1].argmax().item()]
    assert learner.eot_index[1] == learner.eot_index[0] + 1


@pytest.mark.parametrize("decouple,groups", [(True, 3), (False, 1)])
def test_one_batched_text_pass(decouple, groups, make_backbone, monkeypatch):
    cfg = LaRPConfig.tiny_random(decouple_prompts=decouple)
    bb = make_backbone(cfg)
    torch.manual_seed(0)
    learner = PromptLearner(cfg, bb)
    counter = CountingBackbone(bb, monkeypatch)
    text = learner(bb)
    assert len(counter.calls) == 1
    embeddings, eot, deep = counter.calls[0]
    assert embeddings.shape[0] == 2 * groups and eot.shape == (2 * groups,)
    # normal and abnormal of a group share the group's text-layer tokens
    for g in range(groups):
        assert torch.equal(deep[2 * g], learner.deep_tokens[g])
        assert torch.equal(deep[2 * g + 1], learner.deep_tokens[g])
    assert text.shape == (groups, 2, 64)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(groups, 2))


def test_batched_pass_equals_one_sequence_at_a_time(make_backbone, backbone):
    learner = make(make_backbone)
    text = learner(backbone)
    seq = learner.sequences()
    for g in range(3):
        for s in range(2):
            one = backbone.encode_text_embeddings(
                seq[2 * g + s : 2 * g + s + 1],
                learner.eot_index[s : s + 1],
                learner.deep_tokens[g : g + 1],
            )
            torch.testing.assert_close(text[g, s], F.normalize(one[0], dim=-1), atol=1e-5, rtol=0)
    # normal and abnormal embeddings differ, and so do the three groups
    assert (text[:, 0] - text[:, 1]).norm(dim=-1).min() > 1e-3
    assert (text[0] - text[1]).norm() > 1e-3 and (text[1] - text[2]).norm() > 1e-3


def test_groups_are_independent(make_backbone, backbone):
    learner = make(make_backbone)
    before = learner(backbone).detach()
    with torch.no_grad():
        # shallow group only (a random change: a constant shift would vanish in LayerNorm)
        learner.deep_tokens[1].add_(torch.randn_like(learner.deep_tokens[1]))
    after = learner(backbone).detach()
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert (after[1] - before[1]).abs().max() > 1e-3


def test_gradients_reach_context_and_deep_tokens(make_backbone, backbone):
    learner = make(make_backbone)
    learner(backbone)[:, 1].sum().backward()
    assert learner.context.grad is not None and learner.context.grad.abs().sum() > 0
    assert learner.deep_tokens.grad is not None and learner.deep_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize(
    "change,words",
    [
        ({"shallow_layers": (1, 5)}, "not feature layers"),
        ({"shallow_layers": ()}, "empty"),
        ({"shallow_layers": (1, 2, 3, 4)}, "deep prompt group"),
        ({"feature_layers": (2,), "shallow_layers": (2,)}, "deep prompt group"),
    ],
)
def test_partition_errors(change, words):
    with pytest.raises(ConfigError, match=words):
        LaRPConfig.tiny_random(**change)


@pytest.mark.parametrize("shallow", [(1,), (1, 2), (1, 2, 3), (2, 4)])
def test_partition_is_disjoint_and_covering(shallow):
    cfg = LaRPConfig.tiny_random(shallow_layers=shallow)
    assert set(cfg.shallow_layers).isdisjoint(cfg.deep_layers)
    assert sorted(cfg.shallow_layers + cfg.deep_layers) == list(cfg.feature_layers)
