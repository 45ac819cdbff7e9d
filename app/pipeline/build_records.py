"""A build's finalized statistics and static features as store records (``app.records``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.pipeline.accumulators import FeatureStatsResult
from app.pipeline.build_options import BuildOptions
from app.pipeline.corpus import TokenizedCorpus
from app.records import (
    FeatureArrays,
    ModelRecord,
    RunRecord,
    SAERecord,
    SequenceArrays,
    WindowArrays,
    document_starts,
)

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel
    from app.engine.sae import SAE
    from app.pipeline.static_features import StaticResult


@dataclass
class PrecomputeRecords:
    """All records of one run, ready for ``write_run``."""

    model: ModelRecord
    sae: SAERecord
    run: RunRecord
    sequences: SequenceArrays
    features: FeatureArrays
    windows: WindowArrays

    def as_kwargs(self) -> dict[str, Any]:
        return {"model": self.model, "sae": self.sae, "run": self.run,
                "sequences": self.sequences, "features": self.features,
                "windows": self.windows}


def make_records(*, lm: LanguageModel, sae: SAE, hook: str, sae_id: str, sae_path: Path | str,
                 corpus: TokenizedCorpus, stats: FeatureStatsResult, static: StaticResult,
                 train_metrics: dict[str, Any] | None, config: dict[str, Any],
                 opts: BuildOptions) -> PrecomputeRecords:
    """Turn finalized statistics and the static features (``StaticResult``) into store
    records."""
    effects = static.logits
    features = FeatureArrays(
        count=stats.count, act_sum=stats.act_sum, max_act=stats.max_act,
        frac_nonzero=stats.frac_nonzero, hist_edges=stats.hist_edges,
        hist_counts=stats.hist_counts, band_share=stats.band_share, band_count=stats.band_count,
        logit_pos_ids=effects.pos_ids, logit_pos_values=effects.pos_values,
        logit_neg_ids=effects.neg_ids, logit_neg_values=effects.neg_values,
        neighbour_idx=static.neighbour_idx, neighbour_cos=static.neighbour_cos)
    used = np.unique(stats.windows.seq_index)
    # Every document each kept sequence holds (packed sequences), so a window can say which.
    starts = None if corpus.doc_ids is None else document_starts(corpus.doc_ids[used])
    sequences = SequenceArrays(seq_index=used.astype(np.int64),
                               doc_index=corpus.doc_index[used].astype(np.int64),
                               tokens=corpus.tokens[used].astype(np.int32),
                               doc_names=list(corpus.doc_names), doc_starts=starts)
    model = ModelRecord(model_id=lm.model_id, source=str(lm.source),
                        architecture=lm.architecture, d_model=int(lm.d_model),
                        n_layers=int(lm.n_layers), vocab_size=int(lm.vocab_size),
                        token_strings=list(lm.token_strings()),
                        bos_token_id=lm.bos_token_id, has_chat_template=bool(lm.has_chat_template))
    cfg = _sae_cfg_dict(sae)
    sae_rec = SAERecord(model_id=lm.model_id, sae_id=sae_id, hook_name=hook,
                        architecture=str(sae.cfg.architecture), d_in=int(sae.cfg.d_in),
                        d_sae=int(sae.cfg.d_sae), path=str(Path(sae_path).resolve()), cfg=cfg,
                        train_metrics=train_metrics)
    run = RunRecord(corpus=str(opts.corpus), n_tokens=stats.n_tokens,
                    n_tokens_counted=stats.n_tokens_counted, context_size=corpus.context_size,
                    window_len=opts.window_len, n_top=opts.n_top, n_bands=opts.n_bands,
                    config=config, sae_stats=dict(stats.sae_stats))
    return PrecomputeRecords(model=model, sae=sae_rec, run=run, sequences=sequences,
                             features=features, windows=stats.windows)


def _sae_cfg_dict(sae: SAE) -> dict[str, Any]:
    try:
        cfg = asdict(sae.cfg)
    except TypeError:
        cfg = dict(vars(sae.cfg))
    return json.loads(json.dumps(cfg, default=str))
