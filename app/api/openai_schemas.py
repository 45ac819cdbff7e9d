"""Wire schemas of the OpenAI-compatible routes: chat completion requests, responses, stream
chunks and the model list, in OpenAI's shapes and names.

Fields OpenAI clients send that saescope does not use (presence_penalty, logit_bias, user, ...)
are accepted and ignored; `n` may only be 1. Bounds that never change are declared here; the
deployment's (max new tokens, prompt tokens) are checked by the route and put into OpenAPI by
`document_bounds`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.openai_errors import OpenAIErrorOut
from app.api.steer_schemas import MAX_NEW_TOKENS_CEILING

# Every bound is in the schema, so a request the schema accepts is never refused for its size;
# the prompt's token limit (SAESCOPE_CHAT_MAX_PROMPT_TOKENS) is checked once tokenized.
MAX_MESSAGES = 16
MAX_CONTENT_CHARS = 16_000  # one message: a string, or up to MAX_PARTS parts of a quarter each
MAX_PARTS = 4
MAX_STOPS = 4
MAX_STOP_CHARS = 64
# The body limit (413 before parsing): every character as a 6-byte JSON escape, plus room.
MAX_BODY_BYTES = MAX_MESSAGES * MAX_CONTENT_CHARS * 6 + 64 * 1024
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes

Role = Literal["system", "developer", "user", "assistant"]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


# strict: JSON's types as the schema says them (0 is no boolean, 1.0 no count), as OpenAI does.
STRICT = ConfigDict(extra="ignore", strict=True)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS // MAX_PARTS)


class ChatMessageIn(BaseModel):
    model_config = STRICT

    role: Role = Field(description="developer is read as system")
    content: (Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]
              | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]) = Field(
        description="Text, or a list of text parts (joined); other part types are refused")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = Field(False, description="Send a last chunk with the usage and no "
                                                   "choices before [DONE]")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"examples": [{
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16, "temperature": 0}]})

    model: str = Field(min_length=1, max_length=200,
                       description="The model this server loaded (GET /v1/models)")
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CEILING, description=(
        "New tokens at most (default and limit: SAESCOPE_STEER_MAX_NEW_TOKENS)"))
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CEILING,
                                              description="OpenAI's newer name for max_tokens; "
                                                          "wins when both are given")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX,
                             description="Makes sampling repeatable (default: a random seed)")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"Up to {MAX_STOPS} strings; the reply ends before the first one")
    stream: bool = Field(False, description="Server-sent events of chat.completion.chunk "
                                            "objects, then `data: [DONE]`")
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Choices to generate: only 1")

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason = Field(description="stop: end of turn or a stop string; "
                                                    "length: max_tokens, the context or the "
                                                    "time limit")
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelCardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _error(description: str) -> dict[str, Any]:
    return {"model": OpenAIErrorOut, "description": description}


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("No or unknown token (SAESCOPE_AUTH=token: send Authorization: Bearer)"),
    403: _error("A cross-site browser request"),
}
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A chat.completion object; with stream=true, server-sent events "
                         "(`data: {chat.completion.chunk}` lines, an error object if the "
                         "generation fails midway, then `data: [DONE]`)",
          # One server-sent event: its data is a chunk's JSON, an error object's, or [DONE].
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["data"],
              "properties": {"event": {"type": "string", "enum": ["message"]},
                             "data": {"type": "string"}}}}}},
    400: _error("Invalid request, messages over the prompt token limit, or max_tokens over "
                "the server's limit"),
    **AUTH_RESPONSES,
    404: _error("The model is not the one this server loaded (code model_not_found)"),
    413: _error("Request body over this endpoint's limit"),
    503: _error("Model queue full, model still loading, or no model loaded (Retry-After)"),
}


def document_bounds(openapi: dict[str, Any], *, max_new_tokens: int, model: str) -> None:
    """Put this deployment's bounds into the OpenAPI schema (in place): the max_tokens limit,
    the model to name (when the server was told which), and no 422 on /v1 (its input errors
    are OpenAI's 400)."""
    schemas = openapi.get("components", {}).get("schemas", {})
    properties = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    for name in ("max_tokens", "max_completion_tokens"):
        for option in properties.get(name, {}).get("anyOf", []):
            if option.get("type") == "integer":
                option["maximum"] = min(max_new_tokens, MAX_NEW_TOKENS_CEILING)
    if model and "model" in properties:
        properties["model"]["examples"] = [model]
    for path, operations in openapi.get("paths", {}).items():
        if path.startswith("/v1/"):
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
