"""The demo's draft descriptions: the pattern explainer (no model, seconds for the whole SAE) over
every live feature of the default SAE, unscored, so an annotator of the demo starts from a draft
and a reviewer has drafts to accept; a rerun skips the features already drafted."""

from __future__ import annotations

from collections.abc import Callable

from app.pipeline.autointerp.explain_job import ExplainJob, ExplainSummary, run_explain
from app.pipeline.autointerp.pattern import explain_pattern
from app.store.db import make_engine


def ensure_demo_drafts(*, db_url: str, sae_id: str, log: Callable[[str], None],
                       progress: bool = True) -> ExplainSummary:
    """Pattern drafts by autointerp:pattern for `sae_id`'s live features that have none yet
    (`saescope explain --sae SAE_ID --score none`); scoring is left to `saescope explain`."""
    engine = make_engine(db_url)
    try:
        return run_explain(engine, ExplainJob(sae_id=sae_id, methods=(), progress=progress),
                           explain=explain_pattern, scorer=None, negatives=None, log=log,
                           explainer_details={"explainer": "pattern"})
    finally:
        engine.dispose()
