"""The `local` chat backend: a model loaded by the engine on this machine (a preset, a Hugging
Face folder or a .gguf file; default the demo model) answering with its chat template, greedy
at temperature 0 or sampled with the options' seed."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.engine import chat
from app.engine.devices import resolve_device, resolve_dtype
from app.engine.loading import load_model
from app.errors import ConfigError
from app.pipeline.autointerp.backends import ChatMessage, ChatOptions
from app.pipeline.autointerp.usage import TokenUsage
from app.settings import get_settings

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel


class LocalBackend:
    """A ChatBackend over an engine-loaded model. ``model``: a preset name, a Hugging Face
    folder or a .gguf file (default: the default preset); ``device`` (auto, cpu, cuda[:N]) and
    ``dtype`` (float32, bfloat16, float16) as `--device`/`--dtype` elsewhere; ``cache_dir``:
    where dequantized GGUF copies live (default: the settings'). One model, one generation at
    a time: calls from several threads take turns."""

    def __init__(self, model: str | None = None, device: str = "cpu", *, dtype: str = "float32",
                 cache_dir: Path | None = None, max_total_tokens: int | None = None,
                 max_prompt_tokens: int | None = None, url: str | None = None,
                 api_key_env: str | None = None, lm: LanguageModel | None = None) -> None:
        # `url` and `api_key_env` are the openai backend's: the explain command hands one set of
        # options to either kind; a URL here is a mistake worth saying, a key variable is not.
        del api_key_env
        if url:
            raise ConfigError(f"the local explainer runs a model here and takes no URL "
                              f"({url}); use --explainer openai for an endpoint")
        if lm is None:
            lm = load_model(model, device=resolve_device(device), dtype=resolve_dtype(dtype),
                            cache_dir=cache_dir or get_settings().cache_dir)
        self.lm = lm
        self.name = f"local:{lm.model_id}"
        self.max_prompt_tokens = max_prompt_tokens
        self.usage = TokenUsage(max_total_tokens)
        self._lock = threading.Lock()

    @classmethod
    def from_model(cls, lm: LanguageModel, **kwargs: object) -> LocalBackend:
        """Over a model already loaded (tests, or a process that holds one)."""
        return cls(lm=lm, **kwargs)  # type: ignore[arg-type]

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str:
        self.usage.check()
        with self._lock, torch.inference_mode():
            out = chat.reply(self.lm, messages, max_new_tokens=options.max_tokens,
                             temperature=options.temperature, seed=options.seed,
                             stop=options.stop, reply_start=options.reply_start,
                             max_prompt_tokens=self.max_prompt_tokens)
        self.usage.add(prompt_tokens=out["prompt_tokens"],
                       completion_tokens=out["completion_tokens"])
        return options.reply_start + out["text"]

    def complete_many(self, conversations: Sequence[Sequence[ChatMessage]],
                      options: ChatOptions, *, workers: int = 1) -> list[str]:
        """Each conversation's reply, in order. One after another whatever ``workers`` says:
        the model already uses every core for one forward."""
        del workers
        return [self.complete(messages, options) for messages in conversations]
