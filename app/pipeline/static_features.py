"""Per-feature facts that need only weights: logit effects and nearest decoder neighbours.

Both are computed over chunks of features so memory stays at chunk x vocab (or chunk x d_sae),
whatever the SAE width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class LogitEffects:
    pos_ids: np.ndarray  # int32 [d_sae, n] tokens the direction promotes most, largest first
    pos_values: np.ndarray  # float32 [d_sae, n]
    neg_ids: np.ndarray  # int32 [d_sae, n] tokens it suppresses most, most negative first
    neg_values: np.ndarray  # float32 [d_sae, n]


def _chunk_rows(budget_elems: int, width: int) -> int:
    return max(1, budget_elems // max(width, 1))


@torch.no_grad()
def logit_effects(*, w_dec: Tensor, norm_scale: Tensor, w_u: Tensor, n: int = 10,
                  budget_elems: int = 1 << 24) -> LogitEffects:
    """Direct logit effect of each decoder direction: ``(W_dec[f] * norm_scale) @ W_U``.

    This is the first-order effect on the logits of adding the feature's direction to the
    residual stream, through the final norm's multiplicative weight (the normalisation's
    per-token 1/rms is a positive common factor, so it does not change the ranking). Top and
    bottom ``n`` tokens per feature; chunks of features hold at most ``budget_elems`` logits.
    """
    d_sae = w_dec.shape[0]
    vocab = w_u.shape[1]
    n = min(n, vocab)
    scaled_u = (norm_scale.float()[:, None] * w_u.float())  # fold the scale once: [d_in, vocab]
    out = LogitEffects(
        pos_ids=np.zeros((d_sae, n), dtype=np.int32), pos_values=np.zeros((d_sae, n), np.float32),
        neg_ids=np.zeros((d_sae, n), dtype=np.int32), neg_values=np.zeros((d_sae, n), np.float32))
    step = _chunk_rows(budget_elems, vocab)
    for a in range(0, d_sae, step):
        b = min(a + step, d_sae)
        effects = w_dec[a:b].float() @ scaled_u
        top = effects.topk(n, dim=1)
        bottom = effects.topk(n, dim=1, largest=False)
        out.pos_ids[a:b] = top.indices.numpy()
        out.pos_values[a:b] = top.values.numpy()
        out.neg_ids[a:b] = bottom.indices.numpy()
        out.neg_values[a:b] = bottom.values.numpy()
    return out


@torch.no_grad()
def decoder_neighbours(w_dec: Tensor, *, n: int = 10, budget_elems: int = 1 << 24
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` other features whose decoder directions have the highest cosine similarity.

    Returns (indices int32 [d_sae, n], cosines float32 [d_sae, n]), most similar first. A
    feature is never its own neighbour; a zero decoder row has cosine 0 with everything.
    """
    d_sae = w_dec.shape[0]
    n = min(n, d_sae - 1)
    w = w_dec.float()
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx = np.zeros((d_sae, n), dtype=np.int32)
    cos = np.zeros((d_sae, n), dtype=np.float32)
    step = _chunk_rows(budget_elems, d_sae)
    for a in range(0, d_sae, step):
        b = min(a + step, d_sae)
        sims = unit[a:b] @ unit.T
        sims[torch.arange(b - a), torch.arange(a, b)] = -torch.inf
        top = sims.topk(n, dim=1)
        idx[a:b] = top.indices.numpy()
        cos[a:b] = top.values.numpy()
    return idx, cos
