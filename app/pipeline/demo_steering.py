"""The steering runs `saescope demo` saves in the demo database: features of the default SAE at
strengths found with the sweep that visibly turn the text (README, "Steering lab"), so the
demo's /steer page lists them and each has a URL.

Each is saved once, by name and author: a rerun finds them and loads no model; a missing one
costs one greedy side-by-side generation. Its request is stored as the API stores a saved run's
(POST /api/v1/steer/runs), so "open in the lab" prefills it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from app.engine.service import EngineService
from app.store.db import make_engine, read_session, write_session
from app.store.steering import list_runs, save_run

DEMO_AUTHOR = "saescope demo"


@dataclass(frozen=True)
class DemoRun:
    """One saved run: a prompt (as a chat turn), one feature added at a strength."""

    name: str
    prompt: str
    index: int
    value: float
    mode: str = "add"
    max_new_tokens: int = 40
    chat_template: bool = True

    def request(self, sae_id: str) -> dict[str, Any]:
        """The run's request, with every field of the API's SteerIn."""
        return {"sae_id": sae_id, "prompt": self.prompt, "scope": "all",
                "max_new_tokens": self.max_new_tokens, "temperature": 0.0, "top_p": 1.0,
                "seed": 0, "chat_template": self.chat_template,
                "features": [{"index": self.index, "mode": self.mode, "value": self.value,
                              "sae_id": None}],
                "vectors": []}


# Found with the sweep on the default SAE (15-res-topk-4k of smollm2-135m, README "Steering
# lab"): each feature turned the text its way on several prompts, the text still fluent.
WEEKEND = "Tell me about your weekend."
CAT_STORY = "Write a short story about a cat."
DEMO_RUNS: tuple[DemoRun, ...] = (
    # Fires on " was", " were", " appeared"; promotes " earlier", " before", " previous".
    DemoRun(name="past tense: feature 462 (was / were), add 20", prompt=WEEKEND, index=462,
            value=20.0),
    # Fires on " version(s)"; the weekend becomes a software release.
    DemoRun(name="versions: feature 2491 (version), add 60", prompt=WEEKEND, index=2491,
            value=60.0),
    # Fires on "new" / "New"; the story opens a new chapter.
    DemoRun(name="something new: feature 3113 (new), add 50", prompt=CAT_STORY, index=3113,
            value=50.0),
)


def saved_demo_runs(engine: Engine, *, sae_id: str) -> dict[str, int]:
    """name -> id of the demo's runs already saved for this SAE."""
    with read_session(engine) as session:
        return {run.name: run.id for run in list_runs(session=session, sae_id=sae_id)
                if run.author == DEMO_AUTHOR}


def ensure_demo_runs(*, db_url: str, sae_id: str, load_service: Callable[[], EngineService],
                     runs: Sequence[DemoRun] = DEMO_RUNS,
                     log: Callable[[str], None] = print) -> dict[str, int]:
    """Save the runs the database lacks (generating each once with the service that
    ``load_service`` loads, only if one is missing); name -> run id of every demo run."""
    engine = make_engine(db_url)
    try:
        saved = saved_demo_runs(engine, sae_id=sae_id)
        missing = [run for run in runs if run.name not in saved]
        if not missing:
            return {run.name: saved[run.name] for run in runs}
        service = load_service()
        for run in missing:
            request = run.request(sae_id)
            done: dict[str, Any] = {}
            for events in service.steer_stream(**request):
                done.update(next((e["data"] for e in events if e["event"] == "done"), {}))
            with write_session(engine, durable=True) as session:
                info = save_run(session=session, name=run.name, sae_id=sae_id, request=request,
                                default_text=done["default"]["text"],
                                steered_text=done["steered"]["text"], author=DEMO_AUTHOR)
            saved[run.name] = info.id
            log(f"saved steering run {info.id}: {run.name}")
        return {run.name: saved[run.name] for run in runs}
    finally:
        engine.dispose()
