"""Steered generations as step generators for the model worker: default beside steered (one
batch, streamed as text events), and a strength sweep (one batch of strengths, with each
strength's realised activation and coherence).

Each generator does one model forward per item it yields, so the worker can interleave it with
other jobs and stop it between steps; closing it early just drops its cache. Items are plain
Python: lists of events ``{"event": name, "data": {...}}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from app.engine.generate import Generation, IncrementalText
from app.engine.steering import FeatureEdit, FeatureProbe, Steering, chain_hooks

if TYPE_CHECKING:
    from app.engine.hooks import Scope
    from app.engine.lm import LanguageModel

STREAMS = ("default", "steered")
Event = dict[str, Any]


class _Streams:
    """Per stream of a batch: its incremental text, its stop reason; events for each step."""

    def __init__(self, lm: LanguageModel, gen: Generation, names: Sequence[str]) -> None:
        self.lm = lm
        self.gen = gen
        self.names = list(names)
        self.texts = [IncrementalText(lm.decode) for _ in names]
        self.stop_reasons: list[str | None] = [None] * len(names)

    def events(self, chosen: Sequence[int | None]) -> list[Event]:
        out = []
        for row, token in enumerate(chosen):
            if token is None:
                continue
            index = len(self.gen.tokens[row]) - 1
            if token in self.gen.stop_ids:
                self.stop_reasons[row] = "stop_token"
            else:
                piece = self.texts[row].push(token)
                if piece:
                    out.append({"event": "token",
                                "data": {"which": self.names[row], "index": index, "text": piece}})
            if self.gen.finished[row] and self.stop_reasons[row] is None:
                self.stop_reasons[row] = "max_new_tokens"
        return out

    def finish(self, *, timed_out: bool) -> list[Event]:
        """Flush every stream's text and describe it; streams still running end now."""
        out = []
        for row, name in enumerate(self.names):
            piece = self.texts[row].flush()
            if piece:
                out.append({"event": "token", "data": {
                    "which": name, "index": len(self.gen.tokens[row]) - 1, "text": piece}})
            if self.stop_reasons[row] is None:
                self.stop_reasons[row] = "time_limit" if timed_out else "max_new_tokens"
        return out

    def result(self, row: int) -> dict[str, Any]:
        ids = self.texts[row].tokens
        strings = self.lm.token_strings()
        return {"text": self.texts[row].text, "token_ids": list(ids),
                "tokens": [strings[i] if 0 <= i < len(strings) else f"<{i}>" for i in ids],
                "stop_reason": self.stop_reasons[row]}


def _run(gen: Generation, streams: _Streams, ids: list[int], *, batch: int,
         deadline: float | None) -> Iterator[tuple[list[Event], bool]]:
    """Prefill, then one step per item, until every stream stops or the deadline passes:
    (events, last); the last item also holds the flushed text."""
    events = streams.events(gen.prefill([ids] * batch))
    while not gen.done:
        if deadline is not None and time.monotonic() > deadline:
            yield events + streams.finish(timed_out=True), True
            return
        yield events, False
        events = streams.events(gen.step())
    yield events + streams.finish(timed_out=False), True


def side_by_side(lm: LanguageModel, *, ids: list[int], steering_edits: Sequence[Any],
                 scope: Scope, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 deadline: float | None = None) -> Iterator[list[Event]]:
    """Default (row 0) and steered (row 1) continuations of ``ids`` in one batch, each stream
    drawing from its own generator seeded alike: token events as text completes, then a
    ``done`` event with each stream's text, tokens and stop reason."""
    steering = Steering(steering_edits, scope=scope, rows=[1])
    gen = Generation(lm, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, hooks=steering.hooks())
    streams = _Streams(lm, gen, STREAMS)
    for events, last in _run(gen, streams, ids, batch=2, deadline=deadline):
        if not last:
            yield events
            continue
        done = {name: {**streams.result(row), "n_tokens": len(streams.texts[row].tokens)}
                for row, name in enumerate(STREAMS)}
        yield events + [{"event": "done", "data": done}]


def sweep(lm: LanguageModel, *, ids: list[int], edit: Callable[[float], FeatureEdit],
          values: Sequence[float], probe_hook: str, scope: Scope, max_new_tokens: int,
          temperature: float, top_p: float, seed: int,
          deadline: float | None = None) -> Iterator[dict[str, Any] | None]:
    """One prompt, one feature at several strengths, in one batch: row 0 unsteered, row k the
    k-th value. Yields None per step, then the result: per row its text, the feature's mean
    realised activation on the generated tokens (the SAE's encoding of the activation after the
    edit) and the mean log-probability the unsteered model gives those tokens."""
    edits = [edit(value) for value in values]
    probe = FeatureProbe(edits[0].sae, edits[0].index, hook_name=probe_hook)
    steerings = [Steering([e], scope=scope, rows=[k + 1]).hooks() for k, e in enumerate(edits)]
    gen = Generation(lm, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, hooks=chain_hooks(*steerings, {probe_hook: probe.hook}))
    streams = _Streams(lm, gen, ["default", *(f"value {v}" for v in values)])
    for _ in _run(gen, streams, ids, batch=len(values) + 1, deadline=deadline):
        yield None
    # Row k's generated positions that were fed: all its tokens but the last (never fed).
    realised = probe.mean([max(0, len(tokens) - 1) for tokens in gen.tokens])
    rows = []
    for row in range(len(values) + 1):
        rows.append({**streams.result(row),
                     "realised": realised[row] if row < len(realised) else None,
                     "coherence": _mean_logprob(lm, ids, gen.tokens[row])})
        yield None
    yield {"default": rows[0],
           "cells": [{"value": v, **cell} for v, cell in zip(values, rows[1:], strict=True)]}


@torch.no_grad()
def _mean_logprob(lm: LanguageModel, prompt: list[int], tokens: list[int]) -> float | None:
    """Mean log-probability of ``tokens`` after ``prompt`` under the unsteered model."""
    if not tokens:
        return None
    logits = lm.logits([prompt + tokens[:-1]])[0, len(prompt) - 1:].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(logprobs.gather(-1, torch.tensor(tokens)[:, None]).mean())
