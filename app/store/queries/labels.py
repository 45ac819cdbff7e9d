"""Label reads the feature pages need: the shown label of a set of features (the rule and every
other label read live in app/store/labels)."""

from __future__ import annotations

from app.store.labels.reads import label_info, labels_of, shown_labels

get_labels = shown_labels

__all__ = ["get_labels", "label_info", "labels_of"]
