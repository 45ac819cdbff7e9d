"""Benchmark: SAE training tokens/s against a bare SAE forward+backward, in one run.

The trainer (app/engine/train.py) does everything a training step needs: the encoder GEMM, TopK,
the sparse decoder, the AuxK term on dead latents, hand-written sparse gradients, the decoder-norm
projection and an Adam step. The baseline is the least any trainer must do: the SAE module's
dense forward (encode + decode) and an autograd backward of the MSE, with no optimiser step.
A ratio above 1 means the trainer is faster than a plain autograd step.

    .venv/bin/python bench/train.py [--d-in 576] [--d-sae 4096] [--k 32] [--tokens 65536]

Shapes default to the default SAE (SmolLM2 layer 15, 4096 latents, k 32). Data are Gaussian with
a random mean (the cost depends only on shapes). Timings on a shared machine are noisy: run it
twice and compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from app.engine.sae import SAE, SAEConfig
from app.engine.train import TrainConfig, train_topk


def bare_forward_backward(*, d_in: int, d_sae: int, k: int, batch: int, steps: int) -> float:
    """Tokens/s of SAE.forward + MSE + backward (autograd), no optimiser."""
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k)
    sae = SAE.from_config(cfg, seed=0).train()
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1))
    for step in range(steps + 1):
        if step == 1:  # the first step pays for allocations; leave it out
            start = time.perf_counter()
        sae.zero_grad(set_to_none=True)
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        loss.backward()
    return steps * batch / (time.perf_counter() - start)


def trainer_tokens_per_second(*, d_in: int, d_sae: int, k: int, batch: int, tokens: int) -> dict:
    gen = torch.Generator().manual_seed(2)
    data = (torch.randn(tokens, d_in, generator=gen) + torch.randn(d_in, generator=gen)).half()
    cfg = TrainConfig(d_sae=d_sae, k=k, epochs=1, batch_size=batch, checkpoint_every=0,
                      dead_tokens=tokens // 4)  # so the AuxK path runs for part of the epoch
    result = train_topk(data, cfg=cfg, progress=False)
    return result.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args()

    shape = dict(d_in=args.d_in, d_sae=args.d_sae, k=args.k, batch=args.batch)
    print(f"shapes: d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch} tokens; "
          f"torch threads {torch.get_num_threads()}")
    bare = bare_forward_backward(**shape, steps=max(4, args.tokens // args.batch // 4))
    summary = trainer_tokens_per_second(**shape, tokens=args.tokens)
    trained = summary["tokens_per_second"]
    print(f"bare SAE forward+backward (autograd, dense): {bare:10,.0f} tokens/s")
    print(f"SAE training step (TopK+AuxK+Adam):          {trained:10,.0f} tokens/s "
          f"({summary['steps']} steps, {summary['dead_latents']} dead latents at the end)")
    print(f"ratio training / bare forward+backward:      {trained / bare:10.2f}")


if __name__ == "__main__":
    main()
