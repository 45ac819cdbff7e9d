"""Wire schemas of automatic descriptions: a label's scores, the automatic drafts of a feature,
scoring a label on request, and an SAE's summary (counts and score histograms)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.store.read_models import AutointerpSummary, LabelInfo, ScoreInfo

ScoreMethod = Literal["detection", "fuzzing"]
# Score histograms: equal bins over [0, 1] (a balanced accuracy), the last one closed.
SCORE_BINS = 20


class ScoreOut(BaseModel):
    """One score of a label's current text: a balanced accuracy (0.5 is chance), with the same
    scorer's score for a random other explanation on the same windows beside it."""

    method: ScoreMethod
    scorer: str = Field(description="The chat backend that read the explanation and answered")
    score: float | None = Field(description="Balanced accuracy; null when not measurable "
                                            "(details.skipped says why)")
    control_score: float | None = Field(description="The random-explanation control")
    n_windows: int
    seed: int
    label_version: int = Field(description="The label version that was scored")
    created_at: datetime
    details: dict[str, Any]

    @classmethod
    def of(cls, s: ScoreInfo) -> ScoreOut:
        return cls(method=s.method, scorer=s.scorer, score=s.score,  # type: ignore[arg-type]
                   control_score=s.control_score, n_windows=s.n_windows, seed=s.seed,
                   label_version=s.label_version, created_at=s.created_at, details=s.details)


def score_json(s: ScoreInfo) -> dict[str, Any]:
    """ScoreOut as plain JSON types (the feature JSON is built from dicts)."""
    return {"method": s.method, "scorer": s.scorer, "score": s.score,
            "control_score": s.control_score, "n_windows": s.n_windows, "seed": s.seed,
            "label_version": s.label_version, "created_at": s.created_at.isoformat(),
            "details": s.details}


class DraftOut(BaseModel):
    """An automatic draft of a feature: never its shown label until a reviewer accepts it."""

    id: int
    author: str = Field(description="autointerp:<explainer>")
    explainer: str
    description: str
    status: str
    version: int
    etag: str = Field(description="For If-Match on the review route")
    scores: list[ScoreOut]


def draft_json(label: LabelInfo, scores: list[ScoreInfo], *, etag: str) -> dict[str, Any]:
    return {"id": label.id, "author": label.author,
            "explainer": label.author.split(":", 1)[-1], "description": label.description,
            "status": label.status, "version": label.version, "etag": etag,
            "scores": [score_json(s) for s in scores]}


class ScoreIn(BaseModel):
    """What to measure: detection needs the model and SAE to find windows where the feature is
    zero; fuzzing reads only the stored windows."""

    methods: list[ScoreMethod] = Field(default=["detection", "fuzzing"], min_length=1,
                                       max_length=2)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Draws the windows; a fixed seed "
                                                          "gives a repeatable score")


class ExplainerCountsOut(BaseModel):
    explainer: str
    total: int
    draft: int
    needs_review: int
    accepted: int
    rejected: int


class ScoreSeriesOut(BaseModel):
    source: str = Field(description="An explainer, or 'people' for people's labels")
    method: ScoreMethod
    scorer: str
    n: int
    mean: float | None
    control_mean: float | None
    edges: list[float]
    counts: list[int]
    control_counts: list[int]


class AutointerpOut(BaseModel):
    labeled: int = Field(description="Features with a shown label")
    drafted: int = Field(description="Features with an automatic draft waiting for review")
    accepted: int = Field(description="Features with an accepted automatic label")
    explainers: list[ExplainerCountsOut]
    series: list[ScoreSeriesOut]

    @classmethod
    def of(cls, summary: AutointerpSummary) -> AutointerpOut:
        return cls(labeled=summary.labeled, drafted=summary.drafted, accepted=summary.accepted,
                   explainers=[ExplainerCountsOut(**vars(e)) for e in summary.explainers],
                   series=[ScoreSeriesOut(**series_json(s)) for s in summary.series])


def histogram(values: list[float], bins: int = SCORE_BINS) -> tuple[list[float], list[int]]:
    """Counts of `values` in equal bins over [0, 1] (1.0 falls in the last bin)."""
    edges = [i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(max(int(v * bins), 0), bins - 1)] += 1
    return edges, counts


def series_json(s: Any) -> dict[str, Any]:
    """A ScoreSeries as ScoreSeriesOut's fields: its size, means and histograms."""
    edges, counts = histogram(s.scores)
    _, control_counts = histogram(s.controls)
    return {"source": s.source, "method": s.method, "scorer": s.scorer, "n": len(s.scores),
            "mean": sum(s.scores) / len(s.scores) if s.scores else None,
            "control_mean": sum(s.controls) / len(s.controls) if s.controls else None,
            "edges": edges, "counts": counts, "control_counts": control_counts}
