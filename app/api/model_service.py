"""What the API knows of the model side: the `ModelService` protocol and where the model stands.

The API never imports the engine (nor torch); the app's lifespan builds the real service
(`app.engine.service.EngineService`) and hands it over through `EngineState`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from app.errors import UnavailableError


class ModelService(Protocol):
    """The calls the API makes on the model thread; plain Python in and out."""

    @property
    def model_id(self) -> str: ...

    saes: Mapping[str, Any]  # sae_id -> the loaded SAE (opaque here)
    skipped: Mapping[str, str]  # sae_id -> why it was not loaded

    def tokenize(self, *, sae_id: str, text: str) -> list[int]: ...

    def search(self, *, sae_id: str, ids: list[int], top_k: int,
               n_features: int) -> dict[str, Any]: ...

    def feature_activations(self, *, sae_id: str, ids: list[int],
                            index: int) -> dict[str, Any]: ...

    # Steering generators: one model forward per item (run them with ModelWorker.stream).

    def steer_stream(
        self, *, sae_id: str, prompt: str, features: Sequence[Mapping[str, Any]] = (),
        vectors: Sequence[Mapping[str, Any]] = (), scope: str = "all", max_new_tokens: int = 64,
        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat_template: bool = False,
        max_prompt_tokens: int = 1024, deadline: float | None = None,
    ) -> Iterator[list[dict[str, Any]]]: ...

    def steer_sweep(
        self, *, sae_id: str, prompt: str, index: int, mode: str, values: Sequence[float],
        scope: str = "all", max_new_tokens: int = 32, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, chat_template: bool = False,
        max_prompt_tokens: int = 1024, deadline: float | None = None,
    ) -> Iterator[dict[str, Any] | None]: ...

    def chat_stream(
        self, *, messages: Sequence[Mapping[str, str]], max_tokens: int,
        temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
        max_prompt_tokens: int = 4096, deadline: float | None = None, reply_start: str = "",
    ) -> Iterator[dict[str, Any]]: ...

    def caa_vector(self, *, sae_id: str, positive: Sequence[str], negative: Sequence[str],
                   position: str = "last", top_k: int = 10) -> dict[str, Any]: ...


@dataclass
class EngineState:
    """Where the model stands: disabled, loading, ready (with its service) or failed."""

    status: Literal["disabled", "loading", "ready", "failed"] = "disabled"
    # Both ways a server is started without one: the serve flag and the environment variable.
    message: str = ("the server was started without a model (`saescope serve --no-model` or "
                    "SAESCOPE_LOAD_MODEL=false); restart it with `saescope serve --model`")
    service: ModelService | None = None

    def require(self, need: str = "text search and steering need a model") -> ModelService:
        """The loaded model; UnavailableError (503) while it loads, or saying `need` and why
        there is none."""
        if self.status == "ready" and self.service is not None:
            return self.service
        if self.status == "loading":
            raise UnavailableError("the model is still loading; retry in a few seconds",
                                   retry_after=5)
        raise UnavailableError(f"{need}: {self.message}")
