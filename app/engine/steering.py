"""Steering interventions as positional hooks: SAE-feature edits (add, clamp, multiply, ablate),
raw vectors (contrastive activation addition), a probe of a feature's realised activation.

A ``Steering`` turns a list of edits into one positional hook per hook name, for ``KVDecoder`` /
``Generation`` (or ``lm.hooks(..., positional=True)``). Each edit applies only at the positions
of its scope (all, prompt, generated; see ``hooks.PositionContext``) and only to the batch rows
given, so a default stream and steered streams can share one batch.

- add: x += value * d_i, where d_i = decode(e_i) - decode(0) is the feature's decoder row in the
  model's activation units (W_dec[i], divided by the input scaling factor when the SAE
  normalises its input), so a value of 5 adds what an activation of 5 decodes to.
- clamp / multiply / ablate: f = encode(x), f' = f with the feature set to value, times value,
  or 0; x += decode(f') - decode(f). The SAE's reconstruction error x - decode(x) stays in the
  stream, so the edit is not cancelled by what the SAE fails to explain. Only the edited
  latents of f are computed (``SAE.encode_latents``): for relu / jumprelu SAEs a few encoder
  columns, not the whole encoder; add needs no encode at all.
- vector: x += value * v for a raw direction v at its hook (e.g. ``caa_vector``).

At one hook, the encode-based edits of each SAE come first (one encode per SAE, on the activation
as the previous SAE's edits left it), then every additive edit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from app.engine.hooks import SCOPES, PositionalHookFn, PositionContext, Scope
from app.errors import ConfigError

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel
    from app.engine.sae import SAE

Mode = Literal["add", "clamp", "multiply", "ablate"]
MODES: tuple[str, ...] = get_args(Mode)
CaaPosition = Literal["last", "mean"]
CAA_POSITIONS: tuple[str, ...] = get_args(CaaPosition)


@dataclass(frozen=True, eq=False)
class FeatureEdit:
    """One SAE feature edited at the SAE's hook (``hook_name``: the SAE's own when None)."""

    sae: SAE
    index: int
    mode: Mode
    value: float = 0.0
    hook_name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown steering mode {self.mode!r}; modes: {', '.join(MODES)}")
        d_sae = self.sae.cfg.d_sae
        if not 0 <= self.index < d_sae:
            raise ConfigError(f"the SAE has features 0..{d_sae - 1}; no feature {self.index}")
        _check_finite(self.value)
        if self.hook is None:
            raise ConfigError("the SAE names no hook; give the edit a hook_name")

    @property
    def hook(self) -> str:
        return self.hook_name or self.sae.cfg.hook_name  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class VectorEdit:
    """A raw direction [d_model], added value times at ``hook_name``."""

    hook_name: str
    vector: Tensor
    value: float = 1.0

    def __post_init__(self) -> None:
        _check_finite(self.value)
        if self.vector.ndim != 1 or not bool(torch.isfinite(self.vector).all()):
            raise ConfigError("a steering vector must be one finite row of d_model values")

    @property
    def hook(self) -> str:
        return self.hook_name


Edit = FeatureEdit | VectorEdit


def _check_finite(value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"a steering value must be a finite number, not {value!r}")


def _input_scale(sae: SAE) -> float:
    """What the SAE multiplies its input by (1 without input normalisation)."""
    if sae.cfg.normalize_activations == "expected_average_only_in" and sae.cfg.norm_scaling_factor:
        return float(sae.cfg.norm_scaling_factor)
    return 1.0


def feature_direction(sae: SAE, index: int) -> Tensor:
    """decode(e_index) - decode(0): one unit of the feature in the model's activation units."""
    return sae.W_dec[index] / _input_scale(sae)


@dataclass
class _HookPlan:
    """The edits of one hook, grouped: per SAE its encode-based edits, then the additive ones."""

    encoded: dict[int, tuple[SAE, list[FeatureEdit]]] = field(default_factory=dict)
    additive: list[Edit] = field(default_factory=list)


class Steering:
    """Edits applied at the positions of ``scope`` of the batch rows ``rows`` (all when None)."""

    def __init__(self, edits: Sequence[Edit], *, scope: Scope = "all",
                 rows: Sequence[int] | None = None) -> None:
        if scope not in SCOPES:
            raise ConfigError(f"unknown position scope {scope!r}; scopes: {', '.join(SCOPES)}")
        self.scope = scope
        self.rows = None if rows is None else list(rows)
        self.plans: dict[str, _HookPlan] = defaultdict(_HookPlan)
        for edit in edits:
            plan = self.plans[edit.hook]
            if isinstance(edit, FeatureEdit) and edit.mode != "add":
                plan.encoded.setdefault(id(edit.sae), (edit.sae, []))[1].append(edit)
            else:
                plan.additive.append(edit)

    def hooks(self) -> dict[str, PositionalHookFn]:
        return {name: self._hook(plan) for name, plan in self.plans.items()}

    def _hook(self, plan: _HookPlan) -> PositionalHookFn:
        def fn(t: Tensor, positions: PositionContext) -> Tensor | None:
            mask = positions.mask(self.scope).to(t.device)
            if not bool(mask.any()):
                return None
            rows = slice(None) if self.rows is None else self.rows
            x = t[rows]
            for sae, edits in plan.encoded.values():
                x = x + mask * _encoded_delta(sae, edits, x).to(x.dtype)
            if plan.additive:
                x = x + mask * _additive_delta(plan.additive, like=x)
            out = t.clone()
            out[rows] = x
            return out

        return fn


@torch.no_grad()
def _encoded_delta(sae: SAE, edits: Sequence[FeatureEdit], x: Tensor) -> Tensor:
    """decode(f') - decode(f) for f = encode(x) and f' = f with the edits applied in order; only
    the edited latents differ, so only they are encoded (see SAE.encode_latents: for per-latent
    architectures only their encoder columns) and only their decoder rows multiplied."""
    indices = sorted({e.index for e in edits})
    column = {index: j for j, index in enumerate(indices)}
    old = sae.encode_latents(x, indices)
    new = old.clone()
    for edit in edits:
        j = column[edit.index]
        if edit.mode == "clamp":
            new[..., j] = edit.value
        elif edit.mode == "multiply":
            new[..., j] = new[..., j] * edit.value
        else:  # ablate
            new[..., j] = 0.0
    return (new - old) @ sae.W_dec[indices] / _input_scale(sae)


def _additive_delta(edits: Sequence[Edit], *, like: Tensor) -> Tensor:
    delta = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    for edit in edits:
        if isinstance(edit, FeatureEdit):
            direction = feature_direction(edit.sae, edit.index)
        else:
            direction = edit.vector
        delta = delta + edit.value * direction.to(device=like.device, dtype=like.dtype)
    return delta


class FeatureProbe:
    """Records one feature's activation at a hook (the SAE's encoding of the activation as the
    model holds it there, after any edit at that hook) on generated positions, per batch row."""

    def __init__(self, sae: SAE, index: int, *, hook_name: str | None = None) -> None:
        self.sae = sae
        self.index = index
        self.hook_name = hook_name or sae.cfg.hook_name
        self.values: list[Tensor] = []  # per forward, [batch, generated positions]

    def hook(self, t: Tensor, positions: PositionContext) -> None:
        generated = positions.generated.to(t.device)
        if bool(generated.any()):
            with torch.no_grad():
                self.values.append(
                    self.sae.encode_latents(t[:, generated], [self.index])[..., 0].float())

    def mean(self, counts: Sequence[int] | None = None) -> list[float | None]:
        """Per batch row, the mean over the generated positions seen, or over the first
        ``counts[row]`` of them (a stopped stream's row keeps running; what it holds after its
        stop is not its text); None for a row with none."""
        if not self.values:
            return []
        values = torch.cat(self.values, dim=1).cpu()
        counts = [values.shape[1]] * values.shape[0] if counts is None else counts
        return [float(row[:n].mean()) if n > 0 else None
                for row, n in zip(values, counts, strict=True)]


def chain_hooks(*maps: Mapping[str, PositionalHookFn]) -> dict[str, PositionalHookFn]:
    """Several hook maps as one: functions on the same hook run in the order given, each on
    what the previous one left."""
    grouped: dict[str, list[PositionalHookFn]] = defaultdict(list)
    for hook_map in maps:
        for name, fn in hook_map.items():
            grouped[name].append(fn)

    def chained(fns: list[PositionalHookFn]) -> PositionalHookFn:
        if len(fns) == 1:
            return fns[0]

        def fn(t: Tensor, positions: PositionContext) -> Tensor | None:
            changed = False
            for one in fns:
                out = one(t, positions)
                if out is not None:
                    t, changed = out, True
            return t if changed else None

        return fn

    return {name: chained(fns) for name, fns in grouped.items()}


# --- contrastive activation addition -------------------------------------------------------------


@torch.no_grad()
def caa_vector(lm: LanguageModel, *, hook_name: str, positive: Sequence[Sequence[int]],
               negative: Sequence[Sequence[int]], position: CaaPosition = "last") -> Tensor:
    """Contrastive activation addition (Rimsky et al.): the mean activation at ``hook_name`` over
    the positive prompts minus that over the negative ones [d_model], each prompt read at its
    last token ("last") or averaged over its non-special tokens ("mean"; BOS excluded: its norm
    dwarfs the rest)."""
    if position not in CAA_POSITIONS:
        raise ConfigError(
            f"unknown position {position!r}; choose one of {', '.join(CAA_POSITIONS)}")
    if not positive or not negative:
        raise ConfigError("a steering vector needs at least one positive and one negative prompt")
    return (_mean_activation(lm, hook_name, positive, position)
            - _mean_activation(lm, hook_name, negative, position))


def _mean_activation(lm: LanguageModel, hook_name: str, prompts: Sequence[Sequence[int]],
                     position: CaaPosition) -> Tensor:
    rows = []
    for ids in prompts:  # one forward per prompt: no padding to get right, and sets are small
        ordinary = [i for i, token in enumerate(ids) if token not in lm.special_token_ids]
        if not ordinary:
            raise ConfigError("a prompt of a steering vector has no ordinary token")
        acts = lm.run_to_hook(list(ids), hook_name)[0].float()
        rows.append(acts[-1] if position == "last" else acts[ordinary].mean(dim=0))
    return torch.stack(rows).mean(dim=0)


@torch.no_grad()
def aligned_features(vector: Tensor, sae: SAE, *, top_k: int = 10) -> list[tuple[int, float]]:
    """The SAE features whose decoder rows point most along ``vector``: (index, cosine), highest
    cosine first."""
    w_dec = sae.W_dec.float()
    v = vector.to(device=w_dec.device, dtype=torch.float32)
    cosine = (w_dec @ v) / (w_dec.norm(dim=-1) * v.norm()).clamp_min(1e-12)
    values, indices = cosine.topk(min(top_k, cosine.numel()))
    return [(int(i), float(c)) for i, c in zip(indices.cpu(), values.cpu(), strict=True)]
