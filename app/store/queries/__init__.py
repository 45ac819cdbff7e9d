"""Keyword-only reads for the API and pages: indexed SQL plus blob decoding, no model calls.

One module per resource: models (and their vocabularies), saes, runs (an SAE's live run),
feature_table (the feature list), feature_detail (one feature), labels, autointerp (what the
explainers read). The records they return
are defined in app/store/read_models.py and re-exported here, so callers write
`from app.store import queries` and `queries.get_feature(...)`.
"""

from app.store.queries.autointerp import (
    ExplainTargets,
    SAEWeights,
    alive_features,
    explain_targets,
    sae_weights,
    sequence_indices,
    sequence_tokens,
)
from app.store.queries.feature_detail import get_feature
from app.store.queries.feature_table import (
    MAX_ID,
    MAX_PAGE,
    MAX_PER_PAGE,
    SORT_COLUMNS,
    TOP_TOKENS_PER_FEATURE,
    FilterKey,
    SortKey,
    list_features,
    random_feature,
    token_ids_matching,
)
from app.store.queries.labels import get_labels
from app.store.queries.models import get_model_vocab, list_models
from app.store.queries.runs import dense_threshold
from app.store.queries.saes import get_sae, get_sae_brief, list_saes
from app.store.read_models import (
    DEFAULT_DENSE_THRESHOLD,
    Band,
    FeatureDetail,
    FeaturePage,
    FeatureRow,
    LabelInfo,
    ModelInfo,
    RunInfo,
    SAEBrief,
    SAEInfo,
    TokenValue,
    WindowInfo,
)

__all__ = [
    "DEFAULT_DENSE_THRESHOLD", "MAX_ID", "MAX_PAGE", "MAX_PER_PAGE", "SORT_COLUMNS",
    "TOP_TOKENS_PER_FEATURE",
    "Band", "FeatureDetail", "FeaturePage", "FeatureRow", "FilterKey", "LabelInfo", "ModelInfo",
    "ExplainTargets", "RunInfo", "SAEBrief", "SAEWeights", "alive_features", "explain_targets",
    "sae_weights", "sequence_indices", "sequence_tokens",
    "SAEInfo", "SortKey", "TokenValue", "WindowInfo",
    "dense_threshold", "get_feature", "get_labels", "get_model_vocab", "get_sae",
    "get_sae_brief", "list_features", "list_models", "list_saes", "random_feature",
    "token_ids_matching",
]
