"""The build reuses train-sae's held-out evals only when they measured the same evaluation."""

from __future__ import annotations

import json
import shutil

import pytest

from app.engine.evals import REUSED_KEYS
from app.engine.tiny import build_tiny
from app.pipeline.precompute import BuildOptions, compute_records
from app.pipeline.train_sae import train_sae

HOOK = "blocks.2.hook_resid_post"
TOKENS, EVAL_TOKENS, CTX = 2048, 256, 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    corpus = root / "texts"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.md").write_text(
            f"# Note {i}\nThe quick brown fox jumps over the lazy dog. def f(a): return a\n"
            * (15 + 4 * i), encoding="utf-8")
    lm = build_tiny("tiny-llama")
    out = train_sae(model="tiny-llama", hook_name=HOOK, d_sae=32, k=4, corpus=str(corpus),
                    tokens=TOKENS, eval_tokens=EVAL_TOKENS, epochs=1, context_size=CTX, lm=lm,
                    out=root / "sae", cache_dir=root / "cache", progress=False,
                    log=lambda m: None)
    return root, lm, corpus, out


def build_evals(root, lm, corpus, sae_dir, *, n_tokens=TOKENS, eval_tokens=EVAL_TOKENS):
    logs = []
    opts = BuildOptions(sae_path=sae_dir, corpus=str(corpus), n_tokens=n_tokens, batch_size=8,
                        eval_tokens=eval_tokens, progress=False, context_size=CTX,
                        db_url=f"sqlite:///{root / 'x.db'}", cache_dir=root / "cache",
                        use_activation_cache=False)
    records, _ = compute_records(opts, lm=lm, sae=trained_sae(sae_dir), log=logs.append)
    return records.run.sae_stats["eval"], records.run.sae_stats, logs


def trained_sae(folder):
    from app.engine.sae import SAE

    return SAE.load(folder)


def test_the_build_reuses_matching_training_evals(trained):
    root, lm, corpus, out = trained
    evals_json = json.loads((out.path / "evals.json").read_text())
    ev, stats, logs = build_evals(root, lm, corpus, out.path)
    assert "reused_from" in ev and "computed" not in ev
    assert set(ev["reused_from"]["matched"]) >= {"model_id", "hook_name", "held_out_sha256",
                                                 "sae_sha256", "eval_version"}
    assert ev["held_out_sha256"] == evals_json["held_out_sha256"]
    for key in REUSED_KEYS:
        assert ev[key] == evals_json[key]
    assert stats["ce_loss_recovered"] == evals_json["ce_loss_recovered"]
    assert any("reusing" in line for line in logs)

    # The same build with the figures unavailable computes them afresh: the same numbers.
    bare = root / "bare-sae"
    shutil.copytree(out.path, bare)
    (bare / "evals.json").unlink()
    fresh, _, logs = build_evals(root, lm, corpus, bare)
    assert fresh["computed"] == "no evals.json"
    assert fresh["held_out_sha256"] == ev["held_out_sha256"]
    for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "ce_loss_recovered",
                "explained_variance", "l0"):
        assert fresh[key] == pytest.approx(ev[key], rel=1e-6), key
    assert fresh["n_ce_terms"] == ev["n_ce_terms"] and fresh["n_tokens"] == ev["n_tokens"]


def test_the_build_recomputes_when_slice_or_weights_differ(trained):
    root, lm, corpus, out = trained
    # another held-out slice: fewer held-out tokens
    ev, _, _ = build_evals(root, lm, corpus, out.path, eval_tokens=EVAL_TOKENS - CTX)
    assert ev["computed"].startswith("held_out_sha256 differs")
    # same slice, other weights
    changed = root / "changed-sae"
    shutil.copytree(out.path, changed)
    weights = changed / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last float: still a valid file, other weights
    weights.write_bytes(bytes(data))
    ev, _, _ = build_evals(root, lm, corpus, changed)
    assert ev["computed"].startswith("sae_sha256 differs")


def test_eval_tokens_zero_means_no_evaluation(trained):
    root, lm, corpus, out = trained
    opts = BuildOptions(sae_path=out.path, corpus=str(corpus), n_tokens=TOKENS, batch_size=8,
                        eval_tokens=0, progress=False, context_size=CTX,
                        db_url=f"sqlite:///{root / 'x.db'}", cache_dir=root / "cache",
                        use_activation_cache=False)
    records, result = compute_records(opts, lm=lm, sae=trained_sae(out.path), log=lambda m: None)
    assert "eval" not in records.run.sae_stats
    assert "ce_loss_recovered" not in records.run.sae_stats
    assert records.run.config["eval_tokens"] == 0


def test_a_build_over_fewer_tokens_is_scored_after_the_training_tokens(trained):
    """Text the SAE trained on is never its evaluation: a shorter build still holds out the
    tokens after the training budget (train-sae's own slice, so its figures are reused)."""
    root, lm, corpus, out = trained
    ev, _, _ = build_evals(root, lm, corpus, out.path, n_tokens=TOKENS // 2)
    assert "reused_from" in ev
    trained_tokens = json.loads((out.path / "cfg.json").read_text())["metadata"][
        "training_tokens"]
    assert ev["held_out_after_tokens"] == trained_tokens
