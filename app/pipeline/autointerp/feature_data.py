"""What an explainer or scorer sees of one feature: its windows (tokens with per-token
activations: top, interval samples, and windows where it does not fire) and its logit effects.

Plain frozen records, built from the store's feature read (`FeatureData.from_detail`) or by
hand in tests; nothing here touches the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from app.store.read_models import FeatureDetail

WindowKind = Literal["top", "interval", "negative"]


@dataclass(frozen=True)
class Window:
    """A stretch of text: its tokens as display strings (leading spaces kept) and the feature's
    activation on each. ``band``: the activation band of an interval sample (0 lowest)."""

    tokens: tuple[str, ...]
    values: tuple[float, ...]
    kind: WindowKind = "top"
    band: int | None = None
    token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.values):
            raise ValueError(f"a window has {len(self.tokens)} tokens and "
                             f"{len(self.values)} activations")
        if self.token_ids and len(self.token_ids) != len(self.tokens):
            raise ValueError(f"a window has {len(self.tokens)} tokens and "
                             f"{len(self.token_ids)} token ids")

    @classmethod
    def of(cls, tokens: Sequence[str], values: Sequence[float], **kwargs: object) -> Window:
        """From lists (the values as plain floats)."""
        return cls(tuple(tokens), tuple(float(v) for v in values), **kwargs)  # type: ignore[arg-type]

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_value(self) -> float:
        return max(self.values, default=0.0)

    @property
    def max_index(self) -> int:
        """Position of the highest activation (the first one of equals); 0 when empty."""
        return max(range(len(self.values)), key=lambda i: (self.values[i], -i), default=0)


@dataclass(frozen=True)
class LogitEffect:
    """A token the feature's decoder direction promotes (value > 0) or suppresses (< 0)."""

    token: str
    value: float


@dataclass(frozen=True)
class FeatureData:
    """One feature as explainers and scorers see it. ``max_act`` is over the whole corpus (a
    window's own max may be lower); ``negatives`` are windows where it stays at zero, for the
    detection scorer, and may be empty."""

    sae_id: str
    index: int
    top: tuple[Window, ...] = ()
    intervals: tuple[Window, ...] = ()
    promoted: tuple[LogitEffect, ...] = ()
    suppressed: tuple[LogitEffect, ...] = ()
    max_act: float = 0.0
    frac_nonzero: float = 0.0
    negatives: tuple[Window, ...] = field(default=())

    @property
    def windows(self) -> tuple[Window, ...]:
        """Every window where the feature fires: top ones, then interval samples."""
        return self.top + self.intervals

    @classmethod
    def from_detail(cls, detail: FeatureDetail, *,
                    negatives: Sequence[Window] = ()) -> FeatureData:
        """From the store's feature read (app.store.queries): its top and interval windows and
        its logit effects."""
        def window(w) -> Window:  # noqa: ANN001 - the store's WindowInfo
            return Window(tuple(w.tokens), tuple(float(v) for v in w.values), kind=w.kind,
                          band=w.band if w.kind == "interval" else None,
                          token_ids=tuple(int(i) for i in w.token_ids))

        return cls(
            sae_id=detail.sae_id, index=detail.index,
            top=tuple(window(w) for w in detail.windows if w.kind == "top"),
            intervals=tuple(window(w) for w in detail.windows if w.kind == "interval"),
            promoted=tuple(LogitEffect(t.token, float(t.value)) for t in detail.logits_pos),
            suppressed=tuple(LogitEffect(t.token, float(t.value)) for t in detail.logits_neg),
            max_act=float(detail.max_act), frac_nonzero=float(detail.frac_nonzero),
            negatives=tuple(negatives))
