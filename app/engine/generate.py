"""Cached decoding: a batch of streams continued one KV-cached forward per call, with seeded
sampling and position-aware hooks, so a worker can interleave, stream and stop generations.

``KVDecoder`` is the model side: ``prefill(ids)`` runs the prompts once, then each ``feed(tokens)``
runs one new token per stream on top of the cache; both return the logits of the last position.
``Generation`` adds the choice of tokens: ``prefill(ids)`` returns every stream's first new token,
each ``step()`` feeds the previous ones and returns the next, until ``done``. The streams of a
batch share one prompt length (e.g. the same prompt twice, default beside steered) and each
draws from its own ``torch.Generator`` seeded alike, so identical streams stay identical.

Hooks given to a decoder are attached (positional, see ``hooks.PositionContext``) around its own
forwards only, so generations interleaved on one model thread never see each other's edits.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from app.engine.hooks import PositionalHookFn, PositionContext
from app.errors import ConfigError

if TYPE_CHECKING:
    from transformers import Cache

    from app.engine.lm import LanguageModel, TokenIds


class KVDecoder:
    """One cached pass over a batch of streams: ``prefill`` once, then ``feed`` a token each."""

    def __init__(
        self, lm: LanguageModel, *, hooks: Mapping[str, PositionalHookFn] | None = None
    ) -> None:
        self.lm = lm
        self.hooks = dict(hooks or {})
        self._cache: Cache | None = None
        self.batch = 0
        self.prompt_len = 0
        self.length = 0  # positions in the cache, per stream
        self.step = 0  # forwards after the prefill

    def prefill(self, ids: TokenIds, *, reserve: int = 0) -> Tensor:
        """Run the prompts ([batch, pos], or [pos] for one stream); logits [batch, vocab] after
        the last prompt token. ``reserve`` tokens to be fed later must fit in the model's
        positions too (checked now, before any forward)."""
        if self._cache is not None:
            raise RuntimeError("this decoder is already prefilled; make a new one per generation")
        input_ids = _prompt_ids(ids)
        self.batch, self.prompt_len = input_ids.shape
        if self.prompt_len < 1:
            raise ConfigError("the prompt is empty; give at least one token")
        self._check_room(self.prompt_len + reserve)
        self._cache = self.lm.new_cache()
        positions = PositionContext.prompt(self.prompt_len, device=self.lm.device)
        logits = self._forward(input_ids, positions)
        self.length = self.prompt_len
        return logits

    def feed(self, tokens: Sequence[int] | Tensor) -> Tensor:
        """Run one new token per stream; logits [batch, vocab] after it."""
        if self._cache is None:
            raise RuntimeError("prefill() the prompt before feeding tokens")
        step_ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1, 1)
        if step_ids.shape[0] != self.batch:
            raise ValueError(f"{step_ids.shape[0]} tokens for {self.batch} streams")
        self._check_room(self.length + 1)
        positions = PositionContext(positions=torch.tensor([self.length], device=self.lm.device),
                                    prompt_len=self.prompt_len, step=self.step + 1)
        logits = self._forward(step_ids, positions)
        self.length += 1
        self.step += 1
        return logits

    def _forward(self, ids: Tensor, positions: PositionContext) -> Tensor:
        with self.lm.hooks(self.hooks, positional=True):
            return self.lm.cached_logits(ids, cache=self._cache, positions=positions)

    def _check_room(self, length: int) -> None:
        if self.lm.n_ctx and length > self.lm.n_ctx:
            raise ConfigError(f"{length} tokens exceed the {self.lm.n_ctx} positions "
                              f"{self.lm.model_id} was trained for")


class Generation:
    """A sampled (temperature > 0, optionally top-p) or greedy (temperature 0) continuation of a
    batch of streams, one forward per call; a stream stops at a stop token (the model's EOS ids
    unless ``stop_ids`` says otherwise) or after ``max_new_tokens``."""

    def __init__(
        self,
        lm: LanguageModel,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Collection[int] | None = None,
        hooks: Mapping[str, PositionalHookFn] | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if not temperature >= 0:
            raise ConfigError(f"temperature must be 0 (greedy) or more, not {temperature}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], not {top_p}")
        self.decoder = KVDecoder(lm, hooks=hooks)
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.stop_ids = frozenset(lm.eos_token_ids if stop_ids is None else stop_ids)
        self.tokens: list[list[int]] = []  # per stream, the new tokens so far (stop token kept)
        self.finished: list[bool] = []
        self.logits: Tensor | None = None  # [batch, vocab] the latest tokens were chosen from
        self._generators: list[torch.Generator] = []

    @property
    def done(self) -> bool:
        return bool(self.finished) and all(self.finished)

    def prefill(self, ids: TokenIds) -> list[int | None]:
        """Run the prompts and choose each stream's first new token."""
        # The last new token is chosen but never fed.
        logits = self.decoder.prefill(ids, reserve=self.max_new_tokens - 1)
        batch = logits.shape[0]
        self._generators = [torch.Generator().manual_seed(self.seed) for _ in range(batch)]
        self.tokens = [[] for _ in range(batch)]
        self.finished = [False] * batch
        return self._choose(logits)

    def step(self) -> list[int | None]:
        """Feed the latest tokens and choose the next: one token per stream, None for a stream
        that had already stopped."""
        if not self.tokens:
            raise RuntimeError("prefill() the prompt before stepping")
        if self.done:
            raise RuntimeError("this generation is done")
        # A stopped stream is fed its last token again; its row runs but nothing reads it.
        return self._choose(self.decoder.feed([stream[-1] for stream in self.tokens]))

    def run(self, ids: TokenIds) -> list[list[int]]:
        """The whole generation at once: the new tokens of every stream."""
        self.prefill(ids)
        while not self.done:
            self.step()
        return self.tokens

    def _choose(self, logits: Tensor) -> list[int | None]:
        self.logits = logits
        rows = logits.detach().float().cpu()
        chosen: list[int | None] = []
        for i, row in enumerate(rows):
            if self.finished[i]:
                chosen.append(None)
                continue
            token = self._sample(row, self._generators[i])
            self.tokens[i].append(token)
            if token in self.stop_ids or len(self.tokens[i]) >= self.max_new_tokens:
                self.finished[i] = True
            chosen.append(token)
        return chosen

    def _sample(self, logits: Tensor, generator: torch.Generator) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        # Shifted by the max first and in float64 (the temperature too): the same distribution,
        # and a tiny temperature gives a one-hot one instead of NaN.
        logits = logits.double()
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1:
            probs = top_p_filter(probs, self.top_p)
        return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalText:
    """The text of a growing token list, handed out piece by piece: ``push(token)`` returns the
    text that token completes ("" while a character spread over several tokens is unfinished),
    ``flush()`` whatever is left at the end.

    Each piece is decoded from a short window of recent tokens (the one before the last piece
    and onwards), not from a single token, so tokenizers that join or strip spaces between
    tokens give the same text as decoding the whole list at once.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""  # handed out so far
        self._prefix = 0  # window start: tokens before it are settled
        self._read = 0  # tokens whose text is already handed out

    def push(self, token: int) -> str:
        self.tokens.append(token)
        settled = self._decode(self.tokens[self._prefix:self._read])
        window = self._decode(self.tokens[self._prefix:])
        # U+FFFD at the end: the last token holds only part of a character's bytes.
        if len(window) <= len(settled) or window.endswith("\ufffd"):
            return ""
        piece = window[len(settled):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece

    def flush(self) -> str:
        """The rest of the text (an unfinished character shows as U+FFFD)."""
        if self._read == len(self.tokens):
            return ""
        settled = self._decode(self.tokens[self._prefix:self._read])
        piece = self._decode(self.tokens[self._prefix:])[len(settled):]
        self._prefix = self._read = len(self.tokens)
        self.text += piece
        return piece


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Keep the most likely tokens whose mass reaches top_p (at least one), renormalised."""
    sorted_probs, order = probs.sort(descending=True)
    # A token is kept while the mass of the more likely ones is still below top_p.
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep[..., 0] = True
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return kept / kept.sum(-1, keepdim=True)


def _prompt_ids(ids: TokenIds) -> Tensor:
    if not isinstance(ids, Tensor):
        nested = len(ids) > 0 and isinstance(ids[0], Sequence | Tensor)
        rows = [list(row) for row in ids] if nested else [list(ids)]
        if len({len(row) for row in rows}) > 1:
            raise ConfigError("the streams of one generation share one prompt length; "
                              f"got prompts of {sorted({len(row) for row in rows})} tokens")
        ids = torch.tensor(rows, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2:
        raise ConfigError(f"token ids must be [batch, pos] or [pos], not {tuple(ids.shape)}")
    return ids.long()
