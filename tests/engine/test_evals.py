"""SAE evaluations against textbook formulas and hand-built SAEs on tiny-llama."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.engine.evals import (
    ReconstructionStats,
    ce_loss_recovered,
    ce_loss_sums,
    evaluate_sae,
)
from app.engine.sae import SAE, SAEConfig
from app.engine.tiny import build_tiny

HOOK = "blocks.2.hook_resid_post"


def test_reconstruction_stats_equal_the_textbook_formulas_over_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(300, 5))
    x_hat = x + rng.normal(0, 1.0, size=x.shape)
    acts = np.zeros((300, 8))
    acts[:, 0] = 1.0  # fires everywhere: dense
    acts[:150, 1] = 2.0  # half the tokens: dense
    acts[:10, 2] = 0.5  # 10 / 300 < 10%: not dense
    acts[5, 3] = -1.0  # negative is not firing; latents 3..7 are dead
    stats = ReconstructionStats(d_sae=8)
    for s in (slice(0, 7), slice(7, 120), slice(120, 300)):
        stats.update(torch.tensor(x[s]), torch.tensor(x_hat[s]), torch.tensor(acts[s]))
    out = stats.finalize(dense_threshold=0.1)

    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert out["explained_variance"] == pytest.approx(ev, rel=1e-12)
    assert out["normalized_mse"] == pytest.approx(1 - ev, rel=1e-12)
    assert out["mse"] == pytest.approx(((x - x_hat) ** 2).mean(), rel=1e-12)
    assert out["l0"] == pytest.approx((1 * 300 + 150 + 10) / 300)
    assert (out["n_dead"], out["n_dense"], out["n_tokens"]) == (5, 2, 300)


def test_ce_loss_sums_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    tokens = torch.randint(0, 11, (2, 6), generator=gen)
    special = torch.zeros(2, 6, dtype=torch.bool)
    special[:, 0] = True  # BOS
    special[1, 4:] = True  # padding at the end of the second row
    total, count = ce_loss_sums(logits, tokens, special)
    expected, n = 0.0, 0
    for b in range(2):
        for p in range(5):
            if special[b, p] or special[b, p + 1]:
                continue
            probs = torch.softmax(logits[b, p].double(), dim=0)
            expected -= math.log(probs[tokens[b, p + 1]])
            n += 1
    assert count == n == 4 + 2
    assert total == pytest.approx(expected, rel=1e-5)


def test_ce_loss_recovered_formula():
    assert ce_loss_recovered(clean=2.0, sae=2.5, ablated=7.0) == pytest.approx(0.9)
    assert ce_loss_recovered(clean=2.0, sae=2.0, ablated=7.0) == 1.0
    assert ce_loss_recovered(clean=2.0, sae=7.0, ablated=7.0) == 0.0


@pytest.fixture(scope="module")
def lm():
    return build_tiny("tiny-llama")


@pytest.fixture(scope="module")
def batch(lm):
    texts = ["The quick brown fox jumps over the lazy dog. " * 3,
             "def add(a, b):\n    return a + b\n",
             "Python is a programming language that lets you work quickly."]
    rows = []
    for text in texts:
        ids = lm.tokenize(text)[:24]
        rows.append(ids + [0] * (24 - len(ids)))  # right padding with <|endoftext|> (id 0)
    tokens = np.array(rows, dtype=np.int32)
    special = np.isin(tokens, list(lm.special_token_ids))
    return tokens, special


def _topk_sae(w_enc, w_dec, *, k):
    d_in, d_sae = w_enc.shape
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name=HOOK,
                    model_name="tiny-llama")
    return SAE.from_tensors(cfg, {"W_enc": w_enc, "b_enc": torch.zeros(d_sae), "W_dec": w_dec,
                                  "b_dec": torch.zeros(d_in)})


def test_a_lossless_sae_recovers_all_of_the_loss(lm, batch):
    # W_enc = [I, -I], W_dec = [I; -I], k = d_in: the positive part of +x or -x per dimension
    # is picked, so the decoder returns x exactly.
    eye = torch.eye(lm.d_model)
    sae = _topk_sae(torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0), k=lm.d_model)
    tokens, special = batch
    out = evaluate_sae(sae, lm, tokens, special, batch_size=2, progress=False)
    assert out["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert out["ce_loss_sae"] == pytest.approx(out["ce_loss_clean"], abs=1e-6)
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert abs(out["ce_loss_ablated"] - out["ce_loss_clean"]) > 1e-3  # random model: any sign
    assert out["n_tokens"] == int((~special).sum())
    assert out["l0"] == pytest.approx(lm.d_model, abs=0.01)


def test_a_zero_sae_equals_ablation_and_keeps_special_positions(lm, batch):
    sae = _topk_sae(torch.zeros(lm.d_model, 16), torch.zeros(16, lm.d_model), k=4)
    tokens, special = batch
    out = evaluate_sae(sae, lm, tokens, special, batch_size=3, progress=False)
    assert out["ce_loss_sae"] == pytest.approx(out["ce_loss_ablated"], abs=1e-6)
    assert out["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert (out["n_dead"], out["l0"]) == (16, 0.0)

    # Reference by hand: textbook EV of x_hat = 0 on the counted positions, and the ablation CE
    # when only ordinary positions are zeroed (special ones keep their activation).
    ids = torch.from_numpy(tokens).long()
    mask = torch.from_numpy(special)
    x = lm.run_to_hook(ids, HOOK)[~mask].double()
    assert out["explained_variance"] == pytest.approx(
        float(1 - (x**2).sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-9)

    def zero_where(keep):
        def fn(t):
            return torch.where(keep[..., None], t, torch.zeros_like(t))
        return fn

    def mean_ce(fn):
        with lm.hooks({HOOK: fn}):
            logits = lm.logits(ids)
        total, count = ce_loss_sums(logits, ids, mask)
        return total / count

    assert out["ce_loss_ablated"] == pytest.approx(mean_ce(zero_where(mask)), rel=1e-6)
    everything_zeroed = mean_ce(zero_where(torch.zeros_like(mask)))
    assert abs(everything_zeroed - out["ce_loss_ablated"]) > 1e-4
