"""Text search's sparse path against brute force over the dense code, for every architecture.

EngineService.search never builds the dense [tokens, d_sae] code; these tests build it with
sae.encode and rank it the slow, obvious way, then compare every field.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from app.api.routes.search import _search_json
from app.api.schemas import SearchOut
from app.engine.sae import _TRANSPOSED_MAX_ROWS, SAE, SAEConfig
from app.engine.service import EngineService, LoadedSAE
from app.engine.tiny import build_tiny
from app.errors import NotFoundError
from app.store.queries import LabelInfo

HOOK = "blocks.1.hook_resid_post"
TEXT = "def add(a, b):\n    return a + b  # sum of two numbers, a and b"
WHEN = datetime(2025, 1, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def lm():
    return build_tiny("tiny-llama")


def _sae(lm, architecture: str, *, seed: int) -> SAE:
    k = 7 if architecture in ("topk", "batchtopk") else None
    cfg = SAEConfig(architecture=architecture, d_in=lm.d_model, d_sae=96, k=k, hook_name=HOOK)
    sae = SAE.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(96, generator=gen) * 0.3)
        sae.b_dec.copy_(torch.randn(lm.d_model, generator=gen) * 0.1)
        if sae.threshold is not None:  # sparse enough that some rows are short
            sae.threshold.copy_(torch.rand(96, generator=gen) * 1.5)
    return sae.eval()


def _service(lm, sae: SAE) -> EngineService:
    reference = replace(sae.cfg, metadata={})
    served = SAE.from_tensors(reference, dict(sae.state_dict()))
    return EngineService(lm, {"s": LoadedSAE(sae_id="s", hook_name=HOOK,
                                             sae=served.eval().store_encoder_transposed())})


def _dense(lm, sae: SAE, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return sae.encode(lm.run_to_hook(ids, HOOK)[0]).float().numpy()


@pytest.mark.parametrize(("architecture", "repeat"), [
    ("topk", 1), ("topk", 10),  # 10: past _TRANSPOSED_MAX_ROWS tokens, the untransposed product
    ("relu", 1), ("jumprelu", 1), ("batchtopk", 1),
])
def test_search_equals_brute_force_over_the_dense_code(lm, architecture, repeat):
    sae = _sae(lm, architecture, seed=5)
    service = _service(lm, sae)
    ids = service.tokenize(sae_id="s", text=TEXT * repeat)
    assert (len(ids) > _TRANSPOSED_MAX_ROWS) == (repeat > 1)
    acts = _dense(lm, sae, ids)
    assert (acts > 0).any()
    out = service.search(sae_id="s", ids=ids, top_k=4, n_features=200)

    assert out["token_ids"] == ids and out["special"] == [i == lm.bos_token_id for i in ids]
    for pos, row in enumerate(out["per_token"]):
        firing = [f for f in range(96) if acts[pos, f] > 0]
        expected = sorted(firing, key=lambda f: -acts[pos, f])[:4]
        assert [f["index"] for f in row] == expected
        assert [f["value"] for f in row] == pytest.approx(acts[pos, expected].tolist(), rel=1e-5)

    body = acts[1:]  # BOS is special: left out of the whole-text ranking
    fired = [f for f in range(96) if (body[:, f] > 0).any()]
    order = sorted(fired, key=lambda f: (-body[:, f].max(), f))
    got = out["top_features"]
    assert [f["index"] for f in got] == order  # n_features=200 > 96: every latent that fired
    for f in got:
        column = body[:, f["index"]]
        assert f["max_value"] == pytest.approx(float(column.max()), rel=1e-5)
        assert f["max_token_index"] == 1 + int(column.argmax())
        assert f["sum_value"] == pytest.approx(float(column[column > 0].sum()), rel=1e-5)
        assert f["n_tokens"] == int((column > 0).sum())


def test_n_features_and_top_k_cut_the_lists(lm):
    service = _service(lm, _sae(lm, "topk", seed=2))
    ids = service.tokenize(sae_id="s", text=TEXT)
    full = service.search(sae_id="s", ids=ids, top_k=7, n_features=200)
    cut = service.search(sae_id="s", ids=ids, top_k=2, n_features=3)
    assert cut["top_features"] == full["top_features"][:3]
    assert cut["per_token"] == [row[:2] for row in full["per_token"]]
    assert all(len(row) <= 7 for row in full["per_token"])


def test_special_only_text_has_per_token_rows_but_no_text_features(lm):
    service = _service(lm, _sae(lm, "topk", seed=2))
    out = service.search(sae_id="s", ids=[lm.bos_token_id], top_k=5, n_features=20)
    assert out["special"] == [True] and len(out["per_token"]) == 1
    assert out["top_features"] == []
    empty = service.search(sae_id="s", ids=[], top_k=5, n_features=20)
    assert empty["per_token"] == [] and empty["top_features"] == []


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_feature_activations_equal_the_dense_column(lm, architecture):
    sae = _sae(lm, architecture, seed=9)
    service = _service(lm, sae)
    ids = service.tokenize(sae_id="s", text=TEXT)
    acts = _dense(lm, sae, ids)
    for index in range(96):
        values = service.feature_activations(sae_id="s", ids=ids, index=index)["values"]
        assert values == pytest.approx(acts[:, index].tolist(), rel=1e-5, abs=1e-6)


def test_serving_layout_keeps_the_weights_and_the_code(lm):
    sae = _sae(lm, "topk", seed=4)
    x = torch.randn(5, lm.d_model, generator=torch.Generator().manual_seed(0))
    before = sae.W_enc.detach().clone()
    with torch.inference_mode():
        code = sae.encode(x)
    sae.store_encoder_transposed()
    assert torch.equal(sae.W_enc.detach(), before)
    assert sae.W_enc.t().is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(sae.encode(x), code, rtol=1e-5, atol=1e-6)


def test_search_json_is_the_searchout_shape():
    result = {
        "tokens": ["<s>", " a</script>", "é"], "token_ids": [1, 7, 9],
        "special": [True, False, False],
        "per_token": [[{"index": 3, "value": 0.5}], [{"index": 4, "value": 2.25},
                                                     {"index": 3, "value": 1e-7}], []],
        "top_features": [{"index": 4, "max_value": 2.25, "max_token_index": 1,
                          "sum_value": 2.25, "n_tokens": 1}],
    }
    labels = {4: LabelInfo(description="fours", tags=[], status="draft", author="", version=1,
                           updated_at=WHEN), 3: LabelInfo(description="", tags=[], status="",
                                                          author="", version=1, updated_at=WHEN)}
    raw = _search_json(result, labels, sae_id="s", model_id="m")
    reference = SearchOut(
        sae_id="s", model_id="m", tokens=result["tokens"], token_ids=result["token_ids"],
        special=result["special"],
        per_token=[[{**f, "label": {4: "fours"}.get(f["index"])} for f in row]
                   for row in result["per_token"]],
        top_features=[{**f, "label": "fours"} for f in result["top_features"]],
    )
    assert json.loads(raw) == json.loads(reference.model_dump_json())
    assert SearchOut.model_validate_json(raw) == reference


def test_warm_up_keeps_good_saes_and_drops_one_that_cannot_search(lm):
    good = _service(lm, _sae(lm, "topk", seed=2))
    sae = _sae(lm, "topk", seed=3)
    bad_hook = f"blocks.{lm.n_layers + 5}.hook_resid_post"  # past the last block
    service = EngineService(lm, {
        "good": good.saes["s"],
        "bad": LoadedSAE(sae_id="bad", hook_name=bad_hook, sae=sae),
    })
    service.warm_up()
    assert list(service.saes) == ["good"]
    assert "test search failed" in service.skipped["bad"]
    with pytest.raises(NotFoundError, match="test search failed"):
        service.search(sae_id="bad", ids=[1, 2], top_k=5, n_features=5)
