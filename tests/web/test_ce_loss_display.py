"""CE loss recovered is shown with the nats the SAE adds beside it, and flagged when zero-ablating
the hook barely hurts: in the terminal (train-sae, build), the JSON API, the home table and the
SAE overview page."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.engine.evals import format_evals
from app.main import create_app
from app.records import CE_ABLATION_GAP_MIN_NATS, ce_loss_figures, describe_ce_loss
from app.settings import Settings
from tests.factories import synthetic_database, synthetic_run

HTML = {"Accept": "text/html,application/xhtml+xml"}
# An MLP-out SAE: zero-ablation adds only 0.12 nats, so the SAE's 0.06 reads as "50% recovered".
SMALL_GAP = {"ce_loss_clean": 3.0, "ce_loss_sae": 3.06, "ce_loss_ablated": 3.12,
             "ce_loss_recovered": 0.5}
LARGE_GAP = {"ce_loss_clean": 3.0, "ce_loss_sae": 3.06, "ce_loss_ablated": 9.0,
             "ce_loss_recovered": 0.99}


def test_ce_loss_figures_and_the_flag() -> None:
    assert CE_ABLATION_GAP_MIN_NATS == 0.5
    small = ce_loss_figures(SMALL_GAP)
    assert small["ce_loss_increase"] == pytest.approx(0.06)
    assert small["ce_loss_ablation_gap"] == pytest.approx(0.12)
    assert small["ce_loss_recovered_unreliable"] is True
    assert ce_loss_figures(LARGE_GAP)["ce_loss_recovered_unreliable"] is False
    assert ce_loss_figures({}) == {"ce_loss_recovered": None, "ce_loss_increase": None,
                                   "ce_loss_ablation_gap": None,
                                   "ce_loss_recovered_unreliable": None}


def test_terminal_lines_show_nats_and_flag_a_small_gap() -> None:
    # build's summary line
    assert describe_ce_loss(SMALL_GAP) == ("CE loss recovered 0.500 (SAE adds +0.060 nats; "
                                           "unreliable: zero-ablation adds only 0.120 nats, "
                                           "under 0.5)")
    assert describe_ce_loss(LARGE_GAP) == "CE loss recovered 0.990 (SAE adds +0.060 nats)"
    # train-sae's evaluation block
    evals = {"n_tokens": 512, "l0": 4.0, "explained_variance": 0.9, "normalized_mse": 0.1,
             "n_dead": 0, "n_dense": 0, "ce_loss_increase": 0.06, **SMALL_GAP}
    lines = format_evals(evals).splitlines()
    assert "(+0.0600 nats)" in next(line for line in lines if "with SAE" in line)
    recovered = next(line for line in lines if "recovered" in line)
    assert "unreliable: zero-ablation adds only 0.1200 nats" in recovered
    assert "unreliable" not in format_evals({**evals, **LARGE_GAP})


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    db_url = f"sqlite:///{tmp_path / 'ce.db'}"
    rec = synthetic_run(sae_id="5-mlp-topk-64")
    rec.run.sae_stats.update(SMALL_GAP)
    synthetic_database(db_url, rec)
    settings = Settings(home=tmp_path, database_url=db_url, load_model=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_json_pages_show_nats_and_flag(client) -> None:
    row = client.get("/api/v1/saes").json()["data"][0]
    assert row["ce_loss_recovered"] == pytest.approx(0.5)
    assert row["ce_loss_increase"] == pytest.approx(0.06)
    assert row["ce_loss_ablation_gap"] == pytest.approx(0.12)
    assert row["ce_loss_recovered_unreliable"] is True
    detail = client.get("/api/v1/saes/5-mlp-topk-64").json()
    assert detail["ce_loss_recovered_unreliable"] is True

    home = client.get("/", headers=HTML).text
    assert "+0.0600 nats" in home and "ratio unreliable" in home
    overview = client.get(f"/{row['model_id']}/5-mlp-topk-64", headers=HTML).text
    assert "CE loss recovered (unreliable)" in overview and "+0.0600 nats" in overview
    assert "zero-ablating the hook adds only 0.120 nats" in overview
