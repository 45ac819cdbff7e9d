"""TopK SAE trainer (Gao et al. 2024) over cached activations, with checkpoints and resume.

The model, following "Scaling and evaluating sparse autoencoders" (Gao et al. 2024):

    pre = (x - b_dec) @ W_enc + b_enc      z = ReLU(TopK_k(pre))      x_hat = z @ W_dec + b_dec

* Decoder rows have unit norm: the gradient component parallel to each row is projected out
  before the Adam step and rows are renormalised after it.
* ``b_dec`` starts at the geometric median of (a sample of) the data; ``W_enc`` starts as
  ``W_dec`` transposed.
* AuxK: latents that have not fired for ``dead_tokens`` training tokens are "dead"; the top
  ``k_aux`` (default d_in / 2) of their pre-activations reconstruct the main residual
  ``x - x_hat``, weighted by ``aux_coef`` (default 1/32), which revives them.
* Adam (eps 6.25e-10 as in the paper) with linear warm-up, then linear decay to zero over the
  last ``decay_frac`` of the steps.
* Optional input normalisation (mean ||x|| scaled to sqrt(d_in)); because TopK and ReLU commute
  with a positive scale, it is folded back at the end into ``b_enc``/``b_dec`` so the saved SAE
  reads raw activations, its decoder rows stay unit-norm and feature activations are in the
  model's own units (saved with ``normalize_activations: "none"``).

Gradients are written out by hand rather than taken with autograd: the only dense product is the
encoder GEMM; everything after the TopK touches k (or k_aux) latents per token through sparse
CSR products instead of a dense [tokens, d_sae] backward (bench/train.py compares a training step
with a bare autograd forward+backward).
``tests/engine/test_train.py`` checks these gradients against autograd on the dense formula.

Training is deterministic under ``seed`` (the epoch order is a function of (seed, epoch)), and a
killed run resumes from its last checkpoint to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from app.errors import ConfigError, Interrupted

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of one TopK SAE training run (everything that changes the result)."""

    d_sae: int = 4096
    k: int = 32
    epochs: int = 4
    batch_size: int = 1024  # tokens per Adam step
    lr: float = 1e-3
    warmup_frac: float = 0.05
    decay_frac: float = 0.3
    k_aux: int | None = None  # None: d_in // 2
    aux_coef: float = 1 / 32
    dead_tokens: int = 100_000  # a latent silent for this many training tokens is dead
    normalize: bool = True  # train on x * sqrt(d_in) / mean||x||, folded back at the end
    b_dec_init: str = "geometric_median"  # or "mean" or "zeros"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    seed: int = 0
    checkpoint_every: int = 100  # steps; 0 disables checkpoints

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]  # JSON gives lists
        if self.k < 1 or self.k > self.d_sae:
            raise ConfigError(f"k must be between 1 and d_sae={self.d_sae} (got {self.k})")
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("batch size and epochs must be positive")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(f"b_dec_init must be geometric_median, mean or zeros "
                              f"(got {self.b_dec_init!r})")


@dataclass
class TopKWeights:
    """Weights of a TopK SAE in raw activation units (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    k: int

    def encode(self, x: Tensor) -> Tensor:
        pre = (x.float() - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x) @ self.W_dec + self.b_dec


@dataclass
class TrainResult:
    weights: TopKWeights
    scale: float  # input normalisation factor used while training (1.0 when off)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged step
    summary: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- gradient maths


def _csr(idx: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """[rows, n_cols] CSR matrix with values[r, j] at column idx[r, j] (idx sorted per row)."""
    rows, per_row = idx.shape
    crow = torch.arange(0, rows * per_row + 1, per_row, dtype=torch.int64)
    with warnings.catch_warnings():
        # CSR support is "beta" in torch; the few operations used here are checked by the tests.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, idx.reshape(-1), values.reshape(-1),
                                       (rows, n_cols), check_invariants=False)


def _sorted_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    vals, idx = pre.topk(k, dim=1)
    idx, order = idx.sort(dim=1)  # CSR wants sorted columns; the order within a row is free
    return vals.gather(1, order), idx


def _gathered_dots(idx: Tensor, left: Tensor, right_rows: Tensor) -> Tensor:
    """out[b, j] = left[b] . right_rows[idx[b, j]] without forming left @ right_rows.T."""
    pattern = _csr(idx, torch.ones(idx.shape, dtype=left.dtype), right_rows.shape[0])
    return torch.sparse.sampled_addmm(pattern, left, right_rows.t(), beta=0.0).values().reshape(
        idx.shape)


@dataclass
class StepTerms:
    """Loss values, gradients and the statistics of one batch."""

    loss: float
    mse_loss: float
    aux_loss: float
    grads: dict[str, Tensor]
    fired: Tensor  # bool [d_sae]: latents active (> 0) on some token of the batch
    sq_err: float  # sum ||x - x_hat||^2
    sq_dev: float  # sum ||x - mean_batch(x)||^2
    l0: float  # mean active latents per token


def topk_loss_and_grads(
    x: Tensor,
    params: dict[str, Tensor],
    *,
    k: int,
    variance: float,
    dead: Tensor | None = None,
    k_aux: int = 0,
    aux_coef: float = 0.0,
) -> StepTerms:
    """Loss and hand-written gradients of a TopK SAE (+ AuxK) on one batch x [B, d_in].

    loss = sum_b ||x_hat_b - x_b||^2 / (B * variance)
         + aux_coef * sum_b ||e_hat_b - e_b||^2 / sum_b ||e_b - mean(e)||^2
    with e = x - x_hat (a constant for the auxiliary term) and e_hat decoded (without b_dec)
    from the top ``k_aux`` pre-activations among ``dead`` latents. ``params`` holds W_enc_T
    [d_sae, d_in] (the encoder stored row-per-latent), b_enc, W_dec, b_dec.
    """
    w_enc_t, b_enc, w_dec, b_dec = (params[n] for n in ("W_enc_T", "b_enc", "W_dec", "b_dec"))
    n_latents = w_enc_t.shape[0]
    batch = x.shape[0]
    centred = x - b_dec
    pre = torch.addmm(b_enc, centred, w_enc_t.t())
    vals, idx = _sorted_topk(pre, k)
    acts = vals.clamp_min(0)
    # embedding_bag sums the k chosen decoder rows per token without a dense [B, d_sae] code.
    recon = torch.nn.functional.embedding_bag(idx, w_dec, per_sample_weights=acts,
                                              mode="sum") + b_dec
    err = recon - x
    sq_err = float(err.pow(2).sum())
    mse_loss = sq_err / (batch * variance)

    # Main term. d loss / d x_hat = g; through the decoder and back through the TopK values.
    g = err * (2.0 / (batch * variance))
    grad_w_dec = _csr(idx, acts, n_latents).t() @ g
    grad_b_dec = g.sum(0)
    grad_vals = _gathered_dots(idx, g, w_dec) * (vals > 0)
    grad_w_enc_t = _csr(idx, grad_vals, n_latents).t() @ centred
    grad_b_enc = torch.zeros_like(b_enc).index_add_(0, idx.reshape(-1), grad_vals.reshape(-1))

    aux_loss = 0.0
    if dead is not None and aux_coef > 0 and k_aux > 0:
        dead_ids = dead.nonzero().squeeze(1)
        residual = -err  # x - x_hat, held constant
        res_dev = float((residual - residual.mean(0)).pow(2).sum())
        if dead_ids.numel() > 0 and res_dev > 0:
            # Dense over the dead latents only: a few hundred columns at most once training has
            # settled, so plain GEMMs beat sparse bookkeeping for k_aux (= d_in / 2) per token.
            pre_dead = pre.index_select(1, dead_ids)
            aux_vals, aux_local = pre_dead.topk(min(k_aux, dead_ids.numel()), dim=1)
            aux_codes = torch.zeros_like(pre_dead).scatter_(1, aux_local, aux_vals.clamp_min(0))
            w_dec_dead = w_dec.index_select(0, dead_ids)
            aux_err = aux_codes @ w_dec_dead - residual
            aux_loss = aux_coef * float(aux_err.pow(2).sum()) / res_dev
            h = aux_err * (2.0 * aux_coef / res_dev)
            grad_w_dec.index_add_(0, dead_ids, aux_codes.t() @ h)
            # TopK and ReLU pass the gradient only where a latent was chosen and positive.
            grad_codes = (h @ w_dec_dead.t()) * (aux_codes > 0)
            grad_w_enc_t.index_add_(0, dead_ids, grad_codes.t() @ centred)
            grad_b_enc.index_add_(0, dead_ids, grad_codes.sum(0))

    # pre = (x - b_dec) @ W_enc + b_enc: b_dec also reaches the loss through the encoder.
    grad_b_dec -= grad_b_enc @ w_enc_t

    fired = torch.zeros(n_latents, dtype=torch.bool)
    fired[idx[acts > 0]] = True
    return StepTerms(
        loss=mse_loss + aux_loss, mse_loss=mse_loss, aux_loss=aux_loss,
        grads={"W_enc_T": grad_w_enc_t, "b_enc": grad_b_enc, "W_dec": grad_w_dec,
               "b_dec": grad_b_dec},
        fired=fired, sq_err=sq_err, sq_dev=float((x - x.mean(0)).pow(2).sum()),
        l0=float((acts > 0).sum()) / batch,
    )


def geometric_median(points: Tensor, *, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.float()


def lr_at(step: int, *, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, constant, then linear decay to 0 over the last decay_frac."""
    warmup = max(1, round(cfg.warmup_frac * total_steps))
    decay = round(cfg.decay_frac * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_start = total_steps - decay
    if decay > 0 and step >= decay_start:
        return cfg.lr * max(0.0, (total_steps - step) / decay)
    return cfg.lr


# ------------------------------------------------------------------------------------ training


def _sample_rows(n_rows: int, n_sample: int) -> np.ndarray:
    """Evenly spaced rows: a deterministic sample spread over the whole data."""
    return np.unique(np.linspace(0, n_rows - 1, num=min(n_rows, n_sample)).astype(np.int64))


def _as_rows(data: np.ndarray | Tensor, rows: np.ndarray | Tensor) -> Tensor:
    if isinstance(data, Tensor):
        return data[torch.as_tensor(rows)].float()
    return torch.from_numpy(np.ascontiguousarray(data[np.asarray(rows)], dtype=np.float32))


def _init_params(d_in: int, cfg: TrainConfig, b_dec: Tensor) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    w_dec = torch.randn(cfg.d_sae, d_in, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return {"W_enc_T": w_dec.clone(), "b_enc": torch.zeros(cfg.d_sae), "W_dec": w_dec,
            "b_dec": b_dec.clone()}


def _epoch_order(n_rows: int, *, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


def train_topk(
    data: np.ndarray | Tensor,
    *,
    cfg: TrainConfig,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a TopK SAE on ``data`` [n_tokens, d_in] (float16/32 array or tensor, e.g. a memmap).

    Special-token positions must already be left out of ``data``. With ``checkpoint_dir`` the
    state is saved every ``cfg.checkpoint_every`` steps and a later call with the same data and
    config resumes from it. ``on_step(step, metrics)`` runs after each step (tests use it to
    interrupt a run). When ``should_stop()`` turns true (Ctrl-C) the step in progress ends, the
    state is checkpointed and ``Interrupted`` says where a later call resumes; ``log`` hears it.
    """
    n_rows, d_in = int(data.shape[0]), int(data.shape[1])
    steps_per_epoch = n_rows // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"only {n_rows} training tokens, fewer than one batch of "
                          f"{cfg.batch_size}; raise --tokens")
    total_steps = steps_per_epoch * cfg.epochs
    k_aux = cfg.k_aux if cfg.k_aux is not None else d_in // 2

    sample = _as_rows(data, _sample_rows(n_rows, 20_000))
    scale = float(math.sqrt(d_in) / sample.norm(dim=1).mean()) if cfg.normalize else 1.0
    sample = sample * scale
    if cfg.b_dec_init == "geometric_median":
        b_dec0 = geometric_median(sample)
    elif cfg.b_dec_init == "mean":
        b_dec0 = sample.mean(0)
    else:
        b_dec0 = torch.zeros(d_in)
    variance = float((sample - sample.mean(0)).pow(2).sum(1).mean())

    params = _init_params(d_in, cfg, b_dec0)
    for p in params.values():
        p.requires_grad_(False)
    optim = torch.optim.Adam(list(params.values()), lr=cfg.lr, betas=cfg.adam_betas,
                             eps=cfg.adam_eps, foreach=False)
    silent_tokens = torch.zeros(cfg.d_sae, dtype=torch.int64)
    history: list[dict[str, float]] = []
    start_step = 0
    run_key = {"cfg": asdict(cfg), "n_rows": n_rows, "d_in": d_in}
    ckpt_path = None
    if checkpoint_dir is not None and cfg.checkpoint_every > 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = checkpoint_dir / CHECKPOINT_NAME
        if ckpt_path.exists():
            state = torch.load(ckpt_path, weights_only=False)
            if state["run_key"] != run_key:
                raise ConfigError(f"{ckpt_path} belongs to a run with other settings; delete "
                                  "it to start over")
            for name, value in state["params"].items():
                params[name].copy_(value)
            optim.load_state_dict(state["optim"])
            silent_tokens = state["silent_tokens"]
            history = state["history"]
            start_step = state["step"]
            scale, variance = state["scale"], state["variance"]
            if log is not None:
                log(f"training: resuming at step {start_step:,} of {total_steps:,} "
                    f"(checkpoint {ckpt_path})")

    bar = _progress_bar(total_steps * cfg.batch_size, start_step * cfg.batch_size, progress)
    smooth: dict[str, float] = {}
    t0 = time.perf_counter()
    order, order_epoch = None, -1
    for step in range(start_step, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(n_rows, seed=cfg.seed, epoch=epoch), epoch
        rows = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size].sort().values
        x = _as_rows(data, rows.numpy()) * scale

        dead = silent_tokens >= cfg.dead_tokens
        terms = topk_loss_and_grads(x, params, k=cfg.k, variance=variance, dead=dead,
                                    k_aux=k_aux, aux_coef=cfg.aux_coef)
        w_dec = params["W_dec"]
        grad_dec = terms.grads["W_dec"]
        # Keep the step tangent to the unit sphere of each decoder row.
        grad_dec -= (grad_dec * w_dec).sum(1, keepdim=True) * w_dec
        for name, p in params.items():
            p.grad = terms.grads[name]
        for group in optim.param_groups:
            group["lr"] = lr_at(step, total_steps=total_steps, cfg=cfg)
        optim.step()
        w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

        silent_tokens += cfg.batch_size
        silent_tokens[terms.fired] = 0
        nmse = terms.sq_err / max(terms.sq_dev, 1e-12)
        metrics = {"step": step + 1, "loss": terms.loss, "aux_loss": terms.aux_loss,
                   "nmse": nmse, "explained_variance": 1.0 - nmse, "l0": terms.l0,
                   "dead_frac": float(dead.float().mean()),
                   "lr": optim.param_groups[0]["lr"]}
        for key in ("nmse", "explained_variance", "l0"):
            smooth[key] = metrics[key] if key not in smooth else 0.9 * smooth[key] + 0.1 * metrics[
                key]
        if (step + 1) % 10 == 0 or step + 1 == total_steps:
            history.append(metrics)
        if bar is not None:
            bar.update(cfg.batch_size)
            bar.set_postfix(nmse=f"{smooth['nmse']:.3f}", ev=f"{smooth['explained_variance']:.3f}",
                            l0=f"{smooth['l0']:.1f}", dead=f"{metrics['dead_frac']:.3f}",
                            refresh=False)
        stop = should_stop is not None and should_stop()
        if ckpt_path is not None and ((step + 1) % cfg.checkpoint_every == 0
                                      or step + 1 == total_steps or stop):
            _save_checkpoint(ckpt_path, {
                "run_key": run_key, "step": step + 1,
                "params": {n: p.clone() for n, p in params.items()},
                "optim": optim.state_dict(), "silent_tokens": silent_tokens.clone(),
                "history": history, "scale": scale, "variance": variance})
        if on_step is not None:
            on_step(step + 1, metrics)
        if stop and step + 1 < total_steps:
            if bar is not None:
                bar.close()
            if ckpt_path is None:
                raise Interrupted("interrupted; training had no checkpoint folder, so a later "
                                  "run starts over")
            raise Interrupted(f"interrupted; saved a training checkpoint at step {step + 1:,} "
                              f"of {total_steps:,}: the same command resumes there")
    if bar is not None:
        bar.close()

    elapsed = time.perf_counter() - t0
    steps_run = total_steps - start_step
    weights = fold_normalisation(params, scale=scale, k=cfg.k)
    summary = {
        "steps": total_steps, "tokens_seen": total_steps * cfg.batch_size,
        "train_tokens": n_rows, "scale": scale, "seconds": elapsed,
        "tokens_per_second": steps_run * cfg.batch_size / elapsed if elapsed > 0 else None,
        "dead_latents": int((silent_tokens >= cfg.dead_tokens).sum()),
        **({k: history[-1][k] for k in ("nmse", "explained_variance", "l0")} if history else {}),
    }
    return TrainResult(weights=weights, scale=scale, history=history, summary=summary)


def fold_normalisation(params: dict[str, Tensor], *, scale: float, k: int) -> TopKWeights:
    """Weights reading raw activations: TopK/ReLU commute with the positive scale, so dividing
    b_enc and b_dec by it gives latents in raw units and the raw reconstruction, W_dec unchanged.
    """
    return TopKWeights(
        W_enc=params["W_enc_T"].t().contiguous().clone(),
        b_enc=params["b_enc"].clone() / scale,
        W_dec=params["W_dec"].clone(),
        b_dec=params["b_dec"].clone() / scale,
        k=k,
    )


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="train SAE",
                dynamic_ncols=True, mininterval=0.5)
