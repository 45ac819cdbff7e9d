"""The language model: TransformerLens-named hook points over a Hugging Face causal LM, forward
passes to a hook, to the logits or one cached step at a time, and its tokenizer. Loading one
lives in app/engine/loading.py; the decoding loop in app/engine/generate.py.

Hook names follow TransformerLens (see app/engine/hooks.py). `blocks.{L}.hook_resid_post` of the
last layer is the residual stream *before* the final norm, as in TransformerLens; Hugging Face's
`output_hidden_states` returns it *after* the final norm, so hidden_states[-1] equals
final_norm(resid_post of the last layer), while hidden_states[L + 1] equals resid_post L for
every other layer and hidden_states[L] equals resid_pre L for every layer.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from app.engine import hooks as hk
from app.engine.few_rows import use_few_rows_linears
from app.errors import ConfigError

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedTokenizerBase

TokenIds = Tensor | Sequence[int] | Sequence[Sequence[int]]


class _StopForward(Exception):
    """Raised from a capture hook once every requested activation is in hand."""


@dataclass
class HookResume:
    """A forward pass captured at one hook, so ``LanguageModel.run_from_hook`` can finish it from
    there with another activation (see ``LanguageModel.logits_and_resume``)."""

    point: hk.HookPoint
    activation: Tensor  # [batch, pos, d_model] the activation the forward had at the hook
    start_layer: int  # first decoder layer run again
    layer_input: Tensor | None  # residual entering start_layer (sites inside that layer)
    layer_calls: list[tuple[tuple, dict]]  # per layer from start_layer: (args, kwargs) but hidden


class LanguageModel:
    """A causal LM with TransformerLens-named hook points over a Hugging Face model."""

    def __init__(
        self,
        *,
        model_id: str,
        source: str,
        hf_model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        has_chat_template: bool | None = None,
    ) -> None:
        self.model_id = model_id
        self.source = source
        self.hf_model = hf_model.eval()
        # Decoding steps multiply one row per stream: see few_rows.py.
        use_few_rows_linears(hf_model)
        self.tokenizer = tokenizer
        config = hf_model.config
        text_config = getattr(config, "text_config", None) or config
        self.adapter = hk.architecture_for(config.model_type)
        self.architecture = self.adapter.name
        self._layers = hk.find_module(hf_model, self.adapter.layers_paths)
        self._final_norm = hk.find_module(hf_model, self.adapter.final_norm_paths)
        # Running the base model (embeddings + layers + final norm) never touches lm_head.
        self._base = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else hf_model.model
        self.d_model = int(text_config.hidden_size)
        self.n_layers = len(self._layers)
        self.vocab_size = int(hf_model.get_output_embeddings().weight.shape[0])
        bos = tokenizer.bos_token_id
        self.bos_token_id = int(bos if bos is not None else text_config.bos_token_id)
        self.special_token_ids = _special_ids(tokenizer) | {self.bos_token_id}
        self.eos_token_ids = _eos_ids(tokenizer, hf_model)
        # Positions the model was trained for (0: unknown); a generation may not run past it.
        self.n_ctx = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        if has_chat_template is None:
            has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.has_chat_template = has_chat_template
        self._token_strings: list[str] | None = None
        # Where the forward running now sits in its sequences (set by cached_logits); positional
        # hooks read it, and a plain forward leaves it None (a whole prompt from position 0).
        self._positions: hk.PositionContext | None = None
        # transformers renamed forward's `past_key_values` to `cache`; pass whichever it takes.
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def __repr__(self) -> str:
        return (
            f"LanguageModel({self.model_id!r}, {self.architecture}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, vocab={self.vocab_size})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The forward's dtype (``load_model(dtype=...)``); hooks see activations in it."""
        return next(self.hf_model.parameters()).dtype

    # ----- hook points -----------------------------------------------------------------------

    def hook_names(self) -> list[str]:
        return hk.hook_names(self.n_layers)

    def hook_point(self, name: str) -> hk.HookPoint:
        """Parse and validate a hook name (ConfigError listing the valid ones)."""
        return hk.parse_hook_name(name, n_layers=self.n_layers)

    @contextlib.contextmanager
    def hooks(
        self, fns: Mapping[str, hk.HookFn] | Mapping[str, hk.PositionalHookFn], *,
        positional: bool = False,
    ) -> Iterator[None]:
        """Attach hook functions by name for the duration of the block; always removed.

        fn(activation) returning None observes; returning a tensor replaces the activation, so
        the same mechanism serves capture and interventions. Hooks on the same site run in the
        order attached (an outer `hooks` block's functions run before an inner block's).

        With ``positional=True`` each function is called as fn(activation, positions), with the
        ``hk.PositionContext`` of the forward that runs it: a cached generation step says which
        positions it runs and that they were generated; any other forward is a whole prompt.
        """
        if positional:
            fns = {name: self._with_positions(fn) for name, fn in fns.items()}
        points = [(self.hook_point(name), fn) for name, fn in fns.items()]
        handles = []
        try:
            for point, fn in points:
                module, site = hk.site_module(self._layers, self.adapter, point)
                handles.append(hk.attach(module, site, fn))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _with_positions(self, fn: hk.PositionalHookFn) -> hk.HookFn:
        def bound(t: Tensor) -> Tensor | None:
            positions = self._positions
            if positions is None:
                positions = hk.PositionContext.prompt(t.shape[1], device=t.device)
            return fn(t, positions)

        return bound

    # ----- forward passes --------------------------------------------------------------------

    def run_to_hook(
        self, ids: TokenIds, hook_name: str, *, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Activations at one hook point, [batch, pos, d_model]; stops right after that site."""
        return self.run_to_hooks(ids, [hook_name], attention_mask=attention_mask)[hook_name]

    def run_to_hooks(
        self, ids: TokenIds, names: Sequence[str], *, attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Activations at several hook points in one forward that stops after the deepest one.

        Active hooks from `hooks()` apply (interventions upstream change what is captured).
        """
        points = sorted({self.hook_point(name) for name in names})
        if not points:
            return {}
        captured: dict[str, Tensor] = {}

        def capture(point: hk.HookPoint):
            def fn(t: Tensor) -> None:
                captured[point.name] = t.detach()
                if len(captured) == len(points):
                    # Everything requested is captured: skip the rest of the network.
                    raise _StopForward

            return fn

        input_ids = self._as_ids(ids)
        mask = None if attention_mask is None else attention_mask.to(input_ids.device)
        hooks = self.hooks({p.name: capture(p) for p in points})
        with hooks, torch.no_grad(), contextlib.suppress(_StopForward):
            self._base(input_ids=input_ids, attention_mask=mask, use_cache=False)
        # Return under the caller's spelling of each name (e.g. with surrounding spaces).
        canonical = {name: self.hook_point(name).name for name in names}
        return {name: captured[canonical[name]] for name in names}

    def logits(self, ids: TokenIds, *, attention_mask: Tensor | None = None) -> Tensor:
        """Full forward to the vocabulary, [batch, pos, vocab]; honours active hooks."""
        input_ids = self._as_ids(ids)
        mask = None if attention_mask is None else attention_mask.to(input_ids.device)
        with torch.no_grad():
            out = self.hf_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        return out.logits

    def new_cache(self) -> Cache:
        """An empty KV cache for ``cached_logits``, laid out for this model's attention layers
        (sliding-window layers keep only their window)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.hf_model.config)

    def cached_logits(
        self, ids: TokenIds, *, cache: Cache, positions: hk.PositionContext
    ) -> Tensor:
        """Logits [batch, vocab] after the last of ``ids``, running only ``ids`` on top of
        ``cache``, which holds the keys and values of every earlier position and grows by them.

        ``positions`` says where ids sit in their sequences (positions.positions [pos] must be
        the cache's length onwards); positional hooks receive it. Honours active hooks.
        """
        input_ids = self._as_ids(ids)
        where = positions.positions.to(input_ids.device)
        if where.shape != (input_ids.shape[1],):
            raise ValueError(f"positions {tuple(where.shape)} for token ids "
                             f"{tuple(input_ids.shape)}")
        previous, self._positions = self._positions, positions
        try:
            with torch.no_grad():
                out = self.hf_model(
                    input_ids=input_ids,
                    position_ids=where.unsqueeze(0).expand(input_ids.shape[0], -1),
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kwarg: cache},
                )
        finally:
            self._positions = previous
        return out.logits[:, -1]

    def logits_and_resume(
        self, ids: TokenIds, hook_name: str, *, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, HookResume]:
        """Full forward to the vocabulary (honours active hooks), plus what ``run_from_hook``
        needs to redo the rest of it from the hook with another activation there.

        Captured on the way: the activation at the hook, the residual stream entering the first
        layer to re-run, and the arguments the model passes to that layer and every later one
        (attention masks, sliding-window masks, rotary embeddings, position ids), by reference,
        exactly as the model built them for this input.
        """
        point = self.hook_point(hook_name)
        start = point.layer + 1 if point.kind == "hook_resid_post" else point.layer
        calls: list[tuple[tuple, dict]] = []
        captured: dict[str, Tensor] = {}

        def record_call(_module, args, kwargs):
            if not calls and start == point.layer:
                captured["input"] = args[0] if args else kwargs["hidden_states"]
            rest = args[1:] if args else ()
            calls.append((rest, {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        def capture(t: Tensor) -> None:
            captured["activation"] = t.detach()

        handles = [layer.register_forward_pre_hook(record_call, with_kwargs=True)
                   for layer in self._layers[start:]]
        try:
            with self.hooks({point.name: capture}):
                logits = self.logits(ids, attention_mask=attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        resume = HookResume(point=point, activation=captured["activation"], start_layer=start,
                            layer_input=captured.get("input"), layer_calls=calls)
        return logits, resume

    def run_from_hook(self, resume: HookResume, activation: Tensor) -> Tensor:
        """Logits [batch, pos, vocab] of the forward ``resume`` came from, with the activation at
        its hook replaced by ``activation``; runs only the layers after the hook.

        For ``hook_resid_post`` of layer L the layers L+1.. run on ``activation``; for a site
        inside layer L (resid_pre, attn_out, mlp_out) layer L runs again from its captured input
        with ``activation`` put in at the site. Active hooks at sites that run honour as usual;
        sites before the restart do not run (their effect is in the captured tensors).
        """
        point = resume.point
        if activation.shape != resume.activation.shape:
            raise ValueError(f"activation {tuple(activation.shape)} for a hook activation of "
                             f"{tuple(resume.activation.shape)}")
        if point.kind == "hook_resid_post":
            hidden, fns = activation, {}
        else:
            hidden, fns = resume.layer_input, {point.name: lambda _t: activation}
        layers = self._layers[resume.start_layer:]
        with self.hooks(fns), torch.no_grad():
            for layer, (args, kwargs) in zip(layers, resume.layer_calls, strict=True):
                hidden = layer(hidden, *args, **kwargs)
                if isinstance(hidden, tuple):  # older transformers returned (hidden, ...)
                    hidden = hidden[0]
            logits = self.hf_model.get_output_embeddings()(self._final_norm(hidden))
            # The CausalLM heads of Gemma 2/3 soft-cap logits after lm_head when configured.
            config = self.hf_model.config
            cap = getattr(getattr(config, "text_config", None) or config,
                          "final_logit_softcapping", None)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
        return logits

    def unembedding(self) -> tuple[Tensor, Tensor]:
        """(W_U [d_model, vocab], final norm scale [d_model]).

        logits = (rms_normalised(resid) * scale) @ W_U (before any logit soft-capping); for
        Gemma the scale is 1 + weight, since its RMSNorm stores weights around zero.
        """
        w_u = self.hf_model.get_output_embeddings().weight.detach().T
        scale = self._final_norm.weight.detach() + self.adapter.norm_weight_offset
        return w_u, scale

    def final_norm(self, resid: Tensor) -> Tensor:
        """Apply the model's final norm (what hidden_states[-1] holds for the last layer)."""
        with torch.no_grad():
            return self._final_norm(resid)

    # ----- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, prepend_bos: bool = True) -> list[int]:
        """Token ids of text; BOS is prepended here, whatever the tokenizer does by itself."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return [self.bos_token_id, *ids] if prepend_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_strings(self) -> list[str]:
        """Display string of every token id in 0..vocab_size-1 (leading spaces kept).

        decode([id]) gives readable text (" the", "\\n") where the raw vocabulary shows
        byte-level symbols ("Ġthe"); ids beyond the tokenizer (padding rows of the embedding)
        show as <id>.
        """
        if self._token_strings is None:
            n_tok = len(self.tokenizer)
            known = min(n_tok, self.vocab_size)
            strings = self.tokenizer.batch_decode(
                [[i] for i in range(known)],
                skip_special_tokens=False,
                clean_up_tokenization_spaces=False,
            )
            strings += [f"<{i}>" for i in range(known, self.vocab_size)]
            self._token_strings = strings
        return self._token_strings

    def _as_ids(self, ids: TokenIds) -> Tensor:
        t = ids if isinstance(ids, Tensor) else torch.tensor(ids)
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2:
            raise ConfigError(f"token ids must be [batch, pos] or [pos], not {tuple(t.shape)}")
        return t.to(device=self.device, dtype=torch.long)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return frozenset(int(i) for i in ids)


def _eos_ids(tokenizer: PreTrainedTokenizerBase, hf_model: torch.nn.Module) -> frozenset[int]:
    """Every id the tokenizer, the config or the generation config calls end-of-sequence."""
    config = hf_model.config
    text_config = getattr(config, "text_config", None) or config
    generation = getattr(hf_model, "generation_config", None)
    found: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(text_config, "eos_token_id", None),
                  getattr(generation, "eos_token_id", None)):
        if value is None:
            continue
        found.update(int(v) for v in (value if isinstance(value, list | tuple) else [value]))
    return frozenset(found)
