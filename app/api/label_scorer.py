"""Scoring a label on request: the `LabelScorer` protocol the score route calls, and its
dependency.

The API never imports the pipeline (nor torch): the composition root (app/server_scoring.py)
builds the real scorer, the pipeline's score_label over the server's loaded model with every
model step on the model worker, and sets it as `app.state.label_scorer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Protocol

from fastapi import Depends, Request

from app.errors import UnavailableError
from app.store.read_models import LabelInfo


class LabelScorer(Protocol):
    async def score(self, *, label: LabelInfo, methods: Sequence[str], seed: int) -> None:
        """Score `label`'s current text by `methods` (detection, fuzzing) with windows drawn by
        `seed`, and store the scores with the version scored. Raises UnavailableError or
        BusyError (503) when the model cannot take it now, ConflictError when this server
        cannot score this SAE, PreconditionFailedError when the label changed meanwhile."""
        ...


async def get_label_scorer(request: Request) -> LabelScorer:
    scorer = getattr(request.app.state, "label_scorer", None)
    if scorer is None:
        raise UnavailableError("this server does not score labels (it was built without the "
                               "pipeline); use `saescope explain`")
    return scorer


LabelScorerDep = Annotated[LabelScorer, Depends(get_label_scorer)]
