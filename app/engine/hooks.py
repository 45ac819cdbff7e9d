"""TransformerLens hook names mapped, one adapter table per architecture, to Hugging Face modules.

A hook name `blocks.{L}.{kind}` names one activation of decoder layer L:

  hook_resid_pre   residual stream entering layer L (the input of decoder layer L)
  hook_attn_out    what the attention sublayer adds to the residual stream
  hook_mlp_out     what the MLP sublayer adds to the residual stream
  hook_resid_post  residual stream leaving layer L (the output of decoder layer L), so
                   resid_post = resid_pre + attn_out + mlp_out

Gemma 3 normalises each sublayer's output (post_attention_layernorm, post_feedforward_layernorm)
before adding it to the residual stream, so its attn_out / mlp_out sites are those norms' outputs;
in Llama they are the outputs of self_attn and mlp themselves.

A hook function receives the activation tensor [batch, pos, d_model] and returns None (observe)
or a tensor of the same shape that replaces the activation downstream (intervene). A positional
hook function also receives the PositionContext of the forward pass that runs it: which
positions its tokens hold and whether each is a prompt token or a generated one, so an
intervention can be scoped to the prompt, the generated tokens, or both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from app.errors import ConfigError

HookFn = Callable[[Tensor], Tensor | None]
Scope = Literal["all", "prompt", "generated"]
SCOPES: tuple[str, ...] = get_args(Scope)

HOOK_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
# Order of the sites inside one layer; the forward reaches them in this order.
_KIND_STAGE = {kind: i for i, kind in enumerate(HOOK_KINDS)}
_HOOK_RE = re.compile(r"blocks\.(\d+)\.(" + "|".join(HOOK_KINDS) + r")")


@dataclass(frozen=True)
class HookSite:
    """Where a hook kind lives: a submodule of the decoder layer ("" = the layer) and which side."""

    submodule: str
    side: Literal["input", "output"]


@dataclass(frozen=True)
class ArchitectureAdapter:
    name: str
    model_types: tuple[str, ...]  # config.model_type values served by this adapter
    # Candidate attribute paths of the decoder-layer list and of the final norm, tried in order
    # (text-only CausalLM first, then the multimodal wrapper's language model).
    layers_paths: tuple[str, ...]
    final_norm_paths: tuple[str, ...]
    # RMSNorm multiplies by (offset + weight): 0 for Llama, 1 for Gemma (weights stored around 0).
    norm_weight_offset: float
    sites: dict[str, HookSite]


ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": ArchitectureAdapter(
        name="llama",
        model_types=("llama",),
        layers_paths=("model.layers",),
        final_norm_paths=("model.norm",),
        norm_weight_offset=0.0,
        sites={
            "hook_resid_pre": HookSite("", "input"),
            "hook_attn_out": HookSite("self_attn", "output"),
            "hook_mlp_out": HookSite("mlp", "output"),
            "hook_resid_post": HookSite("", "output"),
        },
    ),
    "gemma3": ArchitectureAdapter(
        name="gemma3",
        model_types=("gemma3_text", "gemma3"),
        layers_paths=("model.layers", "model.language_model.layers"),
        final_norm_paths=("model.norm", "model.language_model.norm"),
        norm_weight_offset=1.0,
        sites={
            "hook_resid_pre": HookSite("", "input"),
            # The residual stream receives the *normalised* sublayer outputs.
            "hook_attn_out": HookSite("post_attention_layernorm", "output"),
            "hook_mlp_out": HookSite("post_feedforward_layernorm", "output"),
            "hook_resid_post": HookSite("", "output"),
        },
    ),
}


def architecture_for(model_type: str) -> ArchitectureAdapter:
    """The adapter for a Hugging Face config.model_type, or a ConfigError naming the supported."""
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS.values() for t in a.model_types)
    raise ConfigError(
        f"model type {model_type!r} has no hook adapter; supported model types: {supported}"
    )


@dataclass(frozen=True, order=True)
class HookPoint:
    """A parsed hook name; ordering follows the forward pass."""

    layer: int
    stage: int
    kind: str
    name: str


def hook_names(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in HOOK_KINDS]


def parse_hook_name(name: str, *, n_layers: int) -> HookPoint:
    match = _HOOK_RE.fullmatch(name.strip()) if isinstance(name, str) else None
    if match is None or int(match.group(1)) >= n_layers:
        raise ConfigError(
            f"unknown hook {name!r}; valid hooks are blocks.{{L}}.{{{'|'.join(HOOK_KINDS)}}} "
            f"with L in 0..{n_layers - 1}, e.g. blocks.{n_layers // 2}.hook_resid_post"
        )
    layer, kind = int(match.group(1)), match.group(2)
    return HookPoint(layer=layer, stage=_KIND_STAGE[kind], kind=kind, name=f"blocks.{layer}.{kind}")


@dataclass(frozen=True)
class PositionContext:
    """The tokens of one forward pass, as a positional hook sees them.

    Every stream of a batch holds its tokens at the same positions, so one row describes them
    all: ``positions`` [pos] are the absolute positions of this forward's tokens (0 is the first
    prompt token); those before ``prompt_len`` are prompt tokens, the rest were generated.
    ``step`` is 0 for a forward over the prompt (a plain forward, or the prefill of a cached
    generation) and k for the k-th decoding step after it.
    """

    positions: Tensor
    prompt_len: int
    step: int = 0

    @classmethod
    def prompt(cls, n_tokens: int, *, device: torch.device | str = "cpu") -> PositionContext:
        """A forward over a whole prompt of n_tokens (what every plain forward pass is)."""
        return cls(positions=torch.arange(n_tokens, device=device), prompt_len=n_tokens, step=0)

    @property
    def generated(self) -> Tensor:
        """[pos] bool: True where the token was generated, False for prompt tokens."""
        return self.positions >= self.prompt_len

    def mask(self, scope: Scope) -> Tensor:
        """[pos, 1] bool selecting the positions of a scope; broadcasts over [batch, pos, d]."""
        if scope == "all":
            selected = torch.ones_like(self.positions, dtype=torch.bool)
        elif scope == "prompt":
            selected = ~self.generated
        elif scope == "generated":
            selected = self.generated
        else:
            raise ConfigError(f"unknown position scope {scope!r}; scopes: {', '.join(SCOPES)}")
        return selected.unsqueeze(-1)


PositionalHookFn = Callable[[Tensor, PositionContext], Tensor | None]


def find_module(root: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    for path in paths:
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    raise ConfigError(
        f"{type(root).__name__} has none of the modules {', '.join(paths)}; "
        "is this the architecture the config says?"
    )


def site_module(
    layers: nn.ModuleList, adapter: ArchitectureAdapter, point: HookPoint
) -> tuple[nn.Module, HookSite]:
    site = adapter.sites[point.kind]
    layer = layers[point.layer]
    return (layer.get_submodule(site.submodule) if site.submodule else layer), site


def attach(module: nn.Module, site: HookSite, fn: HookFn) -> RemovableHandle:
    """Register fn at a site; a tensor it returns replaces the activation downstream."""
    if site.side == "input":

        def pre_hook(_module, args, kwargs):
            # Decoder layers take hidden_states positionally in current transformers; keyword
            # calls are handled too so a version change cannot silently bypass the hook.
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def forward_hook(_module, _args, output):
        # Attention returns (output, weights); layers and MLPs return the tensor itself
        # (older transformers returned a tuple from decoder layers as well).
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return module.register_forward_hook(forward_hook)
