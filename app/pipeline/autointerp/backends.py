"""The chat contract shared by LLM explainers and scorers: a backend turns chat messages into text.

Backends: `local` (a model loaded by the engine, generating on this machine) and `openai` (any
OpenAI-compatible `/v1/chat/completions` endpoint: llama.cpp's server, vLLM, Ollama, or another
saescope). A scripted backend in the tests answers from known activations.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict

from app.errors import ConfigError


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class ChatOptions:
    """Sampling for one completion; temperature 0 is greedy; a seed makes sampling repeatable;
    the reply ends before the first of the ``stop`` strings (which it does not include), as
    OpenAI's ``stop`` does. ``reply_start``: text the reply should begin with; a backend that
    can write it into the prompt (the local one) has the model continue it and returns the
    reply with it; an endpoint has no standard way to, so its reply comes as the model wrote
    it: readers of replies accept both."""

    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    reply_start: str = ""


class ChatBackend(Protocol):
    """Anything that answers chat messages with text. `name` is what draft labels record as their
    author (`autointerp:<explainer>`) and scores record as their scorer."""

    name: str

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str: ...


# Backend kind -> (module, class); imported only when asked for, so the pattern explainer and
# the scorers' tests need neither a model nor an HTTP client.
BACKENDS = {
    "local": ("app.pipeline.autointerp.local_backend", "LocalBackend"),
    "openai": ("app.pipeline.autointerp.openai_backend", "OpenAIBackend"),
}


def make_backend(kind: str, **opts: Any) -> ChatBackend:
    """The backend of `kind` built with `opts` (options left as None are not passed, so the
    backend's own defaults apply); ConfigError for an unknown kind or one this build lacks."""
    if kind not in BACKENDS:
        raise ConfigError(f"unknown chat backend {kind!r}; use one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConfigError(f"the {kind!r} chat backend is not in this build of saescope "
                          f"({module_name} is missing)") from None
    backend_class = getattr(module, class_name, None)
    if backend_class is None:
        raise ConfigError(f"the {kind!r} chat backend is not in this build of saescope "
                          f"({module_name} has no {class_name})")
    return backend_class(**{k: v for k, v in opts.items() if v is not None})
