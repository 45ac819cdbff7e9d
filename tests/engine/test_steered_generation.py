"""The engine service's steering generators on the tiny Llama: text events per forward, default
beside steered in one batch, seeds, the time limit, the sweep, CAA; incremental detokenisation."""

from __future__ import annotations

import time

import pytest
import torch

from app.engine.generate import IncrementalText
from app.engine.sae import SAE, SAEConfig
from app.engine.service import EngineService, LoadedSAE
from app.engine.tiny import build_tiny
from app.errors import ConfigError, ConflictError, NotFoundError

SAE_ID = "1-res-topk-48"
HOOK = "blocks.1.hook_resid_post"
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def service() -> EngineService:
    lm = build_tiny("tiny-llama")
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=48, k=6, hook_name=HOOK)
    sae = SAE.from_config(cfg, seed=3).eval().requires_grad_(False)
    return EngineService(lm, {SAE_ID: LoadedSAE(sae_id=SAE_ID, hook_name=HOOK, sae=sae)})


def run(service, **kwargs):
    """Every item of a steer_stream, and the final done event's data."""
    items = list(service.steer_stream(sae_id=SAE_ID, prompt=PROMPT, **kwargs))
    done = items[-1][-1]
    assert done["event"] == "done"
    return items, done["data"]


def texts(items, which):
    return "".join(e["data"]["text"] for item in items for e in item
                   if e["event"] == "token" and e["data"]["which"] == which)


def test_incremental_text_never_splits_a_character():
    lm = build_tiny("tiny-llama")
    text = "fox 🦊 café — naïve"
    ids = lm.tokenize(text, prepend_bos=False)
    assert len(ids) > len(text.split())  # the emoji and accents take several byte tokens
    stream = IncrementalText(lm.decode)
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == lm.decode(ids) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # a token holding part of a character waited for the rest


def test_without_features_both_streams_run_and_agree(service):
    batches = []
    handle = service.lm.hf_model.register_forward_hook(
        lambda _m, args, kwargs, _out: batches.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    try:
        items, done = run(service, max_new_tokens=8)
    finally:
        handle.remove()
    assert batches and set(batches) == {2}  # every forward ran both streams
    assert len(items) == len(batches)  # one item per forward
    assert done["default"]["token_ids"] == done["steered"]["token_ids"]
    assert done["default"]["text"] == done["steered"]["text"] == texts(items, "default")
    assert done["default"]["stop_reason"] in {"max_new_tokens", "stop_token"}
    assert done["default"]["n_tokens"] == len(done["default"]["token_ids"])


def test_a_feature_changes_only_the_steered_stream_and_seeds_repeat(service):
    features = [{"index": 5, "mode": "add", "value": 60.0}]
    sample = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    plain_items, plain = run(service, **sample)
    items, steered = run(service, features=features, **sample)
    _, again = run(service, features=features, **sample)
    assert steered == again
    assert steered["default"] == plain["default"]
    assert steered["steered"]["token_ids"] != steered["default"]["token_ids"]
    assert texts(items, "steered") == steered["steered"]["text"]


def test_the_time_limit_stops_after_the_step_in_progress(service):
    items, done = run(service, max_new_tokens=20, deadline=time.monotonic() - 1)
    assert len(items) == 1  # the prefill only
    assert {s["stop_reason"] for s in done.values()} == {"time_limit"}


def test_bad_inputs_fail_before_any_forward(service):
    for bad, error in ((dict(features=[{"index": 99, "mode": "add", "value": 1}]), ConfigError),
                       (dict(features=[{"index": 1, "mode": "add", "value": 1,
                                        "sae_id": "nope"}]), NotFoundError),
                       (dict(vectors=[{"hook_name": HOOK, "vector": [1.0], "value": 1}]),
                        ConfigError),
                       (dict(chat_template=True), ConflictError),
                       (dict(max_prompt_tokens=3), ConfigError)):
        with pytest.raises(error):
            run(service, **bad)


def test_sweep_reports_realised_activation_and_coherence(service):
    items = list(service.steer_sweep(sae_id=SAE_ID, prompt=PROMPT, index=5, mode="clamp",
                                     values=[0.0, 4.0, 8.0], max_new_tokens=6))
    result = items[-1]
    assert all(item is None for item in items[:-1])
    assert [c["value"] for c in result["cells"]] == [0.0, 4.0, 8.0]
    for cell in [result["default"], *result["cells"]]:
        assert cell["coherence"] < 0 and isinstance(cell["text"], str)
    # Clamping at every position: the realised activation follows the value (other latents
    # move too, so only its order is asserted).
    realised = [c["realised"] for c in result["cells"]]
    assert realised[0] < realised[1] < realised[2]


def test_caa_vector_and_its_aligned_features(service):
    out = service.caa_vector(sae_id=SAE_ID, positive=["The quick brown fox"],
                             negative=["for i in range(10):"], position="mean", top_k=4)
    assert out["hook_name"] == HOOK and len(out["vector"]) == service.lm.d_model
    assert len(out["aligned"]) == 4 and out["norm"] > 0
    vector = torch.tensor(out["vector"])
    # Steering with it is a vector edit at its hook.
    _, done = run(service, vectors=[{"hook_name": HOOK, "vector": (20 * vector).tolist(),
                                     "value": 1.0}], max_new_tokens=6)
    assert done["steered"]["token_ids"] != done["default"]["token_ids"]


@pytest.mark.integration
def test_smollm2_chat_template_prompt_and_a_steered_stream():
    from app.engine.loading import load_model
    from app.settings import get_settings

    lm = load_model("smollm2-135m", cache_dir=get_settings().cache_dir)
    hook = "blocks.15.hook_resid_post"
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=256, k=8, hook_name=hook)
    sae = SAE.from_config(cfg, seed=0).eval().requires_grad_(False)
    service = EngineService(lm, {"s": LoadedSAE(sae_id="s", hook_name=hook, sae=sae)})
    ids = service.prompt_ids(sae_id="s", prompt="Name a colour.", chat_template=True,
                             max_tokens=256)
    assert "Name a colour." in lm.decode(ids)
    assert lm.decode(ids).rstrip().endswith("assistant")  # the assistant turn is opened
    items = list(service.steer_stream(sae_id="s", prompt="Name a colour.", chat_template=True,
                                      max_new_tokens=12,
                                      features=[{"index": 3, "mode": "add", "value": 30.0}]))
    done = items[-1][-1]["data"]
    assert done["default"]["text"] and done["steered"]["text"] != done["default"]["text"]
