"""evaluate_sae (clean pass once, SAE and ablation passes from the hook on) against the reference
of three full forwards with replacing hooks; the evals.json reuse rules."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from app.engine.evals import (
    EVAL_VERSION,
    REUSED_KEYS,
    ReconstructionStats,
    ce_loss_recovered,
    ce_loss_sums,
    evaluate_sae,
    held_out_fingerprint,
    reusable_evals,
    sae_files_fingerprint,
)
from app.engine.sae import SAE, SAEConfig
from app.engine.tiny import build_tiny

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b):\n    return a + b\n",
         "Python is a programming language that lets you work quickly.", "print(range(10))"]


def three_full_forwards(sae, lm, tokens, special, *, hook, batch_size):
    """The evaluation as defined: clean, SAE-spliced and zero-ablated full forwards, the hook
    replacing the activation at counted positions only."""
    tokens = torch.from_numpy(tokens).long()
    special = torch.from_numpy(special)
    stats = ReconstructionStats(d_sae=int(sae.cfg.d_sae))
    nll = {"clean": 0.0, "sae": 0.0, "ablated": 0.0}
    n_terms = 0
    for s in range(0, len(tokens), batch_size):
        ids, mask = tokens[s:s + batch_size], special[s:s + batch_size]

        def splice(t, mask=mask):
            x = t[~mask]
            acts = sae.encode(x)
            x_hat = sae.decode(acts)
            stats.update(x, x_hat, acts)
            out = t.clone()
            out[~mask] = x_hat
            return out

        def ablate(t, mask=mask):
            return torch.where(mask[..., None], t, torch.zeros_like(t))

        for name, fns in (("clean", {}), ("sae", {hook: splice}), ("ablated", {hook: ablate})):
            with lm.hooks(fns), torch.no_grad():
                total, count = ce_loss_sums(lm.logits(ids), ids, mask)
            nll[name] += total
        n_terms += count
    out = stats.finalize()
    clean, with_sae, ablated = (nll[k] / n_terms for k in ("clean", "sae", "ablated"))
    out.update(ce_loss_clean=clean, ce_loss_sae=with_sae, ce_loss_ablated=ablated,
               ce_loss_recovered=ce_loss_recovered(clean=clean, sae=with_sae, ablated=ablated),
               n_ce_terms=n_terms)
    return out


def held_out(lm, width=20):
    rows = []
    for text in TEXTS:
        ids = lm.tokenize(text)[:width]
        rows.append(ids + [0] * (width - len(ids)))  # right padding (id 0 is special)
    tokens = np.array(rows, dtype=np.int32)
    return tokens, np.isin(tokens, list(lm.special_token_ids))


@pytest.mark.parametrize(("model", "hook"), [
    ("tiny-llama", "blocks.1.hook_resid_post"), ("tiny-llama", "blocks.3.hook_resid_post"),
    ("tiny-llama", "blocks.2.hook_mlp_out"), ("tiny-gemma3", "blocks.2.hook_resid_post"),
    ("tiny-gemma3", "blocks.1.hook_resid_pre")])
def test_evaluate_sae_equals_three_full_forwards(model, hook):
    lm = build_tiny(model)
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=48, k=6, hook_name=hook,
                    model_name=model)
    sae = SAE.from_config(cfg, seed=3)
    tokens, special = held_out(lm)
    assert special[:, 0].all() and special.sum() > len(tokens)  # BOS and padding present
    got = evaluate_sae(sae, lm, tokens, special, batch_size=3, progress=False)
    want = three_full_forwards(sae, lm, tokens, special, hook=hook, batch_size=3)
    for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "ce_loss_recovered",
                "explained_variance", "normalized_mse", "mse", "l0"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    for key in ("n_tokens", "n_dead", "n_dense", "n_ce_terms"):
        assert got[key] == want[key], key
    assert abs(got["ce_loss_sae"] - got["ce_loss_clean"]) > 1e-4  # the splice did something
    assert got["eval_version"] == EVAL_VERSION


def test_reusable_evals_matches_everything_or_names_the_difference(tmp_path):
    lm = build_tiny("tiny-llama")
    hook = "blocks.2.hook_resid_post"
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=32, k=4, hook_name=hook,
                    model_name="tiny-llama")
    SAE.from_config(cfg, seed=0).save(tmp_path / "sae")
    tokens, _ = held_out(lm)
    sae_sha = sae_files_fingerprint(tmp_path / "sae")
    evals = {k: 0.5 for k in REUSED_KEYS}
    evals.update(model_id="tiny-llama", hook_name=hook, exclude_special_tokens=True,
                 dense_threshold=0.1, eval_version=EVAL_VERSION,
                 held_out_sha256=held_out_fingerprint(tokens), sae_sha256=sae_sha)
    same = dict(model_id="tiny-llama", hook_name=hook, held_out_sha256=held_out_fingerprint(tokens),
                sae_sha256=sae_sha)
    ok, what = reusable_evals(evals, **same)
    assert ok and "held_out_sha256" in what and "sae_sha256" in what

    other_tokens = tokens.copy()
    other_tokens[0, 3] += 1
    changes = [({"model_id": "tiny-gemma3"}, "model_id"),
               ({"hook_name": "blocks.1.hook_resid_post"}, "hook_name"),
               ({"held_out_sha256": held_out_fingerprint(other_tokens)}, "held_out_sha256"),
               ({"held_out_sha256": held_out_fingerprint(tokens[:2])}, "held_out_sha256"),
               ({"sae_sha256": None}, "sae_sha256")]
    for change, name in changes:
        ok, why = reusable_evals(evals, **{**same, **change})
        assert not ok and why.startswith(name)
    for drop in ("held_out_sha256", "eval_version", "ce_loss_sae"):  # an older evals.json
        ok, why = reusable_evals({k: v for k, v in evals.items() if k != drop}, **same)
        assert not ok and drop in why
    assert reusable_evals(None, **same) == (False, "no evals.json")

    # the SAE fingerprint follows the files' contents
    sae = SAE.load(tmp_path / "sae")
    with torch.no_grad():
        sae.W_dec[0, 0] += 1.0
    sae.save(tmp_path / "sae2")
    assert sae_files_fingerprint(tmp_path / "sae2") != sae_sha
    shutil.copytree(tmp_path / "sae", tmp_path / "elsewhere" / "sae")  # other path and dates
    assert sae_files_fingerprint(tmp_path / "elsewhere" / "sae") == sae_sha
    assert sae_files_fingerprint(tmp_path) is None
