"""SAE evaluations on held-out tokens: L0, explained variance, density, CE loss with the SAE in.

Definitions (sums run over counted positions, i.e. every position that is not BOS, padding or
another special token):

* ``l0``: mean number of active (> 0) latents per token.
* ``explained_variance`` = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (the textbook one;
  mean over all counted tokens).
* ``normalized_mse`` = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, MSE relative to always
  predicting the mean, as Gao et al. report it (so it equals 1 - explained_variance);
  ``mse`` = sum ||x - x_hat||^2 / (n_tokens * d_in).
* ``n_dead``: latents that never fire on the held-out tokens; ``n_dense``: latents that fire on
  more than ``dense_threshold`` (default 10%) of them.
* CE loss: mean next-token cross-entropy (nats) of the model as is (``ce_loss_clean``), with the
  hook activation replaced by the SAE reconstruction (``ce_loss_sae``), and with it replaced by
  zeros (``ce_loss_ablated``); ``ce_loss_recovered`` = (ablated - sae) / (ablated - clean),
  ill-conditioned when zero-ablation barely hurts (see ``app.records.ce_loss_figures``), so the
  increase in nats (``ce_loss_increase`` = sae - clean) is shown beside it.

Special positions: the SAE never replaces (and the ablation never zeroes) the activation at BOS /
special / padding positions; they keep the model's own value, because SmolLM2's residual stream
there is far larger than elsewhere (an attention sink the SAE is not trained on). They are also
left out of every metric: reconstruction statistics skip them, and a CE term counts only when both
the predicting position and the predicted token are ordinary tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from app.engine.formats import SAELENS_CFG, SAELENS_WEIGHTS
from app.records import CE_ABLATION_GAP_MIN_NATS, ce_loss_figures

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel
    from app.engine.sae import SAE

Encoder = Callable[[Tensor], Tensor]
# Bumped whenever a definition above changes, so evals.json figures of an older evaluation are not
# reused as if they were this one's (see ``reusable_evals``).
EVAL_VERSION = 1
SAE_FILES = (SAELENS_CFG, SAELENS_WEIGHTS)  # what an SAELens folder's encode depends on
REUSED_KEYS = ("n_tokens", "l0", "explained_variance", "normalized_mse", "mse", "n_dead", "n_dense",
               "ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "ce_loss_recovered",
               "ce_loss_increase", "n_ce_terms")


@dataclass
class ReconstructionStats:
    """Streaming sums for the reconstruction metrics; ``update`` per batch, ``finalize`` once."""

    d_sae: int
    n: int = 0
    sum_x: Tensor | None = None  # float64 [d_in]
    sum_x_sq: float = 0.0
    sum_err_sq: float = 0.0
    sum_l0: float = 0.0
    fire_counts: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fire_counts = torch.zeros(self.d_sae, dtype=torch.int64)

    def update(self, x: Tensor, x_hat: Tensor, feature_acts: Tensor) -> None:
        """x, x_hat [n, d_in] and feature_acts [n, d_sae] of counted positions only."""
        x64 = x.double()
        self.n += x.shape[0]
        batch_sum = x64.sum(0).cpu()  # the totals live on the CPU whatever the model's device
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        self.sum_x_sq += float(x64.pow(2).sum())
        self.sum_err_sq += float((x64 - x_hat.double()).pow(2).sum())
        active = feature_acts > 0
        self.sum_l0 += float(active.sum())
        self.fire_counts += active.sum(0).cpu()

    def finalize(self, *, dense_threshold: float = 0.1) -> dict[str, Any]:
        if self.n == 0 or self.sum_x is None:
            raise ValueError("no counted tokens to evaluate")
        d_in = self.sum_x.shape[0]
        mean = self.sum_x / self.n
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2 (accumulated in float64)
        total_dev = self.sum_x_sq - self.n * float(mean.pow(2).sum())
        nmse = self.sum_err_sq / total_dev
        freq = self.fire_counts.double() / self.n
        return {
            "n_tokens": self.n,
            "l0": self.sum_l0 / self.n,
            "explained_variance": 1.0 - nmse,
            "normalized_mse": nmse,
            "mse": self.sum_err_sq / (self.n * d_in),
            "n_dead": int((self.fire_counts == 0).sum()),
            "n_dense": int((freq > dense_threshold).sum()),
            "dense_threshold": dense_threshold,
            "feature_frequency": freq,
        }


def ce_loss_sums(logits: Tensor, tokens: Tensor, special_mask: Tensor) -> tuple[float, int]:
    """(sum of next-token NLL, number of terms) where position and target are both ordinary."""
    pred = logits[:, :-1].float()
    tokens, special_mask = tokens.to(logits.device), special_mask.to(logits.device)
    target = tokens[:, 1:]
    valid = ~(special_mask[:, :-1] | special_mask[:, 1:])
    nll = torch.nn.functional.cross_entropy(pred[valid], target[valid].long(), reduction="sum")
    return float(nll), int(valid.sum())


def ce_loss_recovered(*, clean: float, sae: float, ablated: float) -> float:
    """Share of the loss gap between zero-ablation and the clean model that the SAE closes."""
    return (ablated - sae) / (ablated - clean)


def evaluate_sae(
    sae: SAE,
    lm: LanguageModel,
    tokens: np.ndarray | Tensor,
    special_mask: np.ndarray | Tensor,
    *,
    hook_name: str | None = None,
    batch_size: int = 8,
    dense_threshold: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``sae`` at its hook on held-out sequences tokens [n_seq, ctx] (see module doc).

    Per batch: one full clean forward, which also keeps the hook activation and the later
    layers' inputs; the SAE-spliced and the zero-ablated passes then run only the layers after
    the hook (``lm.run_from_hook``), since everything before it is the same as in the clean pass.
    """
    hook = hook_name or sae.cfg.hook_name
    tokens = torch.as_tensor(np.asarray(tokens)).long()
    special = torch.as_tensor(np.asarray(special_mask)).bool()
    stats = ReconstructionStats(d_sae=int(sae.cfg.d_sae))
    nll = {"clean": 0.0, "sae": 0.0, "ablated": 0.0}
    n_terms = 0

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(tokens.numel()), unit="tok", unit_scale=True, desc="evaluate SAE",
                   dynamic_ncols=True, mininterval=0.5)
    for s in range(0, tokens.shape[0], batch_size):
        ids, mask = tokens[s:s + batch_size], special[s:s + batch_size]
        with torch.no_grad():
            logits, resume = lm.logits_and_resume(ids, hook)
            total, count = ce_loss_sums(logits, ids, mask)
            nll["clean"] += total
            del logits
            t = resume.activation
            counted = ~mask.to(t.device)
            x = t[counted]
            acts = sae.encode(x)
            x_hat = sae.decode(acts).to(t.dtype)
            stats.update(x, x_hat, acts)
            spliced = t.clone()
            spliced[counted] = x_hat
            ablated = t.clone()
            ablated[counted] = 0
            for name, replacement in (("sae", spliced), ("ablated", ablated)):
                logits = lm.run_from_hook(resume, replacement)
                nll[name] += ce_loss_sums(logits, ids, mask)[0]
                del logits
        n_terms += count
        if bar is not None:
            bar.update(int(ids.numel()))
    if bar is not None:
        bar.close()

    out = stats.finalize(dense_threshold=dense_threshold)
    out.pop("feature_frequency")
    clean, with_sae, ablated = (nll[k] / max(n_terms, 1) for k in ("clean", "sae", "ablated"))
    out.update({
        "ce_loss_clean": clean,
        "ce_loss_sae": with_sae,
        "ce_loss_ablated": ablated,
        "ce_loss_recovered": ce_loss_recovered(clean=clean, sae=with_sae, ablated=ablated),
        "ce_loss_increase": with_sae - clean,
        "n_ce_terms": n_terms,
        "hook_name": hook,
        "exclude_special_tokens": True,
        "eval_version": EVAL_VERSION,
    })
    return out


# ------------------------------------------------------------------- reusing evals.json figures


def held_out_fingerprint(tokens: np.ndarray | Tensor) -> str:
    """sha256 of held-out token ids [n_seq, ctx] (shape included): two evaluations read the same
    held-out tokens exactly when these match (the special mask follows from ids and model)."""
    arr = np.ascontiguousarray(np.asarray(tokens), dtype=np.int64)
    digest = hashlib.sha256(f"{arr.shape}".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


def sae_files_fingerprint(folder: Path | str) -> str | None:
    """sha256 over an SAELens folder's config and weights files (contents, not dates); None when
    the folder lacks them (another format: its figures are never reused)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in SAE_FILES:
        path = folder / name
        if not path.is_file():
            return None
        digest.update(f"{name}\n".encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def reusable_evals(
    evals: dict[str, Any] | None, *, model_id: str, hook_name: str, held_out_sha256: str,
    sae_sha256: str | None, dense_threshold: float = 0.1,
) -> tuple[bool, str]:
    """(True, what matched) when ``evals`` (an evals.json written by train-sae) measured this very
    evaluation: same model, hook, held-out tokens, SAE files, evaluation version and dense
    threshold; else (False, the first mismatch). The corpus, the held-out slice's position and the
    context size are all covered by the token fingerprint."""
    if not evals:
        return False, "no evals.json"
    checks = [
        ("eval_version", evals.get("eval_version"), EVAL_VERSION),
        ("model_id", evals.get("model_id"), model_id),
        ("hook_name", evals.get("hook_name"), hook_name),
        ("exclude_special_tokens", evals.get("exclude_special_tokens"), True),
        ("dense_threshold", evals.get("dense_threshold"), dense_threshold),
        ("held_out_sha256", evals.get("held_out_sha256"), held_out_sha256),
        ("sae_sha256", evals.get("sae_sha256"), sae_sha256),
    ]
    for name, got, want in checks:
        if want is None or got != want:
            return False, f"{name} differs ({got!r} in evals.json, {want!r} here)"
    missing = [k for k in REUSED_KEYS if k not in evals]
    if missing:
        return False, f"evals.json lacks {', '.join(missing)}"
    return True, ", ".join(name for name, _, _ in checks)


def format_evals(evals: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    return "\n".join([
        f"held-out tokens      {evals['n_tokens']}",
        f"L0                   {evals['l0']:.2f}",
        f"explained variance   {evals['explained_variance']:.4f}",
        f"normalised MSE       {evals['normalized_mse']:.4f}",
        f"dead / dense latents {evals['n_dead']} / {evals['n_dense']}",
        f"CE loss clean        {evals['ce_loss_clean']:.4f}",
        f"CE loss with SAE     {evals['ce_loss_sae']:.4f}  "
        f"(+{evals['ce_loss_increase']:.4f} nats)",
        f"CE loss zero-ablated {evals['ce_loss_ablated']:.4f}",
        f"CE loss recovered    {evals['ce_loss_recovered']:.4f}{_ce_flag(evals)}",
    ])


def _ce_flag(evals: dict[str, Any]) -> str:
    ce = ce_loss_figures(evals)
    if not ce["ce_loss_recovered_unreliable"]:
        return ""
    return (f"  (unreliable: zero-ablation adds only {ce['ce_loss_ablation_gap']:.4f} nats, under "
            f"{CE_ABLATION_GAP_MIN_NATS}; the SAE adds {ce['ce_loss_increase']:+.4f})")
