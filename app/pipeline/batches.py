"""One batch of sequences through activations, SAE and accumulators: what a build's stream and a
sharded build's workers both run, so both cut and feed batches alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from app.pipeline.accumulators import FeatureAccumulators
from app.pipeline.build_options import BuildOptions

if TYPE_CHECKING:
    from app.engine.sae import SAE
    from app.pipeline.build_inputs import ActivationSource


def new_accumulators(d_sae: int, *, ctx: int, opts: BuildOptions) -> FeatureAccumulators:
    return FeatureAccumulators(d_sae, ctx=ctx, n_top=opts.n_top, window_len=opts.window_len,
                               n_bands=opts.n_bands, per_band=opts.per_band, seed=opts.seed)


def feed_batch(*, acc: FeatureAccumulators, sae: SAE, source: ActivationSource,
               tokens: np.ndarray, special_mask: np.ndarray, start: int, stop: int) -> None:
    """Sequences [start, stop): activations, SAE code (on the SAE's device), accumulators (on
    the CPU, float32)."""
    with torch.inference_mode():
        acts = source.batch(tokens, start, stop)
        if sae.cfg.architecture == "topk":  # no [tokens, d_sae] code at all (encode_sparse)
            values, indices = sae.encode_sparse(acts)
            acc.update_sparse(values.cpu(), indices.cpu(),
                              special_mask=special_mask[start:stop],
                              seq_index=np.arange(start, stop))
        else:
            acc.update(sae.encode(acts).cpu(), special_mask=special_mask[start:stop],
                       seq_index=np.arange(start, stop))
