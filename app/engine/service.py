"""The model side of the server: one language model and its SAEs, answering plain-Python calls.

The API never imports torch; it holds this object (built in the app's lifespan, on the model
worker thread) and calls its methods through the bounded model queue. Every method takes and
returns plain Python (lists, dicts, floats).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.engine.lm import LanguageModel, load_model
from app.engine.presets import find_preset
from app.engine.sae import SAE
from app.errors import ConfigError, NotFoundError
from app.store.tables import SAE as SAERow
from app.store.tables import Model as ModelRow

log = logging.getLogger(__name__)


@dataclass
class LoadedSAE:
    sae_id: str
    hook_name: str
    sae: SAE


def _model_spec(model_id: str, source: str | None) -> str:
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
    def load(cls, *, db_engine: Engine, model: str = "", device: str = "cpu") -> EngineService:
        """Load `model` (empty: the model of the first SAE with precomputed features) and every
        SAE of that model listed in the database, from the folders the saes table names."""
        with Session(db_engine) as session:
            rows = session.scalars(
                select(SAERow).order_by(SAERow.active_run_id.is_(None), SAERow.id)
            ).all()
            sources = dict(session.execute(select(ModelRow.id, ModelRow.source)).all())
            sae_rows = [(r.id, r.model_id, r.hook_name, r.path) for r in rows]
        if not model:
            if not sae_rows:
                raise ConfigError(
                    "the database lists no SAE, so no model to load; build one with "
                    "`saescope build` (or set SAESCOPE_MODEL)"
                )
            model = _model_spec(sae_rows[0][1], sources.get(sae_rows[0][1]))
        lm = load_model(model, device=device)
        saes: dict[str, LoadedSAE] = {}
        skipped: dict[str, str] = {}
        for sae_id, model_id, hook_name, path in sae_rows:
            if model_id != lm.model_id:
                skipped[sae_id] = f"it belongs to model {model_id!r}; the server loaded " \
                                  f"{lm.model_id!r} (SAESCOPE_MODEL)"
                continue
            if not Path(path).exists():
                skipped[sae_id] = f"its folder {path} does not exist"
                continue
            try:
                sae = SAE.load(path, device=device, hook_name=hook_name)
                sae.check_compatible(d_model=lm.d_model, hook_name=hook_name)
            except Exception as exc:  # noqa: BLE001 - one bad SAE must not stop the others
                skipped[sae_id] = f"loading {path} failed: {exc}"
                continue
            saes[sae_id] = LoadedSAE(sae_id=sae_id, hook_name=hook_name, sae=sae.eval())
        for sae_id, why in skipped.items():
            log.warning("SAE %s is not available for text search: %s", sae_id, why)
        return cls(lm, saes, skipped)

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
    def _encode(self, loaded: LoadedSAE, ids: list[int]) -> torch.Tensor:
        acts = self.lm.run_to_hook(ids, loaded.hook_name)[0]
        return loaded.sae.encode(acts.to(loaded.sae.dtype)).float()  # [pos, d_sae]

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
        feats = self._encode(loaded, ids)
        k = min(top_k, feats.shape[1])
        values, indices = feats.topk(k, dim=1)
        per_token = [
            [{"index": int(i), "value": float(v)} for v, i in zip(vs, is_, strict=True) if v > 0]
            for vs, is_ in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        ordinary = torch.tensor([not s for s in special])
        top_features: list[dict[str, Any]] = []
        if ordinary.any():
            body = feats[ordinary]
            positions = torch.nonzero(ordinary).squeeze(1)
            max_vals, argmax = body.max(dim=0)
            n = min(n_features, int((max_vals > 0).sum()))
            best_vals, best = max_vals.topk(n) if n else (max_vals[:0], argmax[:0])
            sums = body.sum(dim=0)
            counts = (body > 0).sum(dim=0)
            for v, f in zip(best_vals.tolist(), best.tolist(), strict=True):
                top_features.append({
                    "index": f, "max_value": v,
                    "max_token_index": int(positions[argmax[f]]),
                    "sum_value": float(sums[f]), "n_tokens": int(counts[f]),
                })
        return {"tokens": tokens, "token_ids": list(ids), "special": special,
                "per_token": per_token, "top_features": top_features}

    def feature_activations(self, *, sae_id: str, ids: list[int], index: int) -> dict[str, Any]:
        loaded = self._get(sae_id)
        d_sae = loaded.sae.cfg.d_sae
        if not 0 <= index < d_sae:
            raise NotFoundError(f"SAE {sae_id!r} has features 0..{d_sae - 1}; no feature {index}")
        tokens, special = self._tokens(ids)
        values = self._encode(loaded, ids)[:, index].tolist() if ids else []
        return {"tokens": tokens, "token_ids": list(ids), "special": special, "values": values}
