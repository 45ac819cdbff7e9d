"""Scoring an explanation by how well a scorer, reading only the explanation, predicts where the
feature is active (Bills et al. 2023; delphi's detection and fuzzing).

- Detection: activating windows sampled across the interval bands, mixed with as many windows
  where the feature is zero (verified by encoding, see negatives.py); the scorer says which
  activate. Score: balanced accuracy, the mean of the hit rates on the two kinds.
- Fuzzing: activating windows whose marks are either right (the tokens at least `fuzz_fraction`
  of the window's max) or wrong (as many other tokens, never the right set); the scorer says
  which are right. Score: balanced accuracy over right and wrong.

Both draw their windows with a generator seeded by (seed, feature, method), so a score is
repeatable, and both score a control explanation (a random other feature's) on the very same
windows: the control says what chance looks like for this scorer. A reply that cannot be read
counts every window of its batch as wrong, and is reported in the details.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.pipeline.autointerp.backends import ChatBackend, ChatOptions
from app.pipeline.autointerp.negatives import SequencePool
from app.pipeline.autointerp.scorer_prompts import (
    LIST_END,
    LIST_START,
    detection_messages,
    fuzzing_messages,
    parse_numbers,
)
from app.pipeline.autointerp.windows import (
    Excerpt,
    render,
    sample_activating,
    strongest_positions,
)
from app.store.labels.scores import ScoreRecord
from app.store.read_models import FeatureDetail
from app.store.tables import SCORE_METHODS

DETECTION, FUZZING = SCORE_METHODS
_METHOD_CODE = {DETECTION: 0, FUZZING: 1}
MAX_BAD_ANSWERS = 3  # unreadable replies kept in a score's details, each cut to 300 characters


@dataclass(frozen=True)
class ScoringOptions:
    n_activating: int = 20  # detection: activating windows (fewer if the feature has fewer)
    n_zero: int = 20  # detection: windows where the feature is zero
    n_fuzz: int = 20  # fuzzing: windows, half marked right
    batch_size: int = 10  # windows per prompt
    fuzz_fraction: float = 0.5  # right marks: tokens at least this fraction of the window's max
    answer_tokens: int = 64  # the scorer's reply budget


@dataclass(frozen=True)
class Item:
    """One window as the scorer sees it, and the right answer for it."""

    excerpt: Excerpt
    truth: bool  # detection: it activates; fuzzing: its marks are right
    marks: tuple[int, ...] | None = None  # fuzzing: the marked positions

    def text(self) -> str:
        return render(self.excerpt, list(self.marks) if self.marks is not None else None)


@dataclass
class Tally:
    """A scorer's answers about a list of items for one explanation."""

    tp: int = 0
    fn: int = 0
    tn: int = 0
    fp: int = 0
    batches: int = 0
    unparsed: int = 0  # batches whose reply held no readable list (all their windows wrong)
    out_of_range: int = 0  # numbers named outside the batch (ignored)
    bad_answers: list[str] = field(default_factory=list)

    @property
    def balanced_accuracy(self) -> float | None:
        if not (self.tp + self.fn) or not (self.tn + self.fp):
            return None
        return 0.5 * (self.tp / (self.tp + self.fn) + self.tn / (self.tn + self.fp))

    def summary(self) -> dict[str, Any]:
        return {"tp": self.tp, "fn": self.fn, "tn": self.tn, "fp": self.fp,
                "batches": self.batches, "unparsed_batches": self.unparsed,
                "out_of_range": self.out_of_range, "bad_answers": self.bad_answers}


def ask(explanation: str, items: list[Item], *, method: str, scorer: ChatBackend,
        options: ScoringOptions, seed: int) -> Tally:
    """One prompt per batch of items (in the items' order); the tally of right and wrong."""
    tally = Tally()
    chat = ChatOptions(max_tokens=options.answer_tokens, temperature=0.0, seed=seed,
                       stop=(LIST_END,), reply_start=LIST_START)
    for start in range(0, len(items), options.batch_size):
        batch = items[start:start + options.batch_size]
        texts = [item.text() for item in batch]
        messages = (detection_messages(explanation, texts) if method == DETECTION
                    else fuzzing_messages(explanation, texts, options.fuzz_fraction))
        answer = scorer.complete(messages, chat)
        parsed = parse_numbers(answer, len(batch))
        tally.batches += 1
        if parsed is None:
            tally.unparsed += 1
            if len(tally.bad_answers) < MAX_BAD_ANSWERS:
                tally.bad_answers.append(str(answer)[:300])
        else:
            tally.out_of_range += parsed[1]
        for k, item in enumerate(batch, start=1):
            said = (not item.truth) if parsed is None else (k in parsed[0])
            if item.truth:
                tally.tp += said
                tally.fn += not said
            else:
                tally.fp += said
                tally.tn += not said
    return tally


def _rng(seed: int, feature: int, method: str) -> np.random.Generator:
    return np.random.default_rng([seed, feature, _METHOD_CODE[method]])


def detection_items(feature: FeatureDetail, *, negatives: SequencePool,
                    rng: np.random.Generator, options: ScoringOptions
                    ) -> tuple[list[Item], str | None]:
    """Activating windows across the bands and windows at zero of the same lengths, shuffled;
    (items, why there are none)."""
    active = sample_activating(feature, n=options.n_activating, rng=rng)
    if not active:
        return [], "the feature has no activating window stored"
    recorded = [(w.seq_index, w.start, w.start + len(w.token_ids)) for w in feature.windows]
    lengths = [len(active[int(rng.integers(len(active)))].token_ids)
               for _ in range(options.n_zero)]
    zero = negatives.zero_excerpts(feature=feature.index, lengths=lengths, exclude=recorded,
                                   rng=rng, vocab=feature.vocab)
    if not zero:
        return [], (f"no window where the feature is zero in the {len(negatives.tokens)} "
                    "encoded sequences (it fires almost everywhere)")
    items = [Item(e, True) for e in active] + [Item(e, False) for e in zero]
    return [items[i] for i in rng.permutation(len(items))], None


def fuzzing_items(feature: FeatureDetail, *, rng: np.random.Generator, options: ScoringOptions
                  ) -> tuple[list[Item], str | None]:
    """Activating windows, half with right marks and half with wrong ones, shuffled."""
    usable: list[tuple[Excerpt, list[int], list[int]]] = []
    for excerpt in sample_activating(feature, n=options.n_fuzz, rng=rng):
        right = strongest_positions(excerpt.values, options.fuzz_fraction)
        right_set = set(right)
        others = [i for i in range(len(excerpt.values)) if i not in right_set]
        if right and others:  # a window whose every token is "right" has no wrong marking
            usable.append((excerpt, right, others))
    if len(usable) < 2:
        return [], "fewer than 2 activating windows with tokens below the marking line"
    truths = np.zeros(len(usable), bool)
    truths[: len(usable) // 2] = True
    rng.shuffle(truths)
    items = []
    for (excerpt, right, others), truth in zip(usable, truths, strict=True):
        if truth:
            marks = right
        else:  # as many marks as right ones; at least one off the right set
            k = len(right)
            off = [int(i) for i in rng.choice(others, size=min(k, len(others)), replace=False)]
            fill = [int(i) for i in rng.choice(right, size=k - len(off), replace=False)]
            marks = sorted(off + fill)
        items.append(Item(excerpt, bool(truth), tuple(sorted(marks))))
    return items, None


def score_explanation(
    feature: FeatureDetail, explanation: str, *, method: str, scorer: ChatBackend, seed: int,
    control: tuple[str, str] | None = None, negatives: SequencePool | None = None,
    options: ScoringOptions | None = None,
) -> ScoreRecord:
    """One method's score of `explanation` for `feature`, with the control (explanation, where it
    came from) scored on the same windows."""
    options = options or ScoringOptions()
    rng = _rng(seed, feature.index, method)
    if method == DETECTION:
        if negatives is None:
            raise ValueError("detection needs a SequencePool of windows at zero")
        items, why = detection_items(feature, negatives=negatives, rng=rng, options=options)
    elif method == FUZZING:
        items, why = fuzzing_items(feature, rng=rng, options=options)
    else:
        raise ValueError(f"unknown score method {method!r}")
    details: dict[str, Any] = {"batch_size": options.batch_size,
                               "n_true": sum(i.truth for i in items),
                               "n_false": sum(not i.truth for i in items)}
    if method == FUZZING:
        details["fraction"] = options.fuzz_fraction
    if why is not None:
        return ScoreRecord(method=method, scorer=scorer.name, score=None, control_score=None,
                           n_windows=0, seed=seed, run_id=feature.run_id,
                           details={**details, "skipped": why})
    tally = ask(explanation, items, method=method, scorer=scorer, options=options, seed=seed)
    details.update(tally.summary())
    control_score = None
    if control is not None:
        control_tally = ask(control[0], items, method=method, scorer=scorer, options=options,
                            seed=seed)
        control_score = control_tally.balanced_accuracy
        details["control"] = {"explanation": control[0], "source": control[1],
                              **control_tally.summary()}
    return ScoreRecord(method=method, scorer=scorer.name, score=tally.balanced_accuracy,
                       control_score=control_score, n_windows=len(items), seed=seed,
                       run_id=feature.run_id, details=details)
