"""A build's held-out evaluation of the SAE: train-sae's evals.json when it matches, else fresh.

The reuse rule is ``evaluate``'s docstring; ``train_metrics`` reads the SAE folder's evals.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.pipeline.build_options import BuildOptions, Log

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel
    from app.engine.sae import SAE


def train_metrics(sae_path: Path | str) -> dict[str, Any] | None:
    """The SAE folder's evals.json (train-sae's held-out evaluation), if readable."""
    evals_file = Path(sae_path) / "evals.json"
    if not evals_file.exists():
        return None
    try:
        return json.loads(evals_file.read_text())
    except ValueError:
        return None


def evaluate(*, lm: LanguageModel, sae: SAE, hook: str, eval_tokens: np.ndarray,
             eval_special: np.ndarray, held_out: bool, opts: BuildOptions,
             train_evals: dict[str, Any] | None, log: Log) -> dict[str, Any]:
    """Held-out evaluation: the figures train-sae wrote to the SAE folder's evals.json when they
    measured exactly this evaluation (same model, hook, held-out token ids, SAE files, evaluation
    version; see ``evals.reusable_evals``), else a fresh ``evaluate_sae``. The result says which
    (``reused_from`` with what was matched, or ``computed`` with the reason)."""
    from app.engine.evals import (
        REUSED_KEYS,
        evaluate_sae,
        held_out_fingerprint,
        reusable_evals,
        sae_files_fingerprint,
    )

    tokens_sha = held_out_fingerprint(eval_tokens)
    if held_out:
        sae_sha = sae_files_fingerprint(opts.sae_path)
        ok, why = reusable_evals(train_evals, model_id=lm.model_id, hook_name=hook,
                                 held_out_sha256=tokens_sha, sae_sha256=sae_sha)
    else:
        ok, why = False, "no held-out text after the build's tokens"
    evals_file = Path(opts.sae_path) / "evals.json"
    if ok and train_evals is not None:
        log(f"held-out evals: reusing {evals_file} (matched {why})")
        kept = (*REUSED_KEYS, "hook_name", "exclude_special_tokens", "dense_threshold",
                "eval_version")
        return {**{k: train_evals[k] for k in kept if k in train_evals},
                "held_out_sha256": tokens_sha,
                "reused_from": {"file": str(evals_file.resolve()), "matched": why.split(", "),
                                "sae_sha256": sae_sha}}
    kind = "held-out" if held_out else "corpus"
    log(f"evaluating the SAE on {eval_tokens.size} {kind} tokens (not reusing evals.json: "
        f"{why})")
    with torch.inference_mode():
        ev = evaluate_sae(sae, lm, eval_tokens, eval_special, hook_name=hook,
                          batch_size=max(1, min(opts.batch_size, 8)), progress=opts.progress)
    return {**ev, "held_out_sha256": tokens_sha, "computed": why}
