"""Hook points on the tiny Llama and Gemma 3: equality with output_hidden_states, stops, edits."""

from __future__ import annotations

import pytest
import torch

from app.engine.hooks import HOOK_KINDS, architecture_for, hook_names, parse_hook_name
from app.engine.lm import LanguageModel
from app.engine.tiny import build_tiny
from app.errors import ConfigError

TEXTS = [
    "def add(a, b):\n    return a + b  # the quick brown fox",
    "Once upon a time there was a little model with four layers.",
]
ATOL = 1e-4


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def lm(request) -> LanguageModel:
    return build_tiny(request.param)


def batch(lm: LanguageModel) -> torch.Tensor:
    """Two equal-length rows (truncated to the shorter), longer than Gemma's sliding window."""
    rows = [lm.tokenize(t) for t in TEXTS]
    n = min(len(r) for r in rows)
    assert n > 12
    return torch.tensor([r[:n] for r in rows])


def reference_hidden_states(lm: LanguageModel, ids: torch.Tensor):
    with torch.no_grad():
        out = lm.hf_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == lm.n_layers + 1
    return out


def registered_hooks(lm: LanguageModel) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook on the model. transformers itself keeps a few permanent
    output-capturing hooks once output_hidden_states was used, so tests compare snapshots."""
    found = set()
    for name, module in lm.hf_model.named_modules():
        found.update((name, "post", key) for key in module._forward_hooks)
        found.update((name, "pre", key) for key in module._forward_pre_hooks)
    return found


def test_parse_hook_name_and_errors():
    point = parse_hook_name("blocks.3.hook_mlp_out", n_layers=4)
    assert (point.layer, point.kind, point.name) == (3, "hook_mlp_out", "blocks.3.hook_mlp_out")
    assert len(hook_names(4)) == 4 * len(HOOK_KINDS)
    for bad in ["blocks.4.hook_resid_post", "blocks.1.hook_resid_mid", "resid_post", "blocks.-1."]:
        with pytest.raises(ConfigError) as err:
            parse_hook_name(bad, n_layers=4)
        message = str(err.value)
        # Compact listing: the pattern and the layer range, not 16 names.
        assert "hook_resid_pre|hook_attn_out|hook_mlp_out|hook_resid_post" in message
        assert "0..3" in message


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError, match="llama.*gemma3_text"):
        architecture_for("gpt2")


def test_resid_pre_and_post_equal_hidden_states(lm):
    ids = batch(lm)
    hidden = reference_hidden_states(lm, ids).hidden_states
    for layer in range(lm.n_layers):
        pre = lm.run_to_hook(ids, f"blocks.{layer}.hook_resid_pre")
        post = lm.run_to_hook(ids, f"blocks.{layer}.hook_resid_post")
        assert pre.shape == (ids.shape[0], ids.shape[1], lm.d_model)
        assert (pre - hidden[layer]).abs().max() <= ATOL
        if layer < lm.n_layers - 1:
            assert (post - hidden[layer + 1]).abs().max() <= ATOL
        else:
            # HF's last hidden state has the final norm applied; ours (like TransformerLens)
            # does not, so the two differ by exactly that norm.
            assert (post - hidden[-1]).abs().max() > 1e-2
            assert (lm.final_norm(post) - hidden[-1]).abs().max() <= ATOL


def test_attn_out_plus_mlp_out_is_the_residual_update(lm):
    ids = batch(lm)
    for layer in range(lm.n_layers):
        names = [f"blocks.{layer}.{kind}" for kind in HOOK_KINDS]
        acts = lm.run_to_hooks(ids, names)
        pre, attn, mlp, post = (acts[n] for n in names)
        assert (post - pre - attn - mlp).abs().max() <= ATOL
        # Both sublayers contribute: neither site is silently empty.
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3
        # resid_mid = resid_pre + attn_out is what the MLP block sees as its residual input.
        mid = pre + attn
        assert (post - mid - mlp).abs().max() <= ATOL


def test_gemma3_attn_out_is_after_post_attention_norm():
    lm = build_tiny("tiny-gemma3")
    ids = batch(lm)
    layer = lm.hf_model.model.layers[1]
    raw = {}
    handle = layer.self_attn.register_forward_hook(lambda m, a, out: raw.update(attn=out[0]))
    try:
        attn_out = lm.run_to_hook(ids, "blocks.1.hook_attn_out")
    finally:
        handle.remove()
    with torch.no_grad():
        expected = layer.post_attention_layernorm(raw["attn"])
    assert (attn_out - expected).abs().max() <= ATOL
    assert (attn_out - raw["attn"]).abs().max() > 1e-2


def test_run_to_hook_stops_after_the_site(lm):
    ids = batch(lm)
    before = registered_hooks(lm)
    calls: dict[str, int] = {}
    layers = lm.hf_model.model.layers
    modules = {f"layer{i}": layers[i] for i in range(lm.n_layers)}
    modules.update({f"mlp{i}": layers[i].mlp for i in range(lm.n_layers)})
    modules.update(norm=lm.hf_model.model.norm, lm_head=lm.hf_model.lm_head)
    handles = [
        m.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
        for key, m in modules.items()
    ]
    try:
        lm.run_to_hook(ids, "blocks.1.hook_resid_post")
        assert calls == {"layer0": 1, "mlp0": 1, "layer1": 1, "mlp1": 1}
        calls.clear()
        lm.run_to_hook(ids, "blocks.2.hook_attn_out")  # layer 2 starts, its MLP never runs
        assert calls == {"layer0": 1, "mlp0": 1, "layer1": 1, "mlp1": 1}
        calls.clear()
        lm.run_to_hooks(ids, ["blocks.0.hook_resid_pre", "blocks.2.hook_mlp_out"])
        assert calls == {"layer0": 1, "mlp0": 1, "layer1": 1, "mlp1": 1, "mlp2": 1}
        calls.clear()
        lm.logits(ids)  # the full forward reaches everything
        assert set(calls) == set(modules) and set(calls.values()) == {1}
    finally:
        for h in handles:
            h.remove()
    assert registered_hooks(lm) == before


def test_run_to_hooks_matches_single_runs(lm):
    ids = batch(lm)
    names = ["blocks.2.hook_mlp_out", "blocks.0.hook_resid_post", " blocks.1.hook_attn_out"]
    together = lm.run_to_hooks(ids, names)
    assert list(together) == names
    for name in names:
        assert torch.equal(together[name], lm.run_to_hook(ids, name))


def test_one_dimensional_ids_and_lists(lm):
    ids = lm.tokenize(TEXTS[0])
    acts = lm.run_to_hook(ids, "blocks.0.hook_resid_post")
    assert acts.shape == (1, len(ids), lm.d_model)
    assert torch.equal(acts, lm.run_to_hook(torch.tensor([ids]), "blocks.0.hook_resid_post"))


def test_left_padding_with_attention_mask(lm):
    short = lm.tokenize(TEXTS[1])[:10]
    pad = 3
    padded = torch.tensor([[0] * pad + short])
    mask = torch.tensor([[0] * pad + [1] * len(short)])
    clean = lm.run_to_hook([short], "blocks.3.hook_resid_post")
    masked = lm.run_to_hook(padded, "blocks.3.hook_resid_post", attention_mask=mask)[:, pad:]
    # RoPE only sees relative positions, so masked left padding leaves real tokens unchanged.
    assert (masked - clean).abs().max() <= ATOL
    unmasked = lm.run_to_hook(padded, "blocks.3.hook_resid_post")[:, pad:]
    assert (unmasked - clean).abs().max() > 1e-3
    logits = lm.logits(padded, attention_mask=mask)[:, pad:]
    assert (logits - lm.logits([short])).abs().max() <= ATOL


def test_intervention_changes_only_downstream_logits(lm):
    ids = batch(lm)
    before = registered_hooks(lm)
    clean = lm.logits(ids)
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    position = 6

    def steer(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, position] += 5.0 * direction
        return t

    with lm.hooks({"blocks.1.hook_resid_post": steer}):
        steered = lm.logits(ids)
    assert torch.equal(clean[:, :position], steered[:, :position])  # causal: earlier untouched
    assert (steered[:, position:] - clean[:, position:]).abs().max() > 1e-2
    assert torch.equal(lm.logits(ids), clean)  # hook gone after the block
    assert registered_hooks(lm) == before


def test_intervention_at_resid_post_equals_one_at_next_resid_pre(lm):
    ids = batch(lm)
    shift = torch.full((lm.d_model,), 0.5)

    def add(t):
        return t + shift

    with lm.hooks({"blocks.1.hook_resid_post": add}):
        a = lm.logits(ids)
        # Captures see the edited stream: the capture hook runs after the intervention.
        captured_post = lm.run_to_hook(ids, "blocks.1.hook_resid_post")
        captured_pre = lm.run_to_hook(ids, "blocks.2.hook_resid_pre")
    with lm.hooks({"blocks.2.hook_resid_pre": add}):
        b = lm.logits(ids)
    assert (a - b).abs().max() <= ATOL
    clean_post = lm.run_to_hook(ids, "blocks.1.hook_resid_post")
    assert (captured_post - clean_post - shift).abs().max() <= ATOL
    assert (captured_pre - captured_post).abs().max() <= ATOL


def test_capture_hook_sees_activation_and_zero_ablation_matters(lm):
    ids = batch(lm)
    seen = {}
    with lm.hooks({"blocks.0.hook_mlp_out": lambda t: seen.update(mlp=t.clone())}):
        lm.logits(ids)
    assert torch.equal(seen["mlp"], lm.run_to_hook(ids, "blocks.0.hook_mlp_out"))
    with lm.hooks({"blocks.0.hook_mlp_out": torch.zeros_like}):
        ablated = lm.run_to_hooks(
            ids, ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
        )
    pre, attn, post = (
        ablated[f"blocks.0.{k}"] for k in ("hook_resid_pre", "hook_attn_out", "hook_resid_post")
    )
    assert (post - pre - attn).abs().max() <= ATOL


def test_hooks_removed_after_exceptions(lm):
    ids = batch(lm)
    before = registered_hooks(lm)
    clean = lm.logits(ids)

    def boom(t):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):  # noqa: SIM117 (raises outside)
        with lm.hooks({"blocks.1.hook_mlp_out": boom}):
            lm.logits(ids)
    assert registered_hooks(lm) == before
    with pytest.raises(ValueError), lm.hooks({"blocks.0.hook_resid_pre": lambda t: t * 2}):
        raise ValueError("user code failed inside the block")
    assert registered_hooks(lm) == before
    # An unknown name fails before anything is attached.
    with (
        pytest.raises(ConfigError, match="0..3"),
        lm.hooks(
            {"blocks.0.hook_resid_pre": lambda t: t * 2, "blocks.9.hook_resid_pre": lambda t: t}
        ),
    ):
        pass
    assert registered_hooks(lm) == before
    with pytest.raises(ConfigError, match="unknown hook"):
        lm.run_to_hook(ids, "blocks.0.hook_z")
    assert registered_hooks(lm) == before
    assert torch.equal(lm.logits(ids), clean)


def test_unembedding_reproduces_logits(lm):
    ids = batch(lm)
    w_u, scale = lm.unembedding()
    assert w_u.shape == (lm.d_model, lm.vocab_size) and scale.shape == (lm.d_model,)
    resid = lm.run_to_hook(ids, f"blocks.{lm.n_layers - 1}.hook_resid_post")
    eps = lm.hf_model.config.rms_norm_eps
    normed = resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + eps)
    assert ((normed * scale) @ w_u - lm.logits(ids)).abs().max() <= ATOL
