"""The feature JSON builder: one FeatureDetail as the body of GET .../features/{index}.

Its shape is app.api.schemas.FeatureOut (Neuronpedia's keys, then saescope's own); tests/api
checks that every response validates against that schema with exactly its keys.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from app.api.autointerp_schemas import draft_json, score_json
from app.api.public_paths import public_path
from app.store.read_models import FeatureDetail, LabelInfo, ScoreInfo


def _label_json(label: LabelInfo | None, scores: dict[int, list[ScoreInfo]]
                ) -> dict[str, Any] | None:
    if label is None:
        return None
    return {"description": label.description, "tags": label.tags, "status": label.status,
            "author": label.author, "version": label.version,
            "updated_at": label.updated_at.isoformat(), "id": label.id,
            "scores": [score_json(s) for s in scores.get(label.id, [])]}


def feature_etag(f: FeatureDetail) -> str:
    """The feature JSON's ETag: its run, every label of the feature and the shown labels of its
    neighbours (id and version each), and the scores of its labels (a score is added without a
    new label version), so it changes whenever any of them does."""
    neighbours = sorted((i, lb.id, lb.version) for i, lb in f.neighbour_labels.items())
    scores = sorted((s.label_id, s.label_version, s.method, s.scorer, s.seed,
                     s.created_at.isoformat()) for ss in f.label_scores.values() for s in ss)
    key = repr((f.sae_id, f.index, f.run_id, f.label_versions, neighbours, scores)).encode()
    return '"f-' + hashlib.sha256(key).hexdigest()[:32] + '"'


def feature_json(f: FeatureDetail, *, home: Path) -> bytes:
    """One feature as FeatureOut's JSON, built from plain dicts and dumped by orjson; a corpus
    path shows relative to the data folder `home` (app/api/public_paths.py).

    No pydantic model per window: on the API's hottest route, building and serializing them, and
    the stdlib encoder's float reprs, cost more than reading the feature (measured in
    bench/serve.py). Window values go out as float32 arrays (shortest float32 repr; inf/NaN
    become null).
    """
    bands = {b.band: b for b in f.bands}
    activations = []
    for w in f.windows:
        band = bands.get(w.band) if w.kind == "interval" else None
        activations.append({
            "tokens": w.tokens, "token_ids": w.token_ids,
            "values": w.values if w.values_f16 is None else w.values_f16.astype(np.float32),
            # float32 like the values, so the two print (and parse) as the same number.
            "maxValue": np.float32(w.max_value), "maxValueTokenIndex": w.max_pos,
            "binMin": band.lo if band else -1.0, "binMax": band.hi if band else -1.0,
            "binContains": band.share if band else -1.0,
            "kind": w.kind, "band": w.band, "rank": w.rank, "doc_name": w.doc_name,
            "documents": [{"offset": d.offset, "doc_index": d.doc_index, "name": d.name}
                          for d in w.documents],
            "seq_index": w.seq_index, "start": w.start,
        })
    edges = f.hist_edges
    centers = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    described = {i: label.description for i, label in f.neighbour_labels.items()
                 if label.description}
    body = {
        "modelId": f.model_id, "layer": f.sae_id, "index": f.index,
        "frac_nonzero": f.frac_nonzero, "maxActApprox": f.max_act,
        "pos_str": [t.token for t in f.logits_pos], "pos_values": [t.value for t in f.logits_pos],
        "neg_str": [t.token for t in f.logits_neg], "neg_values": [t.value for t in f.logits_neg],
        "freq_hist_data_bar_heights": f.hist_counts, "freq_hist_data_bar_values": centers,
        "topkCosSimIndices": [i for i, _ in f.neighbours],
        "topkCosSimValues": [c for _, c in f.neighbours],
        "activations": activations,
        "sae_id": f.sae_id, "model_id": f.model_id, "d_sae": f.d_sae,
        "label": _label_json(f.label, f.label_scores),
        "drafts": [draft_json(d, f.label_scores.get(d.id, []), etag=f'"{d.id}-{d.version}"')
                   for d in f.drafts],
        "density": f.frac_nonzero, "count": f.count, "mean_act": f.mean_act,
        "max_act": f.max_act, "dense": f.frac_nonzero > f.dense_threshold,
        "pos_ids": [t.token_id for t in f.logits_pos],
        "neg_ids": [t.token_id for t in f.logits_neg],
        "hist": {"edges": edges, "counts": f.hist_counts},
        "bands": [{"band": b.band, "min": b.lo, "max": b.hi, "share": b.share, "count": b.count}
                  for b in f.bands],
        "neighbours": [{"index": i, "cos": c, "label": described.get(i)}
                       for i, c in f.neighbours],
        "n_tokens_counted": f.n_tokens_counted,
        "corpus": public_path(f.corpus, home=home),
        "prev_index": f.index - 1 if f.index > 0 else None,
        "next_index": f.index + 1 if f.index + 1 < f.d_sae else None,
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
