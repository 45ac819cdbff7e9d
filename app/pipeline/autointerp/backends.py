"""The chat contract shared by LLM explainers and scorers: a backend turns chat messages into text.

Backends: `local` (a model loaded by the engine, generating on this machine) and `openai` (any
OpenAI-compatible `/v1/chat/completions` endpoint: llama.cpp's server, vLLM, Ollama, or another
saescope). A scripted backend in the tests answers from known activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class ChatOptions:
    """Sampling for one completion; temperature 0 is greedy, and a seed makes sampling repeatable."""

    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0


class ChatBackend(Protocol):
    """Anything that answers chat messages with text. `name` is what draft labels record as their
    author (`autointerp:<explainer>`) and scores record as their scorer."""

    name: str

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str: ...
