"""Read endpoints: feature JSON in Neuronpedia's keys, the feature table, one error shape."""

from __future__ import annotations

from typing import get_args, get_origin

import numpy as np
import pytest
from pydantic import BaseModel

from app.api.schemas import FeatureOut
from app.records import WINDOW_KIND_TOP

SAE_ID = "1-res-topk-64"
NEURONPEDIA_KEYS = {
    "frac_nonzero", "maxActApprox", "pos_str", "pos_values", "neg_str", "neg_values",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "topkCosSimIndices",
    "topkCosSimValues", "activations",
}
ACTIVATION_KEYS = {"tokens", "values", "maxValue", "maxValueTokenIndex", "binMin", "binMax",
                   "binContains"}


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"status", "message"}
    assert body["error"]["status"] == status
    for fragment in fragments:
        assert fragment in body["error"]["message"]


def test_list_models_and_saes(client, records):
    models = client.get("/api/v1/models").json()
    assert models["count"] == 1
    assert models["data"][0]["id"] == "tiny-llama"
    assert models["data"][0]["sae_ids"] == [SAE_ID]
    saes = client.get("/api/v1/saes").json()
    assert saes["count"] == 1
    row = saes["data"][0]
    assert {"id", "model_id", "hook_name", "d_sae"} <= set(row)
    assert (row["id"], row["model_id"], row["d_sae"]) == (SAE_ID, "tiny-llama", 32)
    assert row["n_labeled"] == 2
    assert row["explained_variance"] == pytest.approx(0.8)
    detail = client.get(f"/api/v1/saes/{SAE_ID}").json()
    assert detail["stats"]["l0_hist"] == records.run.sae_stats["l0_hist"]
    assert detail["run"]["corpus"] == "synthetic"


def test_feature_json_uses_neuronpedia_keys(client, records):
    index = 4
    body = client.get(f"/api/v1/saes/{SAE_ID}/features/{index}").json()
    assert set(body) >= NEURONPEDIA_KEYS
    f, w = records.features, records.windows
    vocab = records.model.token_strings
    assert body["index"] == index and body["sae_id"] == SAE_ID and body["model_id"] == "tiny-llama"
    assert body["frac_nonzero"] == pytest.approx(f.frac_nonzero[index])
    assert body["maxActApprox"] == pytest.approx(float(f.max_act[index]))
    assert body["pos_str"] == [vocab[i] for i in f.logit_pos_ids[index]]
    assert body["neg_values"] == pytest.approx(f.logit_neg_values[index].tolist())
    assert body["freq_hist_data_bar_heights"] == f.hist_counts[index].tolist()
    edges = f.hist_edges
    assert body["freq_hist_data_bar_values"] == pytest.approx((edges[:-1] + edges[1:]) / 2)
    assert body["hist"]["edges"] == pytest.approx(edges.tolist())
    assert body["topkCosSimIndices"] == f.neighbour_idx[index].tolist()
    assert body["label"]["description"] == "digits"
    assert body["label"]["tags"] == ["numbers"]
    assert [b["share"] for b in body["bands"]] == pytest.approx(f.band_share[index].tolist())

    mine = w.feature == index
    assert len(body["activations"]) == int(mine.sum())
    n_top = int((mine & (w.kind == WINDOW_KIND_TOP)).sum())
    tops = body["activations"][:n_top]
    assert [a["kind"] for a in tops] == ["top"] * n_top
    assert [a["maxValue"] for a in tops] == sorted((a["maxValue"] for a in tops), reverse=True)
    for a in body["activations"]:
        assert set(a) >= ACTIVATION_KEYS
        assert len(a["tokens"]) == len(a["values"])
        assert a["values"][a["maxValueTokenIndex"]] == pytest.approx(a["maxValue"], rel=1e-3)
        if a["kind"] == "top":
            assert (a["binMin"], a["binMax"], a["binContains"]) == (-1, -1, -1)
        else:
            band = body["bands"][a["band"]]
            assert (a["binMin"], a["binMax"], a["binContains"]) == (
                band["min"], band["max"], band["share"]
            )
            assert a["binMin"] <= a["maxValue"] <= a["binMax"] * 1.001
    neighbours = {n["index"]: n["label"] for n in body["neighbours"]}
    assert set(neighbours) == set(f.neighbour_idx[index].tolist())
    assert neighbours.get(6, "commas") == "commas"  # a labeled neighbour shows its label


def test_feature_json_says_which_documents_each_window_shows(client, records):
    """Packed sequences: each window lists the documents it shows with the token offset where
    each later one starts (its BOS), as the sequence's packing says; the schema documents it."""
    seqs = records.sequences
    ctx = seqs.tokens.shape[1]
    row_of = {int(s): i for i, s in enumerate(seqs.seq_index)}
    crossing = 0
    for index in range(2, 32):
        body = client.get(f"/api/v1/saes/{SAE_ID}/features/{index}").json()
        for a in body["activations"]:
            of_pos = np.zeros(ctx, np.int64)
            for offset, doc in seqs.starts_of(row_of[a["seq_index"]]).tolist():
                of_pos[offset:] = doc
            shown = of_pos[a["start"]:a["start"] + len(a["tokens"])]
            want = [{"offset": 0, "doc_index": int(shown[0])}] + [
                {"offset": p, "doc_index": int(shown[p])} for p in range(1, len(shown))
                if shown[p] != shown[p - 1]]
            assert [{k: d[k] for k in ("offset", "doc_index")} for d in a["documents"]] == want
            assert [d["name"] for d in a["documents"]] == [
                seqs.doc_names[d["doc_index"]] for d in want]
            assert a["doc_name"] == a["documents"][0]["name"]
            assert all(a["tokens"][d["offset"]] == "tok1" for d in want[1:])  # the BOS
            crossing += len(want) > 1
    assert crossing > 0
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["ActivationOut"]["properties"]["documents"]["items"] == {
        "$ref": "#/components/schemas/WindowDocumentOut"}
    assert "BOS" in schema["WindowDocumentOut"]["properties"]["offset"]["description"]


def _assert_exact_shape(model: type[BaseModel], value: object, where: str) -> None:
    """`value` has exactly the keys of `model`, recursively (the JSON is built from dicts)."""
    assert isinstance(value, dict), where
    assert set(value) == set(model.model_fields), where
    for name, info in model.model_fields.items():
        inner = [a for a in get_args(info.annotation) or (info.annotation,)
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        args = get_args(info.annotation)
        if args and get_origin(info.annotation) is list and isinstance(args[0], type) \
                and issubclass(args[0], BaseModel):
            for i, item in enumerate(value[name]):
                _assert_exact_shape(args[0], item, f"{where}.{name}[{i}]")
        elif inner and value[name] is not None:
            _assert_exact_shape(inner[0], value[name], f"{where}.{name}")


@pytest.mark.parametrize("index", [0, 4, 6, 31])
def test_feature_json_matches_its_documented_schema(client, records, index):
    body = client.get(f"/api/v1/saes/{SAE_ID}/features/{index}").json()
    FeatureOut.model_validate(body)  # types, as /docs shows them
    _assert_exact_shape(FeatureOut, body, "feature")
    assert body["prev_index"] == (index - 1 if index else None)
    assert body["next_index"] == (index + 1 if index < 31 else None)


def test_feature_table(client, records):
    f = records.features
    body = client.get(f"/api/v1/saes/{SAE_ID}/features",
                      params={"sort": "max_act", "order": "desc", "per_page": 5, "page": 2}).json()
    expected = sorted(range(32), key=lambda i: (-float(f.max_act[i]), i))[5:10]
    assert [r["index"] for r in body["data"]] == expected
    assert (body["count"], body["page"], body["per_page"]) == (32, 2, 5)
    labeled = client.get(f"/api/v1/saes/{SAE_ID}/features", params={"filter": "labeled"}).json()
    assert [r["index"] for r in labeled["data"]] == [4, 6]
    assert labeled["data"][0]["label"]["description"] == "digits"
    tagged = client.get(f"/api/v1/saes/{SAE_ID}/features", params={"tag": "numbers"}).json()
    assert [r["index"] for r in tagged["data"]] == [4]
    dead = client.get(f"/api/v1/saes/{SAE_ID}/features", params={"filter": "dead"}).json()
    assert [r["index"] for r in dead["data"]] == [0, 1]
    text = client.get(f"/api/v1/saes/{SAE_ID}/features", params={"q": "COMMA"}).json()
    assert [r["index"] for r in text["data"]] == [6]
    random_index = client.get(f"/api/v1/saes/{SAE_ID}/features/random").json()["index"]
    assert 2 <= random_index < 32 and f.count[random_index] > 0
    tops = np.asarray(body["data"][0]["top_tokens"])
    assert tops.size >= 1


def test_errors_share_one_shape(client, records):
    assert_error(client.get("/api/v1/saes/nope"), 404, "nope")
    assert_error(client.get("/api/v1/saes/nope/features/0"), 404, "nope")
    assert_error(client.get(f"/api/v1/saes/{SAE_ID}/features/32"), 404, "0..31")
    assert_error(client.get("/api/v1/no-such-endpoint"), 404, "/api/v1/no-such-endpoint")
    assert_error(client.get(f"/api/v1/saes/{SAE_ID}/features/-1"), 422, "index")
    assert_error(client.get(f"/api/v1/saes/{SAE_ID}/features/abc"), 422, "index")
    assert_error(client.get(f"/api/v1/saes/{SAE_ID}/features", params={"sort": "label"}), 422,
                 "sort")
    assert_error(client.get(f"/api/v1/saes/{SAE_ID}/features", params={"per_page": 0}), 422,
                 "per_page")
    assert_error(client.post(f"/api/v1/saes/{SAE_ID}/search", json={}), 422, "text")


def test_unexpected_errors_use_the_shape_too(client):
    def boom() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/api/v1/boom", boom)
    response = client.get("/api/v1/boom")
    assert_error(response, 500, "internal server error")
    assert "secret" not in response.text


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/api/v1/saes/{sae_id}/features/{index}" in spec["paths"]
    assert "/api/v1/saes/{sae_id}/search" in spec["paths"]


def test_model_calls_without_a_model_answer_503(client):
    response = client.post(f"/api/v1/saes/{SAE_ID}/search", json={"text": "hello"})
    # The serve flag is named beside the variable, and how to turn the model back on.
    assert_error(response, 503, "SAESCOPE_LOAD_MODEL", "--no-model", "saescope serve --model")
