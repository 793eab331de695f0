"""Layer-aware prompt learner (paper §3.2): global, shallow and deep prompt groups.

Each group owns a normal and an abnormal learnable context (in front of fixed templates) and one
set of text-layer tokens shared by both sequences. All sequences go through the frozen text tower
in one batched pass, so decoupling the prompts costs one batch of 6 instead of 2, not 3 passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from larp.backbone import FrozenBackbone
from larp.config import LaRPConfig
from larp.errors import BackboneError

GROUPS_DECOUPLED = ("global", "shallow", "deep")
GROUPS_SHARED = ("global",)
STATES = ("normal", "abnormal")


def prompt_templates(n_ctx: int) -> tuple[str, str]:
    """Object-agnostic templates: `n_ctx` placeholder words, then the state words."""
    placeholders = " ".join(["X"] * n_ctx)
    return f"{placeholders} object.", f"{placeholders} damaged object."


class PromptLearner(nn.Module):
    """Learnable contexts and text-layer tokens; `forward` gives `[G, 2, D]` unit text embeddings.

    With `decouple_prompts` off there is one group that serves the global feature and every layer
    (AnomalyCLIP).
    """

    def __init__(self, config: LaRPConfig, backbone: FrozenBackbone) -> None:
        super().__init__()
        self.groups = GROUPS_DECOUPLED if config.decouple_prompts else GROUPS_SHARED
        self.n_ctx = config.n_ctx
        width = backbone.text_width
        token_ids = backbone.tokenize(list(prompt_templates(config.n_ctx)))
        x_id = int(backbone.tokenize(["X"])[0, 1])
        if not bool((token_ids[:, 1 : 1 + self.n_ctx] == x_id).all()):
            raise BackboneError(
                f"the tokenizer of {config.backbone!r} does not map the {self.n_ctx} context "
                "placeholders to one token each; LaRP's prompts need that"
            )
        # Frozen template embeddings and EOT positions; not saved (rebuilt from the backbone).
        self.register_buffer("template_embeddings", backbone.token_embeddings(token_ids), False)
        self.register_buffer("eot_index", token_ids.argmax(dim=-1), False)
        groups = len(self.groups)
        std = config.prompt_init_std
        self.context = nn.Parameter(torch.randn(groups, 2, self.n_ctx, width) * std)
        depth = config.prompt_depth - 1
        if depth > 0:
            self.deep_tokens = nn.Parameter(
                torch.randn(groups, depth, config.n_deep_tokens, width) * std
            )
        else:
            self.register_parameter("deep_tokens", None)

    def sequences(self) -> torch.Tensor:
        """Token embeddings of all `G*2` sequences with the learned contexts spliced in."""
        groups = self.context.shape[0]
        templates = self.template_embeddings.unsqueeze(0).expand(groups, -1, -1, -1)
        spliced = torch.cat(
            [templates[:, :, :1], self.context, templates[:, :, 1 + self.n_ctx :]], dim=2
        )
        return spliced.flatten(0, 1)  # [G*2, T, W], group-major, normal first

    def forward(self, backbone: FrozenBackbone) -> torch.Tensor:
        groups = self.context.shape[0]
        eot = self.eot_index.repeat(groups)
        deep = None
        if self.deep_tokens is not None:
            deep = self.deep_tokens.repeat_interleave(2, dim=0)  # shared by normal and abnormal
        features = backbone.encode_text_embeddings(self.sequences(), eot, deep)
        return F.normalize(features, dim=-1).view(groups, 2, -1)
