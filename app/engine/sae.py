"""The SAE module: encode/decode with the architecture its SAEConfig names; load and save.

Conventions follow SAELens (v6) so its users recognise them and its folders load unchanged:
tensors ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in],
``threshold`` [d_sae]; ``encode`` returns ``feature_acts``; ``forward`` returns the reconstruction.

Input processing, in order: cast to the SAE dtype; ``expected_average_only_in`` multiplies by
``norm_scaling_factor`` (when one is known); ``apply_b_dec_to_input`` subtracts ``b_dec``. Decoding
undoes the scaling, so ``decode`` always answers in the model's own activation units.

SAEConfig and the architecture registry live in ``app.engine.sae_config`` (SAEConfig and
ARCHITECTURES are importable from here too); the file formats (SAELens, Gemma Scope 1/2, Llama
Scope) in ``app.engine.formats``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from app.engine.formats import read_sae_folder, write_saelens
from app.engine.sae_config import ARCHITECTURES, Architecture, SAEConfig, dtype_name
from app.errors import ConfigError

# Up to this many rows, hidden_pre with a column-major W_enc multiplies (W_enc.T @ x.T).T: for a
# few tokens the BLAS runs that shape (d_sae rows) faster than x @ W_enc; beyond it the strided
# result costs more than the product saves.
_TRANSPOSED_MAX_ROWS = 256
# encode_sparse's pre-activations of a TopK SAE are ranked in row chunks of at most this many
# entries (128 MB in float32): a 2,048-token batch of a 131k-wide SAE would be 1 GB at once.
_SPARSE_CHUNK_ELEMS = 1 << 25


@dataclass(frozen=True)
class _Latents:
    """What an activation function reads (``SAELike``), for a few of an SAE's latents."""

    cfg: SAEConfig
    threshold: Tensor | None
    training: bool


class SAE(nn.Module):
    """A sparse autoencoder. Build with ``SAE.load(path)``, ``SAE.from_config(cfg, seed=...)`` or
    ``SAE.from_tensors(cfg, tensors)``."""

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    threshold: nn.Parameter | None

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dtype = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if self.architecture.needs_threshold:
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        else:
            self.threshold = None

    # construction

    @classmethod
    def from_config(cls, cfg: SAEConfig, *, seed: int) -> SAE:
        """Random initialisation for training: unit-norm decoder rows, W_enc = W_dec.T, zero biases
        (the trainer sets b_dec from the data), zero threshold."""
        sae = cls(replace(cfg, metadata=dict(cfg.metadata)))
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, dtype=torch.float64)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            sae.W_dec.copy_(w_dec)
            sae.W_enc.copy_(w_dec.T)
        return sae

    @classmethod
    def from_tensors(
        cls, cfg: SAEConfig, tensors: Mapping[str, Tensor], *, source: str | None = None
    ) -> SAE:
        """An SAE in eval mode from named tensors, checked for shape and NaN/Inf.

        ``source`` (a file name) is put in every error message."""
        cfg.validate(source=source)
        sae = cls(cfg)
        expected = sae.expected_shapes()
        where = source or "SAE tensors"
        for name, shape in expected.items():
            if name not in tensors:
                raise ConfigError(
                    f"{where}: missing tensor {name!r} (architecture {cfg.architecture} needs "
                    f"{', '.join(expected)})"
                )
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise ConfigError(
                    f"{where}: tensor {name!r} has shape {list(tensor.shape)}, expected "
                    f"{list(shape)} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
                )
            if tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise ConfigError(f"{where}: tensor {name!r} has {bad} NaN/Inf values")
            with torch.no_grad():
                getattr(sae, name).copy_(tensor.to(cfg.torch_dtype))
        return sae.eval()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        shapes = {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
        }
        if self.architecture.needs_threshold:
            shapes["threshold"] = (d_sae,)
        return shapes

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        hook_name: str | None = None,
        model_name: str | None = None,
    ) -> SAE:
        """Read an SAE folder in any supported format (detected from its files).

        ``hook_name`` / ``model_name`` fill in (or override) what the folder says, for formats
        such as Gemma Scope 1 whose files do not name their hook. Returns an eval-mode SAE with
        frozen parameters."""
        cfg, tensors, source = read_sae_folder(path)
        overrides: dict[str, Any] = {}
        if hook_name is not None:
            overrides["hook_name"] = hook_name
        if model_name is not None:
            overrides["model_name"] = model_name
        if dtype is not None:
            overrides["dtype"] = dtype
        if overrides:
            cfg = replace(cfg, **overrides)
        # Loaded SAEs are for inference: frozen parameters keep encode from building autograd
        # graphs when a caller forgets torch.no_grad(). sae.requires_grad_(True) undoes it.
        return cls.from_tensors(cfg, tensors, source=source).requires_grad_(False).to(device)

    def save(self, path: str | Path) -> Path:
        """Write the SAELens v6 layout (cfg.json + sae_weights.safetensors) into folder ``path``."""
        tensors = {name: getattr(self, name) for name in self.expected_shapes()}
        return write_saelens(self.cfg, tensors, path)

    # properties

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.cfg.architecture]

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> SAE:
        # keep cfg.dtype truthful after .to(dtype) / .half() / .float()
        out = super()._apply(fn, *args, **kwargs)
        self.cfg.dtype = dtype_name(self.W_enc.dtype)
        return out

    # maths

    def process_input(self, x: Tensor) -> Tensor:
        """What the encoder sees: cast, optional norm scaling, optional ``b_dec`` subtraction."""
        x = x.to(self.dtype)
        if (
            self.cfg.normalize_activations == "expected_average_only_in"
            and self.cfg.norm_scaling_factor
        ):
            x = x * self.cfg.norm_scaling_factor
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def hidden_pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``process_input(x) @ W_enc + b_enc`` [..., d_sae] for x [..., d_in].

        One fused addmm (the bias added inside the matrix product, not in a second pass over
        the [tokens, d_sae] result). When ``W_enc`` is stored column-major (``W_enc.T``
        contiguous, see ``store_encoder_transposed``) and there are at most
        ``_TRANSPOSED_MAX_ROWS`` rows, the product is taken as ``(W_enc.T @ x.T).T``: the same
        sums, a shape the BLAS runs faster for a few tokens."""
        x = self.process_input(x)
        flat = x.reshape(-1, x.shape[-1])
        w = self.W_enc
        if flat.shape[0] <= _TRANSPOSED_MAX_ROWS and w.t().is_contiguous() and w.shape[1] > 1:
            pre = torch.addmm(self.b_enc[:, None], w.t(), flat.t()).t()
        else:
            pre = torch.addmm(self.b_enc, flat, w)
        return pre.reshape(*x.shape[:-1], w.shape[1])

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(feature_acts, hidden_pre) for x [..., d_in]; hidden_pre is what the activation sees."""
        hidden_pre = self.hidden_pre(x)
        return self.architecture.activation(self, hidden_pre), hidden_pre

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The code of x [n, d_in] without its dense [n, d_sae] form: (values, indices), both
        [n, m], each row sorted by value, descending (ties: as ``torch.topk``). Every latent
        that fires (> 0) on a row is in it; the rest of a row has value 0.

        Equal to ``encode``: a TopK SAE's code is the ReLU of its k largest pre-activations, so
        that top-k is the whole code (m = k, no [n, d_sae] tensor but the pre-activations);
        other architectures encode densely and keep the widest row's nonzeros. A TopK SAE's
        rows go in chunks of ``_SPARSE_CHUNK_ELEMS`` pre-activations, so a wide SAE's batch
        never holds its whole [n, d_sae] product (each row's top k is its own)."""
        if self.cfg.architecture == "topk":
            k = int(self.cfg.k)  # type: ignore[arg-type]
            flat = x.reshape(-1, x.shape[-1])
            rows = max(1, _SPARSE_CHUNK_ELEMS // int(self.cfg.d_sae))
            if flat.shape[0] <= rows:
                values, indices = self.hidden_pre(x).topk(k, dim=-1)
                return values.relu_(), indices
            parts = [self.hidden_pre(flat[i:i + rows]).topk(k, dim=-1)
                     for i in range(0, flat.shape[0], rows)]
            values = torch.cat([v for v, _ in parts]).relu_()
            indices = torch.cat([i for _, i in parts])
            return values.reshape(*x.shape[:-1], k), indices.reshape(*x.shape[:-1], k)
        feats = self.encode(x)
        width = max(1, int((feats > 0).sum(dim=-1).max())) if feats.numel() else 1
        return feats.topk(min(width, feats.shape[-1]), dim=-1)

    @torch.no_grad()
    def store_encoder_transposed(self) -> SAE:
        """Keep ``W_enc`` column-major (``W_enc.T`` contiguous, as ``nn.Linear`` keeps its
        weight): the same values, a layout in which ``hidden_pre`` can take the faster product
        for a few tokens (text search) and a full batch is no slower. Returns self."""
        self.W_enc.data = self.W_enc.data.t().contiguous().t()
        return self

    def encode(self, x: Tensor) -> Tensor:
        """feature_acts [..., d_sae] for x [..., d_in]."""
        return self.encode_with_hidden_pre(x)[0]

    def encode_latents(self, x: Tensor, indices: Sequence[int]) -> Tensor:
        """``encode(x)[..., indices]`` [..., len(indices)], computing as little as the
        architecture allows (steering reads a few latents at every step).

        Per-latent activations (relu, jumprelu, batchtopk at inference) need only those
        latents' encoder columns: a [d_in, len(indices)] product instead of [d_in, d_sae]. TopK
        ranks every pre-activation, so it takes them all (the same ``topk`` call as ``encode``,
        so ties resolve alike), but only for rows where a latent asked for is positive."""
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.device)
        arch = self.architecture
        if arch.per_latent and not (self.training and self.cfg.architecture == "batchtopk"):
            pre = self.process_input(x) @ self.W_enc[:, idx] + self.b_enc[idx]
            threshold = None if self.threshold is None else self.threshold[idx]
            return arch.activation(_Latents(self.cfg, threshold, self.training), pre)
        if self.cfg.architecture == "topk":
            # A latent whose pre-activation is <= 0 is 0 whatever its rank (the ReLU after the
            # top k): rows where none of the latents asked for is positive need no ranking.
            flat = x.reshape(-1, x.shape[-1])
            out = torch.zeros(flat.shape[0], len(idx), dtype=self.dtype, device=self.device)
            maybe = ((self.process_input(flat) @ self.W_enc[:, idx] + self.b_enc[idx]) > 0
                     ).any(dim=-1)
            if bool(maybe.any()):
                pre = self.hidden_pre(flat[maybe])
                _, top = pre.topk(int(self.cfg.k), dim=-1, sorted=False)  # type: ignore[arg-type]
                chosen = (top.unsqueeze(-1) == idx).any(dim=-2)
                out[maybe] = pre[..., idx].relu() * chosen.to(pre.dtype)
            return out.reshape(*x.shape[:-1], len(idx))
        return self.encode(x)[..., idx]

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction [..., d_in] in the model's activation units."""
        out = feature_acts.to(self.dtype) @ self.W_dec + self.b_dec
        if (
            self.cfg.normalize_activations == "expected_average_only_in"
            and self.cfg.norm_scaling_factor
        ):
            out = out / self.cfg.norm_scaling_factor
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # checks and weight transforms

    def check_compatible(self, *, d_model: int, hook_name: str | None = None) -> None:
        """Raise ConfigError if this SAE cannot read activations of width ``d_model`` at
        ``hook_name`` (a hook different from the one it was trained on is also refused)."""
        hook = hook_name or self.cfg.hook_name or "the hook"
        if self.cfg.d_in != d_model:
            raise ConfigError(
                f"SAE d_in={self.cfg.d_in} does not match the width {d_model} of {hook}"
                f" (model {self.cfg.model_name or 'unknown'}); use an SAE trained on this model"
            )
        if hook_name and self.cfg.hook_name and hook_name != self.cfg.hook_name:
            raise ConfigError(
                f"SAE was trained on hook {self.cfg.hook_name}, not {hook_name}; pass "
                f"hook_name={self.cfg.hook_name!r} or load it with SAE.load(path, hook_name=...)"
            )

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self) -> None:
        """Fold ``norm_scaling_factor`` into the weights (as SAELens does), leaving the encodings
        and reconstructions unchanged and ``normalize_activations`` = "none"."""
        factor = self.cfg.norm_scaling_factor
        if factor is not None:
            # encoder sees s*x - b_dec = s*(x - b_dec/s); decoder output (zW + b)/s
            self.W_enc.mul_(factor)
            self.W_dec.div_(factor)
            self.b_dec.div_(factor)
        self.cfg.normalize_activations = "none"
        self.cfg.norm_scaling_factor = None

    @torch.no_grad()
    def fold_W_dec_norm(self) -> Tensor:
        """Make decoder rows unit-norm, scaling each latent's encoder column, bias and threshold
        by its old norm. Reconstructions are unchanged; feature_acts are multiplied by that norm.
        Returns the old norms [d_sae]."""
        norms = self.W_dec.norm(dim=-1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.W_dec.div_(safe[:, None])
        self.W_enc.mul_(safe[None, :])
        self.b_enc.mul_(safe)
        if self.threshold is not None:
            self.threshold.mul_(safe)
        return norms

    @torch.no_grad()
    def update_batchtopk_threshold(self, feature_acts: Tensor, *, lr: float = 0.01) -> None:
        """BatchTopK training: move the inference threshold toward the smallest kept activation
        (exponential moving average, as in SAELens)."""
        if self.threshold is None:
            raise ConfigError(f"architecture {self.cfg.architecture} has no threshold")
        positive = feature_acts[feature_acts > 0]
        if positive.numel():
            self.threshold.mul_(1 - lr).add_(lr * positive.min().to(self.dtype))

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, hook={c.hook_name}"
