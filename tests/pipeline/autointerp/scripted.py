"""Scripted chat backends for the scorer tests, and a planted-token database to score on.

The backends read only the prompt, as a real scorer would: the oracle answers from the true
activations (the planted rule applied to each excerpt's text), the random one flips a seeded coin
per excerpt, the keyword one trusts the explanation's quoted tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from app.pipeline.autointerp.backends import ChatMessage, ChatOptions
from app.pipeline.autointerp.negatives import SequencePool
from tests.factories import PlantedFeature, planted_run, planted_values, synthetic_database

WORDS = [" the", " value", " result", " Return", " of", " is", " error", " count", " file"]
VOCAB = ["<pad>", "<bos>", *WORDS, *[f" w{i}" for i in range(60)]]
ID = {w: i for i, w in enumerate(VOCAB)}
SAE_ID = "1-res-topk-16"
# Feature 3 fires on ' value' (strong) and ' result' (weaker), always after ' Return the';
# feature 5 on ' error' (strong) and ' count' (weak); feature 7 on ' file' only.
PLANTS = [
    PlantedFeature(3, {ID[" value"]: 4.0, ID[" result"]: 1.5}, before=(ID[" Return"], ID[" the"])),
    PlantedFeature(5, {ID[" error"]: 3.0, ID[" count"]: 0.75}),
    PlantedFeature(7, {ID[" file"]: 2.0}),
]
WEIGHTS = {VOCAB[t]: w for plant in PLANTS for t, w in plant.weights.items()}
BY_FEATURE = {plant.index: {VOCAB[t]: w for t, w in plant.weights.items()} for plant in PLANTS}
_LINE = re.compile(r"^(\d+)\. (.*)$", re.MULTILINE)
_MARK = re.compile(r"<<(.*?)>>")


def planted_database(db_url: str, **kwargs) -> tuple[object, SequencePool]:
    """The planted run written to `db_url`, and the pool of its sequences encoded by the rule."""
    run = planted_run(plants=PLANTS, vocab=VOCAB, sae_id=SAE_ID, d_sae=16, **kwargs)
    synthetic_database(db_url, run)
    return run, rule_pool(run)


def rule_pool(run) -> SequencePool:
    tokens = run.sequences.tokens
    values = planted_values(PLANTS, tokens)
    seq, pos, feat = [], [], []
    for f, acts in values.items():
        rows, cols = np.nonzero(acts)
        seq.append(run.sequences.seq_index[rows])
        pos.append(cols)
        feat.append(np.full(len(rows), f))
    return SequencePool(dict(zip(run.sequences.seq_index.tolist(), tokens, strict=True)),
                        seq=np.concatenate(seq), pos=np.concatenate(pos),
                        feature=np.concatenate(feat))


def excerpts(messages: Sequence[ChatMessage]) -> tuple[bool, list[tuple[int, str]]]:
    """(is it a fuzzing prompt, the numbered excerpt lines)."""
    fuzzing = "marked" in messages[0]["content"]
    user = messages[-1]["content"]
    body = user.split("Excerpts:\n", 1)[1]
    return fuzzing, [(int(n), text) for n, text in _LINE.findall(body)]


class OracleScorer:
    """Answers from the true activations of `feature`: its planted tokens' weights."""

    def __init__(self, feature: int, fraction: float = 0.5) -> None:
        self.weights = BY_FEATURE[feature]
        self.fraction = fraction
        self.name = "oracle"
        self.calls = 0

    def _values(self, text: str) -> list[float]:
        return [w for token, w in self.weights.items() for _ in range(text.count(token))]

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str:
        self.calls += 1
        fuzzing, lines = excerpts(messages)
        yes = []
        for number, text in lines:
            plain = _MARK.sub(lambda m: m.group(1), text)
            values = self._values(plain)
            if not fuzzing:
                if values:
                    yes.append(number)
                continue
            peak = max(values)
            right = sorted(t for t, w in self.weights.items()
                           for _ in range(plain.count(t)) if w >= self.fraction * peak)
            if sorted(_MARK.findall(text)) == right:
                yes.append(number)
        return f"Here you are: {yes}"


class RandomScorer:
    """Names each excerpt with probability 1/2 (seeded); sometimes replies with junk."""

    def __init__(self, seed: int, junk_every: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.junk_every = junk_every
        self.name = "random"
        self.calls = 0

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str:
        self.calls += 1
        if self.junk_every and self.calls % self.junk_every == 0:
            return "I think the feature is about values."
        _, lines = excerpts(messages)
        return str([n for n, _ in lines if self.rng.random() < 0.5])


class KeywordScorer:
    """Trusts the explanation: an excerpt activates when it holds a token the explanation quotes
    before ' after' / ';' (the tokens a pattern explanation says the feature fires on)."""

    name = "keyword"

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str:
        user = messages[-1]["content"]
        explanation = user.split("Explanation: ", 1)[1].split("\n", 1)[0]
        head = re.split(r" after |;|, followed", explanation)[0]
        tokens = re.findall(r"'([^']*)'", head)
        _, lines = excerpts(messages)
        return str([n for n, text in lines if any(t and t in text for t in tokens)])
