"""Wire schemas of the steering lab: generation requests, their outputs, sweeps, saved runs and
saved steering vectors.

Bounds that never change are declared here (so OpenAPI shows them and pydantic answers 422);
the ones a deployment sets (max new tokens, prompt tokens) are checked by the routes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from app.api.deps import NO_NUL
from app.api.schemas import MODEL_CALL_RESPONSES, ErrorOut

Mode = Literal["add", "clamp", "multiply", "ablate"]
Scope = Literal["all", "prompt", "generated"]
MAX_FEATURES = 16  # in one request
MAX_VECTORS = 8
MAX_STRENGTH = 1000.0  # |value| of an intervention; far past where any text stays coherent
MAX_SWEEP_VALUES = 12
MAX_PROMPT_CHARS = 20_000  # before tokenizing; the token limit is SAESCOPE_MAX_TEXT_TOKENS
MAX_CAA_PROMPTS = 32
MAX_CAA_PROMPT_CHARS = 1000
MAX_RUN_TEXT_CHARS = 50_000  # a saved output: 256 tokens of text is a few thousand
# Request bodies past these are a 413 before parsing (app.main): the largest strings a route
# takes, at up to 6 bytes a character (a JSON \u escape), and room for the other fields.
GENERATION_MAX_BODY_BYTES = MAX_PROMPT_CHARS * 6 + 64 * 1024
LIBRARY_MAX_BODY_BYTES = max(
    (MAX_PROMPT_CHARS + 2 * MAX_RUN_TEXT_CHARS) * 6,
    2 * MAX_CAA_PROMPTS * MAX_CAA_PROMPT_CHARS * 6,
) + 64 * 1024

Strength = Field(0.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
StrengthValue = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)]

STEER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **MODEL_CALL_RESPONSES,
    404: {"model": ErrorOut, "description": "Unknown SAE, feature or saved vector, or an SAE "
                                            "this server did not load"},
    409: {"model": ErrorOut, "description": "The loaded model cannot do what was asked (a chat "
                                            "template it does not have)"},
    429: {"model": ErrorOut, "description": "With auth=token: this person already runs "
                                            "SAESCOPE_STEER_PER_USER generations (Retry-After)"},
}
MAX_NEW_TOKENS_CEILING = 4096  # the schema's bound; the deployment's (lower) one is documented
# in OpenAPI by document_bounds and checked by the routes


class FeatureIn(BaseModel):
    index: int = Field(ge=0, description="Feature index in its SAE")
    mode: Mode = Field("add", description="add: value x the decoder row; clamp: set the "
                       "activation to value; multiply: activation x value; ablate: set to 0")
    value: float = Strength
    sae_id: str | None = Field(None, max_length=200, pattern=NO_NUL,
                               description="The feature's SAE (default: the request's)")


class VectorIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL,
                      description="A saved steering vector")
    value: float = Strength


class GenerationSettings(BaseModel):
    sae_id: str = Field(min_length=1, max_length=200, pattern=NO_NUL, description="The default "
                        "SAE (its tokenization, and the SAE of features without their own "
                        "sae_id)")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    scope: Scope = Field("all", description="Positions steered: all, the prompt's, or the "
                         "generated tokens'")
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS_CEILING,
                                description="At most SAESCOPE_STEER_MAX_NEW_TOKENS")
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    chat_template: bool = Field(False, description="Wrap the prompt in the model's chat "
                                "template as a user turn (chat models only)")


class SteerIn(GenerationSettings):
    features: list[FeatureIn] = Field(default_factory=list, max_length=MAX_FEATURES)
    vectors: list[VectorIn] = Field(default_factory=list, max_length=MAX_VECTORS)


class StreamOut(BaseModel):
    text: str
    tokens: list[str] = Field(description="Display strings of the new tokens (stop token "
                              "left out)")
    token_ids: list[int]
    stop_reason: str = Field(description="stop_token, max_new_tokens or time_limit")


class SteerOut(BaseModel):
    default: StreamOut
    steered: StreamOut


class SweepIn(GenerationSettings):
    index: int = Field(ge=0)
    mode: Mode = "add"
    values: list[StrengthValue] = Field(min_length=1, max_length=MAX_SWEEP_VALUES)
    max_new_tokens: int = Field(24, ge=1, le=MAX_NEW_TOKENS_CEILING,
                                description="At most SAESCOPE_STEER_MAX_NEW_TOKENS")


class SweepCell(StreamOut):
    realised: float | None = Field(description="The feature's mean activation on the generated "
                                   "tokens, as the SAE encodes the activation after the edit")
    coherence: float | None = Field(description="Mean log-probability of the text under the "
                                    "unsteered model")


class SweepValueCell(SweepCell):
    value: float


class SweepOut(BaseModel):
    sae_id: str
    index: int
    mode: Mode
    default: SweepCell
    cells: list[SweepValueCell]


# --- saved runs ---------------------------------------------------------------------------------


class RunIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    request: SteerIn
    default_text: str = Field(max_length=MAX_RUN_TEXT_CHARS)
    steered_text: str = Field(max_length=MAX_RUN_TEXT_CHARS)


class RunBrief(BaseModel):
    id: int
    name: str
    sae_id: str
    author: str
    created_at: datetime


class RunOut(RunBrief):
    request: SteerIn
    default_text: str
    steered_text: str


class RunList(BaseModel):
    data: list[RunBrief]
    count: int


# --- steering vectors (contrastive activation addition) -----------------------------------------


CaaPrompt = Annotated[str, Field(min_length=1, max_length=MAX_CAA_PROMPT_CHARS)]


class VectorCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[\w .:-]+$")
    sae_id: str = Field(min_length=1, max_length=200, pattern=NO_NUL, description="Its hook is "
                        "the SAE's hook; its aligned features are this SAE's")
    positive: list[CaaPrompt] = Field(min_length=1, max_length=MAX_CAA_PROMPTS)
    negative: list[CaaPrompt] = Field(min_length=1, max_length=MAX_CAA_PROMPTS)
    position: Literal["last", "mean"] = Field("last", description="Each prompt read at its last "
                                               "token, or averaged over its non-special tokens")


class AlignedFeature(BaseModel):
    index: int
    cosine: float
    label: str | None = None


class VectorOut(BaseModel):
    name: str
    sae_id: str
    hook_name: str
    position: str
    positive: list[str]
    negative: list[str]
    norm: float
    aligned: list[AlignedFeature]
    author: str
    created_at: datetime


class VectorList(BaseModel):
    data: list[VectorOut]
    count: int


def document_bounds(openapi: dict[str, Any], *, max_new_tokens: int) -> None:
    """Put this deployment's max_new_tokens bound into the OpenAPI schema (in place), so a
    client, or a fuzzer, reading it knows which values the routes accept."""
    for name in ("SteerIn", "SweepIn"):
        properties = openapi.get("components", {}).get("schemas", {}).get(name, {}).get(
            "properties", {})
        if "max_new_tokens" in properties:
            properties["max_new_tokens"]["maximum"] = min(max_new_tokens, MAX_NEW_TOKENS_CEILING)
