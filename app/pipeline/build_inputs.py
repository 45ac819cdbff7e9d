"""What a build reads: the SAE and its model, the tokenized corpus, the activations per batch.

The corpus comes with a held-out slice for the evaluation; the hook activations come from a
matching activation cache, else from the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from app.errors import ConfigError
from app.pipeline.build_options import BuildOptions, Log
from app.pipeline.corpus import TokenizedCorpus

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel
    from app.engine.sae import SAE
    from app.pipeline.activations import ActivationCache


def load_inputs(opts: BuildOptions, log: Log) -> tuple[LanguageModel, SAE, str, str, int]:
    """(lm, sae, hook name, sae id, context size) from the SAE folder and the options."""
    from app.engine.devices import resolve_device, resolve_dtype
    from app.engine.loading import load_model
    from app.engine.sae import SAE

    sae_path = Path(opts.sae_path).expanduser()
    if not sae_path.exists():
        raise ConfigError(f"SAE folder {sae_path} does not exist; train one with "
                          "`saescope train-sae` or pass --sae PATH to an SAE folder")
    device, dtype = resolve_device(opts.device), resolve_dtype(opts.dtype)
    log(f"loading SAE from {sae_path}")
    sae = SAE.load(sae_path, device=device).eval()
    model_spec = opts.model or sae.cfg.model_name
    if not model_spec:
        raise ConfigError(f"SAE {sae_path} does not name its model; pass --model")
    where = "" if device.type == "cpu" and dtype == torch.float32 else \
        f" on {device} in {str(dtype).removeprefix('torch.')}"
    log(f"loading model {model_spec}{where}")
    lm = load_model(model_spec, device=device, dtype=dtype, cache_dir=Path(opts.cache_dir))
    hook = opts.hook_name or sae.cfg.hook_name
    if not hook:
        raise ConfigError(f"SAE {sae_path} does not name its hook; pass --hook "
                          f"(one of e.g. {', '.join(lm.hook_names()[:3])}, ...)")
    hook = lm.hook_point(hook).name
    sae.check_compatible(d_model=lm.d_model)
    sae_id = opts.sae_id or sae_path.resolve().name
    ctx = int(opts.context_size or sae.cfg.context_size or 128)
    return lm, sae, hook, sae_id, ctx


def trained_on(sae: SAE, opts: BuildOptions) -> int:
    """How many leading text tokens of the build's corpus the SAE was trained on (its cfg's
    dataset_path and training_tokens; 0 when it names another corpus or nothing)."""
    meta = sae.cfg.metadata or {}
    dataset, trained = meta.get("dataset_path"), meta.get("training_tokens")
    if not dataset or not isinstance(trained, int):
        return 0
    same = str(dataset) == str(opts.corpus)
    if not same and Path(str(dataset)).exists() and Path(str(opts.corpus)).exists():
        same = Path(str(dataset)).resolve() == Path(str(opts.corpus)).resolve()
    return trained if same else 0


# Held-out text further than this past the build's own tokens is not tokenized for the evaluation
# (an SAE trained on a corpus far larger than the build reads).
MAX_EVAL_SKIP = 10_000_000


@dataclass
class Tokenized:
    """The build's sequences and the held-out ones for its evaluation (none: no evaluation)."""

    corpus: TokenizedCorpus
    eval_tokens: np.ndarray
    eval_special: np.ndarray
    eval_after: int  # text tokens of the corpus before the held-out ones
    no_eval_reason: str = ""


def tokenize(lm: LanguageModel, opts: BuildOptions, ctx: int, *, trained_tokens: int = 0,
             log: Log = lambda _m: None) -> Tokenized:
    """The build's sequences (the most whole packed sequences holding at most ``--tokens`` text
    tokens) and up to ``--eval-tokens`` held-out text tokens for the evaluation, taken after
    the build's tokens and after the ``trained_tokens`` the SAE was trained on when it was
    trained on this corpus (train-sae's held-out slice then, so its evals.json is reused). The
    SAE is never scored on text it was built or trained over: with no such text left there is
    no evaluation, and ``no_eval_reason`` says why. The tokenized corpus is cached by
    fingerprint (app/pipeline/token_cache.py): a rebuild skips parsing and tokenizing."""
    from app.pipeline.corpus import CorpusTooSmall
    from app.pipeline.token_cache import cached_tokenize

    eval_budget = max(opts.eval_tokens, 0)
    skip = max(trained_tokens - opts.n_tokens, 0) if eval_budget else 0
    far = ""
    if skip > MAX_EVAL_SKIP:
        skip, eval_budget = 0, 0
        far = (f"the SAE was trained on the first {trained_tokens:,} tokens of this corpus, "
               "far past the build's")
    try:
        full = cached_tokenize(lm=lm, corpus=str(opts.corpus), text_field=opts.text_field,
                               context_size=ctx, max_tokens=opts.n_tokens + skip + eval_budget,
                               cache_dir=Path(opts.cache_dir), log=log)
    except CorpusTooSmall as exc:  # not even one whole sequence
        raise ConfigError(str(exc)) from None
    real = np.cumsum((~full.special_mask).sum(axis=1))
    n_seq = int(np.searchsorted(real, opts.n_tokens, side="right"))
    if n_seq == 0:
        raise ConfigError(f"--tokens {opts.n_tokens:,} is less than one sequence ({ctx} "
                          f"positions, {int(real[0]):,} of them text here); raise --tokens")
    if n_seq == full.n_seq and real[-1] + (ctx - 1) <= opts.n_tokens:  # the corpus ended
        have = int(real[-1])
        raise CorpusTooSmall(
            f"corpus {str(opts.corpus)!r} has only {have:,} text tokens in whole sequences of "
            f"{ctx}; lower --tokens to at most {have:,} (at most {have - opts.eval_tokens:,} "
            f"to keep {opts.eval_tokens:,} held out for the evaluation) or use a larger corpus",
            available=have)
    corpus = full.select(slice(0, n_seq))
    # Held out: after the build's sequences and after the whole sequences the SAE trained on.
    start = max(n_seq, int(np.searchsorted(real, opts.n_tokens + skip, side="right")))
    (rest,) = full.select(slice(start, full.n_seq)).split(eval_budget)
    why = ""
    if not opts.eval_tokens:
        why = "--eval-tokens 0"
    elif not eval_budget:
        why = far
    elif not rest.n_seq:
        read = ("the SAE was trained on" if trained_tokens > opts.n_tokens else
                "the build reads")
        why = f"the corpus has no text after the {max(trained_tokens, opts.n_tokens):,} {read}"
    return Tokenized(corpus=corpus, eval_tokens=rest.tokens, eval_special=rest.special_mask,
                     eval_after=int(real[start - 1]),
                     no_eval_reason=why)


class ActivationSource:
    """Hook activations per batch, from a matching cache or the model (rounded through float16
    like the cache, so both sources feed the SAE the same numbers), as float32 on ``device``
    (the SAE's) whatever the dtype of the model's forward."""

    def __init__(self, *, lm: LanguageModel, hook_name: str,
                 cache: ActivationCache | None, device: torch.device | str = "cpu") -> None:
        self.lm, self.hook_name, self.cache = lm, hook_name, cache
        self.device = torch.device(device)

    @property
    def source(self) -> str:
        return f"cache:{self.cache.key}" if self.cache is not None else "model"

    def batch(self, tokens: np.ndarray, start: int, stop: int) -> torch.Tensor:
        if self.cache is not None:
            acts = np.array(self.cache.acts[start:stop], dtype=np.float32)
            return torch.from_numpy(acts).to(self.device)
        ids = torch.from_numpy(np.ascontiguousarray(tokens[start:stop])).long()
        out = self.lm.run_to_hook(ids, self.hook_name)
        return out.to(torch.float16).to(device=self.device, dtype=torch.float32)


def find_cache(*, lm: LanguageModel, hook_name: str, opts: BuildOptions, n_tokens: int,
               ctx: int, tokens: np.ndarray) -> ActivationCache | None:
    """A complete activation cache for exactly this (model, hook, corpus, budget, ctx)."""
    if not opts.use_activation_cache:
        return None
    from app.pipeline.activations import cache_key, cache_key_parts, open_cache

    # The cache is keyed by the budget as asked (e.g. 200000) and holds budget // ctx sequences.
    for budget in dict.fromkeys((opts.n_tokens, n_tokens)):
        parts = cache_key_parts(lm=lm, hook_name=hook_name, corpus=opts.corpus,
                                text_field=opts.text_field, max_tokens=budget, context_size=ctx)
        folder = Path(opts.cache_dir) / "activations" / cache_key(parts)
        if not (folder / "complete.json").exists():
            continue
        cache = open_cache(folder)
        if cache.tokens.shape == tokens.shape and np.array_equal(cache.tokens, tokens):
            return cache
    return None
