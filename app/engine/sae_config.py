"""What an SAE is, apart from its weights: SAEConfig and the architecture registry.

Each architecture (relu, topk, batchtopk, jumprelu) is an activation function over the
pre-activations plus the tensors it needs; ``app.engine.sae`` holds the module that applies them,
``app.engine.formats`` the files that describe them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from app.errors import ConfigError

NORMALIZATIONS = ("none", "expected_average_only_in")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# --- architecture registry -------------------------------------------------------------------
# Each architecture is only an activation function over the pre-activations plus the tensors it
# needs; everything else (input processing, decoder) is shared. Adding one is one entry here.


class SAELike(Protocol):
    """What an activation function reads from the SAE module (``app.engine.sae.SAE``)."""

    @property
    def cfg(self) -> SAEConfig: ...

    @property
    def threshold(self) -> Tensor | None: ...

    @property
    def training(self) -> bool: ...


ActivationFn = Callable[[SAELike, Tensor], Tensor]


def _relu(sae: SAELike, pre: Tensor) -> Tensor:
    return torch.relu(pre)


def _topk(sae: SAELike, pre: Tensor) -> Tensor:
    # As SAELens: pick the k largest pre-activations, then ReLU only those (a latent in the top k
    # with a negative pre-activation stays 0). torch.topk breaks ties the same way in both.
    k = int(sae.cfg.k)  # type: ignore[arg-type]
    values, indices = torch.topk(pre, k=k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def _jumprelu(sae: SAELike, pre: Tensor) -> Tensor:
    # Strict comparison, as in Gemma Scope and SAELens: a latent fires when pre > threshold. The
    # ReLU matters only for negative thresholds, where SAELens still zeroes negative values.
    return torch.relu(pre) * (pre > sae.threshold).to(pre.dtype)


def _batchtopk(sae: SAELike, pre: Tensor) -> Tensor:
    # Training keeps the k * n_tokens largest activations over the whole batch (Bussmann et al.
    # 2024); inference must not depend on the batch, so it uses the threshold estimated during
    # training, which is exactly a JumpReLU (SAELens saves these SAEs as "jumprelu" for that
    # reason).
    if not sae.training:
        return _jumprelu(sae, pre)
    acts = pre.relu()
    flat = acts.reshape(-1)
    n_keep = min(flat.numel(), int(round(float(sae.cfg.k) * acts.shape[:-1].numel())))  # type: ignore[arg-type]
    values, indices = torch.topk(flat, n_keep, sorted=False)
    return torch.zeros_like(flat).scatter_(-1, indices, values).reshape(acts.shape)


@dataclass(frozen=True)
class Architecture:
    name: str
    activation: ActivationFn
    needs_threshold: bool
    needs_k: bool
    # the name written to cfg.json "architecture" so SAELens builds the matching class
    saelens_name: str
    # At inference each latent's activation depends on its own pre-activation alone (relu,
    # jumprelu, batchtopk's threshold): a few latents need only their encoder columns
    # (SAE.encode_latents). TopK ranks every latent against the others, so it needs them all.
    per_latent: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "relu": Architecture(
        "relu", _relu, needs_threshold=False, needs_k=False, saelens_name="standard",
        per_latent=True,
    ),
    "topk": Architecture("topk", _topk, needs_threshold=False, needs_k=True, saelens_name="topk"),
    "batchtopk": Architecture(
        "batchtopk", _batchtopk, needs_threshold=True, needs_k=True, saelens_name="jumprelu",
        per_latent=True,
    ),
    "jumprelu": Architecture(
        "jumprelu", _jumprelu, needs_threshold=True, needs_k=False, saelens_name="jumprelu",
        per_latent=True,
    ),
}
# Names other tools use for the same maths.
ARCHITECTURE_ALIASES = {"standard": "relu", "jump_relu": "jumprelu", "batch_topk": "batchtopk"}


def canonical_architecture(name: str, *, source: str | None = None) -> str:
    """Our name for an architecture name from any supported tool; unknown -> ConfigError."""
    key = ARCHITECTURE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ARCHITECTURES:
        where = f"{source}: " if source else ""
        raise ConfigError(
            f"{where}unknown SAE architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}"
            f" (also accepted: {', '.join(ARCHITECTURE_ALIASES)})"
        )
    return key


# --- config ----------------------------------------------------------------------------------


@dataclass
class SAEConfig:
    """What an SAE is and where it reads from. ``metadata`` keeps any extra keys a file carried."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | float | None = None  # topk: latents per token; batchtopk: average per token
    hook_name: str | None = None
    model_name: str | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    # expected_average_only_in: inputs are multiplied by this (sqrt(d_in) / mean input norm) and
    # outputs divided by it. None means it was already folded into the weights (what SAELens
    # does on load and at the end of training), so nothing is applied at run time.
    norm_scaling_factor: float | None = None
    context_size: int | None = None
    prepend_bos: bool = True
    exclude_special_tokens: bool | list[int] = False
    neuronpedia_id: str | None = None
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.architecture = canonical_architecture(self.architecture)
        self.validate()

    def validate(self, *, source: str | None = None) -> None:
        """Raise ConfigError naming the bad field (and the file, when given)."""
        where = f"{source}: " if source else ""
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}{name} must be a positive integer (got {value!r})")
        arch = ARCHITECTURES[self.architecture]
        if arch.needs_k:
            if self.k is None or isinstance(self.k, bool) or not isinstance(self.k, int | float):
                raise ConfigError(
                    f"{where}architecture {self.architecture} needs k (got {self.k!r})"
                )
            if self.architecture == "topk" and (
                int(self.k) != self.k or not 1 <= self.k <= self.d_sae
            ):
                raise ConfigError(
                    f"{where}topk k must be an integer between 1 and d_sae={self.d_sae} "
                    f"(got {self.k!r})"
                )
            if self.architecture == "topk":
                self.k = int(self.k)
            if self.architecture == "batchtopk" and not 0 < self.k <= self.d_sae:
                raise ConfigError(
                    f"{where}batchtopk k must be in (0, d_sae={self.d_sae}] (got {self.k!r})"
                )
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"{where}normalize_activations {self.normalize_activations!r} is not supported; "
                f"allowed: {', '.join(NORMALIZATIONS)}"
            )
        if self.norm_scaling_factor is not None:
            factor = self.norm_scaling_factor
            if not (isinstance(factor, int | float) and math.isfinite(factor) and factor > 0):
                raise ConfigError(
                    f"{where}norm_scaling_factor must be a positive number (got {factor!r})"
                )
            if self.normalize_activations != "expected_average_only_in":
                raise ConfigError(
                    f"{where}norm_scaling_factor is set but normalize_activations is "
                    f"{self.normalize_activations!r}; use 'expected_average_only_in'"
                )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"{where}dtype {self.dtype!r} not supported; allowed: {', '.join(DTYPES)}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"dtype {dtype} not supported; allowed: {', '.join(DTYPES)}")
