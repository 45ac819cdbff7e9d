"""TopK trainer: hand-written gradients against autograd, planted-feature recovery, resume."""

from __future__ import annotations

import pytest
import torch

from app.engine.train import (
    TrainConfig,
    geometric_median,
    lr_at,
    topk_loss_and_grads,
    train_topk,
)
from app.errors import ConfigError


def planted_data(n_tokens: int, *, d: int = 48, m: int = 96, active: int = 4, seed: int = 0):
    """Tokens that are sparse positive mixtures of m planted unit directions, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(m, d, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    which = torch.rand(n_tokens, m, generator=gen).topk(active, dim=1).indices
    coef = torch.rand(n_tokens, active, generator=gen) * 1.5 + 0.5
    codes = torch.zeros(n_tokens, m).scatter_(1, which, coef)
    x = codes @ features + 0.01 * torch.randn(n_tokens, d, generator=gen) + 0.3
    return x, features


def reference_loss(x, params, *, k, variance, dead, k_aux, aux_coef):
    """The TopK + AuxK loss written densely, for autograd to differentiate."""
    pre = (x - params["b_dec"]) @ params["W_enc_T"].t() + params["b_enc"]
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    recon = z @ params["W_dec"] + params["b_dec"]
    loss = ((recon - x) ** 2).sum() / (x.shape[0] * variance)
    residual = (x - recon).detach()
    aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals.relu())
    aux = ((z_aux @ params["W_dec"] - residual) ** 2).sum()
    return loss + aux_coef * aux / ((residual - residual.mean(0)) ** 2).sum()


def test_gradients_match_autograd_on_the_dense_formula():
    gen = torch.Generator().manual_seed(1)
    b, d, n, k = 24, 7, 30, 4
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    params = {
        "W_enc_T": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "b_enc": 0.1 * torch.randn(n, generator=gen, dtype=torch.float64),
        "W_dec": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "b_dec": 0.1 * torch.randn(d, generator=gen, dtype=torch.float64),
    }
    dead = torch.zeros(n, dtype=torch.bool)
    dead[[0, 3, 8, 11, 19, 25, 29]] = True
    terms = topk_loss_and_grads(x, params, k=k, variance=1.7, dead=dead, k_aux=5, aux_coef=0.25)

    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    ref = reference_loss(x, leaves, k=k, variance=1.7, dead=dead, k_aux=5, aux_coef=0.25)
    ref.backward()
    assert terms.loss == pytest.approx(ref.item(), rel=1e-12)
    assert terms.aux_loss > 0
    for name, leaf in leaves.items():
        torch.testing.assert_close(terms.grads[name], leaf.grad, rtol=1e-10, atol=1e-12)


def test_geometric_median_minimises_the_sum_of_distances():
    gen = torch.Generator().manual_seed(2)
    points = torch.cat([torch.randn(200, 3, generator=gen), 50 + torch.randn(20, 3, generator=gen)])
    median = geometric_median(points).double()

    def cost(c):
        return (points.double() - c).norm(dim=1).sum()

    assert cost(median) < cost(points.double().mean(0))  # the outliers pull the mean away
    for _ in range(20):
        nudged = median + 0.05 * torch.randn(3, generator=gen, dtype=torch.float64)
        assert cost(median) <= cost(nudged) + 1e-6


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1, decay_frac=0.2)
    lrs = [lr_at(s, total_steps=100, cfg=cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:], strict=False))


def test_training_recovers_planted_directions():
    x, features = planted_data(16384)
    cfg = TrainConfig(d_sae=192, k=4, epochs=3, batch_size=256, lr=3e-3, dead_tokens=4096)
    result = train_topk(x, cfg=cfg, progress=False)
    w_dec = result.weights.W_dec
    torch.testing.assert_close(w_dec.norm(dim=1), torch.ones(192))
    best_cos = (features @ w_dec.t()).max(dim=1).values
    assert (best_cos >= 0.9).float().mean() >= 0.9
    # the folded weights reconstruct raw (unnormalised) inputs
    recon = result.weights.forward(x[:2048])
    ev = 1 - ((x[:2048] - recon) ** 2).sum() / ((x[:2048] - x[:2048].mean(0)) ** 2).sum()
    assert ev > 0.9
    assert result.summary["explained_variance"] > 0.9


def test_training_is_deterministic_and_resumes_to_identical_weights(tmp_path):
    x, _ = planted_data(4096, d=16, m=32, seed=3)
    cfg = TrainConfig(d_sae=48, k=3, epochs=2, batch_size=128, lr=3e-3, dead_tokens=512,
                      checkpoint_every=7, seed=5)
    full = train_topk(x, cfg=cfg, progress=False)
    again = train_topk(x, cfg=cfg, progress=False)

    class Killed(Exception):
        pass

    def kill_at_step_23(step, _metrics):
        if step == 23:
            raise Killed

    with pytest.raises(Killed):
        train_topk(x, cfg=cfg, checkpoint_dir=tmp_path, progress=False, on_step=kill_at_step_23)
    steps_after_resume = []
    resumed = train_topk(x, cfg=cfg, checkpoint_dir=tmp_path, progress=False,
                         on_step=lambda step, _m: steps_after_resume.append(step))
    assert steps_after_resume[0] == 22  # last checkpoint at step 21, so it picks up at 22
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(full.weights, name), getattr(again.weights, name))
        assert torch.equal(getattr(full.weights, name), getattr(resumed.weights, name))

    other_seed = train_topk(x, cfg=TrainConfig(**{**cfg.__dict__, "seed": 6,
                                                  "checkpoint_every": 0}), progress=False)
    assert not torch.equal(full.weights.W_dec, other_seed.weights.W_dec)


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    x, _ = planted_data(1024, d=8, m=16)
    cfg = TrainConfig(d_sae=16, k=2, epochs=1, batch_size=128, checkpoint_every=2)
    train_topk(x, cfg=cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        train_topk(x, cfg=TrainConfig(d_sae=16, k=3, epochs=1, batch_size=128,
                                      checkpoint_every=2), checkpoint_dir=tmp_path,
                   progress=False)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="k must be"):
        TrainConfig(d_sae=8, k=9)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train_topk(torch.randn(10, 4), cfg=TrainConfig(d_sae=8, k=2, batch_size=64),
                   progress=False)


def test_should_stop_checkpoints_the_step_and_says_where_it_resumes(tmp_path):
    from app.errors import Interrupted

    x = torch.randn(2048, 16)
    cfg = TrainConfig(d_sae=32, k=4, epochs=2, batch_size=128, checkpoint_every=1000)
    steps = {"n": 0}

    def count(step, metrics):
        steps["n"] = step

    with pytest.raises(Interrupted, match="training checkpoint at step 5 of 32"):
        train_topk(x, cfg=cfg, checkpoint_dir=tmp_path, progress=False, on_step=count,
                   should_stop=lambda: steps["n"] >= 4)  # asked during step 5
    said = []
    resumed = train_topk(x, cfg=cfg, checkpoint_dir=tmp_path, progress=False, log=said.append)
    assert said and said[0].startswith("training: resuming at step 5 of 32")
    full = train_topk(x, cfg=cfg, progress=False)
    assert torch.equal(resumed.weights.W_dec, full.weights.W_dec)
