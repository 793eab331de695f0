"""Image branch (paper §3.4): the text score, the per-image normal prototype and Eq. 18.

The prototype branch is inference-only and parameter-free, so its inputs (text score, q, μ) are
what evaluation stores: any (λ, top-k) can then be re-scored without running the model again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_score(global_feature: torch.Tensor, global_text: torch.Tensor, temperature: float):
    """Eq. 8: `softmax(cos(f_g, (ĝⁿ, ĝᵃ)) / τ)[abnormal]`; `global_text` is `[2, D]` unit."""
    feature = F.normalize(global_feature, dim=-1)
    logits = feature @ global_text.to(feature.dtype).t() / temperature
    return logits.float().softmax(dim=-1)[:, 1]


def prototype_deviation(
    q: torch.Tensor, patches: torch.Tensor, quantile: float = 0.5
) -> torch.Tensor:
    """Eqs. 16-17 with the SPEC §1.4 choices: μᵢ = 1 − cos(pᵢ, p_norm).

    `q` `[B, N]` mean layer response per patch, `patches` `[B, N, D]` last-layer features,
    L2-normalised here (SPEC §1.4) so that a patch's weight in `p_norm` is `1 − q` alone, not
    also its feature norm. The normal set is the patches with `q ≤ quantile(q)` per image,
    weighted by `1 − q` (lower anomaly response, more weight). If every weight is 0 (q ≡ 1) the
    prototype is the plain mean of the set rather than undefined.
    """
    patches = F.normalize(patches, dim=-1)
    threshold = torch.quantile(q.float(), quantile, dim=1, keepdim=True)
    in_set = (q <= threshold).to(patches.dtype)
    weights = in_set * (1.0 - q).to(patches.dtype)
    empty = weights.sum(dim=1, keepdim=True) <= 0
    weights = torch.where(empty, in_set, weights)
    prototype = (weights.unsqueeze(-1) * patches).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    cos = F.cosine_similarity(patches, prototype.unsqueeze(1).expand_as(patches), dim=-1)
    return 1.0 - cos


def auxiliary_map(q: torch.Tensor, deviation: torch.Tensor | None) -> torch.Tensor:
    """`½(q + clip(μ, 0, 1))`, or `q` alone when the prototype branch is off."""
    if deviation is None:
        return q
    return 0.5 * (q + deviation.clamp(0.0, 1.0))


def top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values per row of `[B, N]` (k capped at N)."""
    k = max(1, min(int(k), values.shape[1]))
    return values.topk(k, dim=1).values.mean(dim=1)


def final_score(s_text: torch.Tensor, s_map: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 18: `(s_text + λ·s_map) / (1 + λ)`.

    Not Algorithm 1's `(1−λ)s_text + λ s_map`, which would turn negative for the λ up to 4 that the
    paper's Table 5 sweeps.
    """
    return (s_text + lam * s_map) / (1.0 + lam)


def image_scores(
    s_text: torch.Tensor,
    q: torch.Tensor,
    deviation: torch.Tensor | None,
    lam: float,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_map, s_final) from stored per-image outputs; the one place Eq. 18 is assembled."""
    s_map = top_k_mean(auxiliary_map(q.flatten(1), _flat(deviation)), top_k)
    return s_map, final_score(s_text, s_map, lam)


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.flatten(1)
