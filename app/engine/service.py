"""The model side of the server: one language model and its SAEs, answering plain-Python calls.

The API never imports torch; it holds this object (built in the app's lifespan, on the model
worker thread) through the `ModelService` protocol and calls its methods through the bounded
model queue. Every method takes and returns plain Python (lists, dicts, floats). What to load
comes in as plain `SAESpec` records: the app reads them from the store, the engine never does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine import chat, steered_generation, steering
from app.engine.lm import LanguageModel
from app.engine.loading import load_model
from app.engine.presets import find_preset
from app.engine.sae import SAE
from app.errors import ConfigError, ConflictError, NotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAESpec:
    """One SAE the database lists: where its weights are and which model it reads."""

    sae_id: str
    model_id: str
    hook_name: str
    path: str
    model_source: str | None = None  # the stored model's source (a path for local models)


@dataclass
class LoadedSAE:
    sae_id: str
    hook_name: str
    sae: SAE


def model_spec(model_id: str, source: str | None) -> str:
    """What load_model needs to load a stored model: presets by name (their stored source is a
    description), local files and folders by the path they were loaded from."""
    if find_preset(model_id) is not None or not source:
        return model_id
    return source


class EngineService:
    def __init__(self, lm: LanguageModel, saes: dict[str, LoadedSAE],
                 skipped: dict[str, str] | None = None) -> None:
        self.lm = lm
        self.saes = saes
        self.skipped = skipped or {}  # sae_id -> why it was not loaded

    @property
    def model_id(self) -> str:
        return self.lm.model_id

    @classmethod
    def load(cls, *, saes: Sequence[SAESpec], model: str = "", device: str = "cpu",
             dtype: str = "float32", cache_dir: Path) -> EngineService:
        """Load `model` (empty: the model of the first SAE in `saes`, which the app orders with
        precomputed SAEs first) and every SAE of that model from its folder; ``cache_dir`` holds
        the dequantized model cache (see app/engine/loading.py). ``device`` and ``dtype`` as
        ``--device`` / ``--dtype`` (app/engine/devices.py); the SAEs stay float32."""
        from app.engine.devices import resolve_device, resolve_dtype

        torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
        if not model:
            if not saes:
                raise ConfigError(
                    "the database lists no SAE, so no model to load; build one with "
                    "`saescope build` (or set SAESCOPE_MODEL)"
                )
            model = model_spec(saes[0].model_id, saes[0].model_source)
        lm = load_model(model, device=torch_device, dtype=torch_dtype, cache_dir=cache_dir)
        loaded: dict[str, LoadedSAE] = {}
        skipped: dict[str, str] = {}
        for spec in saes:
            if spec.model_id != lm.model_id:
                skipped[spec.sae_id] = f"it belongs to model {spec.model_id!r}; the server " \
                                       f"loaded {lm.model_id!r} (SAESCOPE_MODEL)"
                continue
            if not Path(spec.path).exists():
                skipped[spec.sae_id] = f"its folder {spec.path} does not exist"
                continue
            try:
                sae = SAE.load(spec.path, device=torch_device, hook_name=spec.hook_name)
                sae.check_compatible(d_model=lm.d_model, hook_name=spec.hook_name)
            except Exception as exc:  # noqa: BLE001 - one bad SAE must not stop the others
                skipped[spec.sae_id] = f"loading {spec.path} failed: {exc}"
                continue
            loaded[spec.sae_id] = LoadedSAE(sae_id=spec.sae_id, hook_name=spec.hook_name,
                                            sae=sae.eval().store_encoder_transposed())
        for sae_id, why in skipped.items():
            log.warning("SAE %s is not available for text search: %s", sae_id, why)
        service = cls(lm, loaded, skipped)
        service.warm_up()
        return service

    def warm_up(self) -> None:
        """One short search per SAE, so the first user does not pay for the vocabulary's display
        strings, the tokenizer's and torch's first-call setup, or cold weight pages."""
        text = "Hello, world."
        for sae_id in list(self.saes):
            try:
                self.search(sae_id=sae_id, ids=self.tokenize(sae_id=sae_id, text=text), top_k=5,
                            n_features=20)
            except Exception as exc:  # noqa: BLE001 - it would fail for users too; keep the rest
                self.skipped[sae_id] = f"a test search failed: {exc}"
                del self.saes[sae_id]
                log.warning("SAE %s is not available for text search: %s", sae_id,
                            self.skipped[sae_id])

    def _get(self, sae_id: str) -> LoadedSAE:
        loaded = self.saes.get(sae_id)
        if loaded is not None:
            return loaded
        why = self.skipped.get(sae_id, "it is not in the database")
        raise NotFoundError(f"SAE {sae_id!r} is not loaded in this server: {why}")

    def tokenize(self, *, sae_id: str, text: str) -> list[int]:
        """Token ids as the SAE saw its training data (BOS first when its cfg says so)."""
        loaded = self._get(sae_id)
        return self.lm.tokenize(text, prepend_bos=bool(loaded.sae.cfg.prepend_bos))

    @torch.inference_mode()
    def _encode_sparse(self, loaded: LoadedSAE, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``SAE.encode_sparse`` of the text's hook activations, as numpy (values, indices)."""
        acts = self.lm.run_to_hook(ids, loaded.hook_name)[0].float()  # float32 into the SAE
        values, indices = loaded.sae.encode_sparse(acts)
        return values.float().cpu().numpy(), indices.cpu().numpy()

    def _tokens(self, ids: list[int]) -> tuple[list[str], list[bool]]:
        strings = self.lm.token_strings()
        special = self.lm.special_token_ids
        return [strings[i] if 0 <= i < len(strings) else f"<{i}>" for i in ids], [
            i in special for i in ids
        ]

    def search(self, *, sae_id: str, ids: list[int], top_k: int, n_features: int) -> dict[str, Any]:
        """Per token: the top_k features by activation (> 0). Over the text: the n_features with
        the highest max over ordinary (non-special) tokens, with their sum and firing count."""
        loaded = self._get(sae_id)
        tokens, special = self._tokens(ids)
        if not ids:
            return {"tokens": [], "token_ids": [], "special": [], "per_token": [],
                    "top_features": []}
        values, indices = self._encode_sparse(loaded, ids)
        per_token = [
            [{"index": i, "value": v} for v, i in zip(vs, is_, strict=True) if v > 0]
            for vs, is_ in zip(values[:, :top_k].tolist(), indices[:, :top_k].tolist(),
                               strict=True)
        ]
        return {"tokens": tokens, "token_ids": list(ids), "special": special,
                "per_token": per_token,
                "top_features": _top_over_text(values, indices, special, n_features)}

    def feature_activations(self, *, sae_id: str, ids: list[int], index: int) -> dict[str, Any]:
        loaded = self._get(sae_id)
        d_sae = loaded.sae.cfg.d_sae
        if not 0 <= index < d_sae:
            raise NotFoundError(f"SAE {sae_id!r} has features 0..{d_sae - 1}; no feature {index}")
        tokens, special = self._tokens(ids)
        values: list[float] = []
        if ids:
            codes, latents = self._encode_sparse(loaded, ids)
            # Every firing latent of a position is in its row: absent means 0.
            values = np.where(latents == index, codes, 0.0).sum(axis=1).tolist()
        return {"tokens": tokens, "token_ids": list(ids), "special": special, "values": values}

    # ----- steering ---------------------------------------------------------------------------
    # Generators: each item is one model forward, so the worker (ModelWorker.stream) interleaves
    # them with other jobs and stops them between steps. All work, checks included, happens on
    # the model thread once the worker takes the first step.

    def prompt_ids(self, *, sae_id: str, prompt: str, chat_template: bool,
                   max_tokens: int) -> list[int]:
        """The prompt's token ids: the model's chat template around it as a user turn, or the
        text as the SAE's training data was tokenized (BOS first when its cfg says so)."""
        if chat_template:
            if not self.lm.has_chat_template:  # a fine request this model cannot serve
                raise ConflictError(f"model {self.model_id} has no chat template; "
                                    "set chat_template to false")
            text = self.lm.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                tokenize=False)
            ids = self.lm.tokenize(str(text), prepend_bos=False)
        else:
            ids = self.tokenize(sae_id=sae_id, text=prompt)
        if not ids:
            raise ConfigError("the prompt is empty; write a few words")
        if len(ids) > max_tokens:
            raise ConfigError(f"the prompt is {len(ids)} tokens; the limit is {max_tokens} "
                              "(SAESCOPE_MAX_TEXT_TOKENS): shorten it")
        return ids

    def _edits(self, *, sae_id: str, features: Sequence[Mapping[str, Any]],
               vectors: Sequence[Mapping[str, Any]]) -> list[steering.Edit]:
        edits: list[steering.Edit] = []
        for feature in features:
            loaded = self._get(feature.get("sae_id") or sae_id)
            edits.append(steering.FeatureEdit(
                sae=loaded.sae, hook_name=loaded.hook_name, index=int(feature["index"]),
                mode=feature["mode"], value=float(feature.get("value", 0.0))))
        for vector in vectors:
            self.lm.hook_point(vector["hook_name"])
            values = torch.tensor(vector["vector"], dtype=torch.float32, device=self.lm.device)
            if values.shape != (self.lm.d_model,):
                raise ConfigError(f"vector {vector.get('name', '')!r} has {values.numel()} values; "
                                  f"the model's width is {self.lm.d_model}")
            edits.append(steering.VectorEdit(hook_name=vector["hook_name"], vector=values,
                                             value=float(vector.get("value", 1.0))))
        return edits

    @torch.inference_mode()
    def steer_stream(
        self, *, sae_id: str, prompt: str, features: Sequence[Mapping[str, Any]] = (),
        vectors: Sequence[Mapping[str, Any]] = (), scope: str = "all", max_new_tokens: int = 64,
        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat_template: bool = False,
        max_prompt_tokens: int = 1024, deadline: float | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Default and steered continuations side by side, one forward per item: lists of
        ``token`` events ({which, index, text}), the last one ending with ``done`` (per stream:
        text, tokens, token_ids, n_tokens, stop_reason). ``features``: [{index, mode, value,
        sae_id?}]; ``vectors``: [{hook_name, vector, value}]; ``deadline``: time.monotonic()
        after which the streams stop (stop_reason "time_limit")."""
        edits = self._edits(sae_id=sae_id, features=features, vectors=vectors)
        ids = self.prompt_ids(sae_id=sae_id, prompt=prompt, chat_template=chat_template,
                              max_tokens=max_prompt_tokens)
        yield from steered_generation.side_by_side(
            self.lm, ids=ids, steering_edits=edits, scope=scope,  # type: ignore[arg-type]
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            deadline=deadline)

    @torch.inference_mode()
    def steer_sweep(
        self, *, sae_id: str, prompt: str, index: int, mode: str, values: Sequence[float],
        scope: str = "all", max_new_tokens: int = 32, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, chat_template: bool = False,
        max_prompt_tokens: int = 1024, deadline: float | None = None,
    ) -> Iterator[dict[str, Any] | None]:
        """One feature at several strengths: None per forward, then {default, cells: [{value,
        text, tokens, token_ids, stop_reason, realised, coherence}]}."""
        loaded = self._get(sae_id)

        def edit(value: float) -> steering.FeatureEdit:
            return steering.FeatureEdit(sae=loaded.sae, hook_name=loaded.hook_name, index=index,
                                        mode=mode, value=value)  # type: ignore[arg-type]

        for value in values:
            edit(value)  # every value checked before any forward
        ids = self.prompt_ids(sae_id=sae_id, prompt=prompt, chat_template=chat_template,
                              max_tokens=max_prompt_tokens)
        yield from steered_generation.sweep(
            self.lm, ids=ids, edit=edit, values=list(values), probe_hook=loaded.hook_name,
            scope=scope, max_new_tokens=max_new_tokens,  # type: ignore[arg-type]
            temperature=temperature, top_p=top_p, seed=seed, deadline=deadline)

    @torch.inference_mode()
    def caa_vector(self, *, sae_id: str, positive: Sequence[str], negative: Sequence[str],
                   position: str = "last", top_k: int = 10) -> dict[str, Any]:
        """A contrastive steering vector at the SAE's hook from two sets of prompts, with the
        SAE's features most aligned with it: {hook_name, vector, norm, aligned: [{index,
        cosine}]}."""
        loaded = self._get(sae_id)
        tokenized = [[self.tokenize(sae_id=sae_id, text=t) for t in texts]
                     for texts in (positive, negative)]
        vector = steering.caa_vector(self.lm, hook_name=loaded.hook_name,
                                     positive=tokenized[0], negative=tokenized[1],
                                     position=position)  # type: ignore[arg-type]
        aligned = steering.aligned_features(vector, loaded.sae, top_k=top_k)
        return {"hook_name": loaded.hook_name, "vector": vector.cpu().tolist(),
                "norm": float(vector.norm()),
                "aligned": [{"index": i, "cosine": c} for i, c in aligned]}

    # ----- chat ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def chat_stream(
        self, *, messages: Sequence[Mapping[str, str]], max_tokens: int,
        temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
        max_prompt_tokens: int = 4096, deadline: float | None = None, reply_start: str = "",
    ) -> Iterator[dict[str, Any]]:
        """The model's reply to chat messages ({role, content}), one forward per item: {text,
        finish_reason (None until the last item: "stop" or "length"), prompt_tokens,
        completion_tokens} (see app/engine/chat.py; ``reply_start`` as chat_steps')."""
        limit, why = max_prompt_tokens, "SAESCOPE_CHAT_MAX_PROMPT_TOKENS"
        if self.lm.n_ctx and self.lm.n_ctx - 1 < limit:
            limit, why = self.lm.n_ctx - 1, f"{self.model_id}'s context less one"
        yield from chat.chat_steps(
            self.lm, messages, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed, stop=stop, max_prompt_tokens=limit, limit_name=why, deadline=deadline,
            reply_start=reply_start)


def _top_over_text(
    values: np.ndarray, indices: np.ndarray, special: list[bool], n_features: int
) -> list[dict[str, Any]]:
    """The n_features latents with the highest max over ordinary positions, from the sparse
    codes: each with its max, the first position holding it, its sum and its firing count."""
    pos = np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)
    keep = (values > 0) & ~np.asarray(special, dtype=bool)[:, None]
    vals, feats, pos = values[keep], indices[keep], pos[keep]
    if not len(vals):
        return []
    uniq, group = np.unique(feats, return_inverse=True)
    # Within each latent: largest value first, earliest position among equal values.
    order = np.lexsort((pos, -vals, group))
    first = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    best_val, best_pos = vals[order][first], pos[order][first]
    sums = np.bincount(group, weights=vals, minlength=len(uniq))
    counts = np.bincount(group, minlength=len(uniq))
    top = np.argsort(-best_val, kind="stable")[:n_features]  # ties: lower index first
    return [
        {"index": f, "max_value": v, "max_token_index": p, "sum_value": s, "n_tokens": c}
        for f, v, p, s, c in zip(uniq[top].tolist(), best_val[top].tolist(),
                                 best_pos[top].tolist(), sums[top].tolist(),
                                 counts[top].tolist(), strict=True)
    ]
