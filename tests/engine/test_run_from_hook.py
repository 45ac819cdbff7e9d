"""run_from_hook: finishing a forward from a hook equals the full forward with a replacing hook."""

from __future__ import annotations

import pytest
import torch

from app.engine.tiny import build_tiny

TEXTS = ["def add(a, b):\n    return a + b  # sum", "The quick brown fox jumps over the lazy dog",
         "print(range(10))"]


def batch(lm):
    rows = [lm.tokenize(t) for t in TEXTS]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: rows of different lengths
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def lm(request):
    return build_tiny(request.param)


def hooks_to_try(lm):
    last = lm.n_layers - 1
    return ["blocks.0.hook_resid_post", f"blocks.{last // 2}.hook_resid_post",
            f"blocks.{last}.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre",
            f"blocks.{last}.hook_attn_out", "blocks.1.hook_mlp_out"]


@pytest.mark.parametrize("with_mask", [False, True])
def test_run_from_hook_equals_a_full_forward_with_a_replacing_hook(lm, with_mask):
    ids, mask = batch(lm)
    mask = mask if with_mask else None
    g = torch.Generator().manual_seed(0)
    for hook in hooks_to_try(lm):
        clean, resume = lm.logits_and_resume(ids, hook, attention_mask=mask)
        torch.testing.assert_close(clean, lm.logits(ids, attention_mask=mask), atol=1e-5,
                                   rtol=0)
        # the captured activation is the one run_to_hook returns
        torch.testing.assert_close(resume.activation,
                                   lm.run_to_hook(ids, hook, attention_mask=mask), atol=1e-5,
                                   rtol=0)
        new = resume.activation * 0.5 + torch.randn(resume.activation.shape, generator=g)
        with lm.hooks({hook: lambda _t, new=new: new}):
            want = lm.logits(ids, attention_mask=mask)
        got = lm.run_from_hook(resume, new)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=hook)
        assert (got - clean).abs().max() > 1e-2  # the replacement really changed the output
        # the clean activation put back gives the clean logits
        torch.testing.assert_close(lm.run_from_hook(resume, resume.activation), clean,
                                   atol=1e-5, rtol=0)


def test_run_from_hook_applies_logit_soft_capping():
    lm = build_tiny("tiny-gemma3")
    lm.hf_model.config.final_logit_softcapping = 2.0  # read by the CausalLM head at forward
    ids, mask = batch(lm)
    hook = "blocks.1.hook_resid_post"
    _, resume = lm.logits_and_resume(ids, hook, attention_mask=mask)
    new = -resume.activation
    with lm.hooks({hook: lambda _t: new}):
        want = lm.logits(ids, attention_mask=mask)
    assert want.abs().max() < 2.0
    torch.testing.assert_close(lm.run_from_hook(resume, new), want, atol=1e-5, rtol=0)


def test_later_active_hooks_run_and_shape_is_checked():
    lm = build_tiny("tiny-llama")
    ids, _ = batch(lm)
    _, resume = lm.logits_and_resume(ids, "blocks.0.hook_resid_post")
    later = "blocks.2.hook_mlp_out"
    with lm.hooks({later: lambda t: t * 0}):
        want = lm.logits(ids)
        got = lm.run_from_hook(resume, resume.activation)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        lm.run_from_hook(resume, resume.activation[:, :-1])
