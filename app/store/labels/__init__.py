"""Labels: several authors per feature, versioned writes with an append-only history, the shown
label rule, full-text search, the labeling queue, import and export.

Modules: edits (what a write carries, its checks), reads, writes, search, queue, transfer, scores
(automatic drafts with their scores, scores of any label), summary (an SAE's automatic
descriptions in numbers).
"""

from app.store.labels.edits import (
    MAX_DESCRIPTION,
    MAX_NOTES,
    MAX_TAGS,
    TAG_PATTERN,
    LabelEdit,
    clean_edit,
    normalize_tags,
)
from app.store.labels.queue import (
    DRAFT_ORDERS,
    QUEUE_ORDERS,
    QueueMode,
    QueueOrder,
    next_feature,
    skip_feature,
)
from app.store.labels.reads import (
    count_labeled,
    feature_history,
    feature_labels,
    label_by_id,
    label_info,
    labels_of,
    may_be_shown,
    own_label,
    pick_shown,
    progress,
    shown_label_id,
    shown_labels,
)
from app.store.labels.scores import (
    AUTOMATIC_PREFIX,
    SavedExplanation,
    ScoreRecord,
    automatic_author,
    draft_scores,
    explained_features,
    save_explanation,
    save_scores,
    score_is_current,
    scores_of,
)
from app.store.labels.search import search_labels
from app.store.labels.summary import autointerp_summary
from app.store.labels.transfer import (
    FORMATS,
    export_records,
    export_text,
    import_records,
    parse,
    to_csv,
    to_jsonl,
    to_neuronpedia,
)
from app.store.labels.writes import create_label, review_label, update_label, withdraw_label

__all__ = [
    "AUTOMATIC_PREFIX", "DRAFT_ORDERS", "FORMATS", "SavedExplanation", "ScoreRecord",
    "autointerp_summary", "automatic_author", "draft_scores", "explained_features",
    "save_explanation", "save_scores", "score_is_current", "scores_of",
    "MAX_DESCRIPTION", "MAX_NOTES", "MAX_TAGS", "QUEUE_ORDERS", "TAG_PATTERN",
    "LabelEdit", "QueueMode", "QueueOrder", "clean_edit", "count_labeled", "create_label",
    "export_records", "export_text", "feature_history", "feature_labels", "import_records",
    "label_by_id",
    "label_info", "labels_of", "may_be_shown", "next_feature", "normalize_tags", "own_label",
    "parse", "pick_shown", "progress", "review_label", "search_labels", "shown_label_id",
    "shown_labels", "skip_feature", "to_csv", "to_jsonl", "to_neuronpedia", "update_label",
    "withdraw_label",
]
