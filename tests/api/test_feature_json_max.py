"""A window's maxValue is the number its values list shows at maxValueTokenIndex, over a
database built by the real pipeline (windows are stored as float16, their max as float32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.engine.sae import SAE, SAEConfig
from app.engine.tiny import build_tiny
from app.main import create_app
from app.pipeline.precompute import BuildOptions, build
from app.settings import Settings

SAE_ID = "2-res-topk-96"
TEXT = ("the quick brown fox jumps over a lazy dog ; def add ( a , b ) : return a + b "
        "class Counter 0 1 2 3 10 100")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    root = tmp_path_factory.mktemp("maxvalue")
    corpus = root / "docs"
    corpus.mkdir()
    rng, words = np.random.default_rng(3), TEXT.split()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, rng.integers(30, 300))))
    cfg = SAEConfig(architecture="topk", d_in=64, d_sae=96, k=10,
                    hook_name="blocks.2.hook_resid_post", model_name="tiny-llama",
                    context_size=32)
    sae = SAE.from_config(cfg, seed=2)
    with torch.no_grad():  # maxima from below 0.1 (where float16 prints long) to over 10
        sae.W_enc.mul_(torch.logspace(-2, 1.6, 96))
    sae.save(root / SAE_ID)
    db_url = f"sqlite:///{root / 'built.db'}"
    build(BuildOptions(sae_path=root / SAE_ID, corpus=str(corpus), n_tokens=1280, batch_size=8,
                       window_len=12, n_top=8, n_bands=4, per_band=2, eval_tokens=64,
                       db_url=db_url, cache_dir=root / "cache", progress=False),
          lm=build_tiny("tiny-llama"), sae=SAE.load(root / SAE_ID), log=lambda m: None)
    settings = Settings(home=root, database_url=db_url, load_model=False)
    with TestClient(create_app(settings)) as c:
        yield c


def test_max_value_is_the_value_at_its_index(client) -> None:
    alive = client.get(f"/api/v1/saes/{SAE_ID}/features?filter=alive&per_page=100").json()
    checked = 0
    for row in alive["data"]:
        # Parsed from the response text, as any client reads it.
        body = json.loads(client.get(f"/api/v1/saes/{SAE_ID}/features/{row['index']}").text)
        for a in body["activations"]:
            peak = a["values"][a["maxValueTokenIndex"]]
            assert a["maxValue"] == peak, (row["index"], a["rank"], a["maxValue"], peak)
            assert peak == max(v for v in a["values"] if v is not None)
            checked += 1
    assert checked > 100 and alive["count"] > 20
