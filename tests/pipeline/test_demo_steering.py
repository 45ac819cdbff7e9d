"""The demo's saved steering runs on a tiny model: saved once with the API's request shape, a
rerun loads no model and adds nothing, and a run added to the list is the only one generated."""

from __future__ import annotations

from app.api.steer_schemas import SteerIn
from app.engine.service import EngineService, SAESpec
from app.pipeline.demo_steering import DEMO_AUTHOR, DemoRun, ensure_demo_runs
from app.store.db import make_engine, read_session
from app.store.steering import list_runs
from tests.api.steer_support import HOOK, PROMPT, SAE_ID, build_database

RUNS = (DemoRun(name="pushed", prompt=PROMPT, index=5, value=60.0, max_new_tokens=6,
                chat_template=False),
        DemoRun(name="ablated", prompt=PROMPT, index=5, value=0.0, mode="ablate",
                max_new_tokens=6, chat_template=False))


def test_demo_runs_are_saved_once(tmp_path):
    home, url = build_database(tmp_path)
    loads = []

    def load() -> EngineService:
        loads.append(1)
        spec = SAESpec(sae_id=SAE_ID, model_id="tiny-llama", hook_name=HOOK,
                       path=str(home / "sae"))
        return EngineService.load(saes=[spec], model="tiny-llama", cache_dir=home / "cache")

    def saved():
        engine = make_engine(url)
        try:
            with read_session(engine) as session:
                return {run.name: run for run in list_runs(session=session, sae_id=SAE_ID)}
        finally:
            engine.dispose()

    first = ensure_demo_runs(db_url=url, sae_id=SAE_ID, load_service=load, runs=RUNS,
                             log=lambda _: None)
    runs = saved()
    assert len(loads) == 1 and first == {name: run.id for name, run in runs.items()}
    pushed = runs["pushed"]
    assert pushed.author == DEMO_AUTHOR and pushed.steered_text != pushed.default_text
    # Stored as the API stores a saved run's request, so the lab can open it.
    assert SteerIn.model_validate(pushed.request).model_dump(mode="json") == pushed.request

    assert ensure_demo_runs(db_url=url, sae_id=SAE_ID, load_service=load, runs=RUNS,
                            log=lambda _: None) == first
    assert len(loads) == 1 and len(saved()) == 2  # a rerun generates and adds nothing

    more = (*RUNS, DemoRun(name="doubled", prompt=PROMPT, index=5, value=2.0, mode="multiply",
                           max_new_tokens=6, chat_template=False))
    third = ensure_demo_runs(db_url=url, sae_id=SAE_ID, load_service=load, runs=more,
                             log=lambda _: None)
    assert len(loads) == 2 and len(saved()) == 3
    assert {k: third[k] for k in first} == first
