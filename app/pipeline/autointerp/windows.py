"""The excerpts a scorer reads: stored windows with the feature's values, sampled across the
activation bands, and how an excerpt is written into a prompt (one line, marks as <<token>>)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.store.read_models import FeatureDetail, WindowInfo


@dataclass(frozen=True)
class Excerpt:
    """A slice of a stored sequence and the feature's value on each of its tokens (all zero for
    an excerpt drawn where the feature does not fire)."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    values: np.ndarray  # float32 [len(tokens)]
    source: str  # "top", "interval" or "zero"
    band: int  # the interval band (-1 for top windows and zero excerpts)
    seq_index: int
    start: int

    @property
    def max_value(self) -> float:
        return float(self.values.max()) if len(self.values) else 0.0

    @property
    def span(self) -> tuple[int, int, int]:
        """(sequence, first position, end position) in the run's sequences."""
        return self.seq_index, self.start, self.start + len(self.token_ids)


def excerpt_of(window: WindowInfo) -> Excerpt:
    n = len(window.token_ids)
    values = np.asarray(window.values[:n], dtype=np.float32)
    return Excerpt(tuple(window.token_ids), tuple(window.tokens), values, window.kind,
                   window.band, window.seq_index, window.start)


def band_groups(feature: FeatureDetail) -> list[list[Excerpt]]:
    """The feature's activating windows in groups, strongest first: the top windows, then each
    interval band from the highest down (empty groups left out)."""
    top = [excerpt_of(w) for w in feature.windows if w.kind == "top"]
    bands: dict[int, list[Excerpt]] = {}
    for w in feature.windows:
        if w.kind == "interval":
            bands.setdefault(w.band, []).append(excerpt_of(w))
    groups = [top] + [bands[b] for b in sorted(bands, reverse=True)]
    return [[e for e in g if e.max_value > 0] for g in groups if any(e.max_value > 0 for e in g)]


def sample_activating(feature: FeatureDetail, *, n: int, rng: np.random.Generator
                      ) -> list[Excerpt]:
    """Up to `n` distinct activating windows, taken in turn from each band group (a random one
    of each group per turn), so weak activations are scored as well as the strongest."""
    pools = [list(g) for g in band_groups(feature)]
    picked: list[Excerpt] = []
    seen: set[tuple[int, int, int]] = set()
    while len(picked) < n and any(pools):
        for pool in pools:
            while pool and len(picked) < n:
                excerpt = pool.pop(int(rng.integers(len(pool))))
                if excerpt.span not in seen:  # a top window may also be an interval sample
                    seen.add(excerpt.span)
                    picked.append(excerpt)
                    break
    return picked


def strongest_positions(values: np.ndarray, fraction: float) -> list[int]:
    """Positions whose value is at least `fraction` of the excerpt's max (none if it is 0)."""
    peak = float(values.max()) if len(values) else 0.0
    if peak <= 0:
        return []
    return [int(i) for i in np.flatnonzero(values >= fraction * peak)]


def _visible(token: str) -> str:
    # One excerpt per prompt line: newlines and tabs are written as escapes.
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def render(excerpt: Excerpt, marks: list[int] | None = None) -> str:
    """The excerpt's text on one line; tokens at `marks` are wrapped as <<token>>."""
    marked = set(marks or ())
    return "".join(f"<<{_visible(t)}>>" if i in marked else _visible(t)
                   for i, t in enumerate(excerpt.tokens))
