"""What a label write carries (LabelEdit) and its checks; each error names the field."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from app.errors import ConfigError
from app.store.tables import AUTHOR_KINDS, LABEL_STATUSES

MAX_DESCRIPTION = 2000
MAX_NOTES = 5000
MAX_TAGS = 20
TAG_PATTERN = r"^[a-z0-9][a-z0-9_.:-]{0,63}$"
TAG_RULE = "1-64 characters from a-z, 0-9, '_', '.', ':' and '-', starting with a letter or digit"
_TAG_RE = re.compile(TAG_PATTERN)
MAX_AUTHOR = 64


@dataclass(frozen=True)
class LabelEdit:
    """The fields an author writes; `snapshot()` is what a revision's before/after stores."""

    description: str = ""
    tags: list[str] = field(default_factory=list)
    status: str = "draft"
    confidence: float | None = None
    notes: str = ""

    def snapshot(self) -> dict[str, Any]:
        return asdict(self)


def normalize_tags(tags: list[str]) -> list[str]:
    """Lowercase, inner spaces to dashes, deduplicated in order."""
    out: list[str] = []
    for raw in tags:
        if not isinstance(raw, str):
            raise ConfigError(f"tags: {raw!r} is not text")
        tag = "-".join(raw.strip().lower().split())
        if not tag:
            continue
        if not _TAG_RE.match(tag):
            raise ConfigError(f"tags: {raw[:80]!r}: use {TAG_RULE}")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise ConfigError(f"tags: at most {MAX_TAGS} tags, got {len(out)}")
    return out


def clean_edit(edit: LabelEdit) -> LabelEdit:
    """The edit with normalized tags, or ConfigError naming the first bad field."""
    if not isinstance(edit.description, str) or len(edit.description) > MAX_DESCRIPTION:
        raise ConfigError(f"description: at most {MAX_DESCRIPTION} characters")
    if not isinstance(edit.notes, str) or len(edit.notes) > MAX_NOTES:
        raise ConfigError(f"notes: at most {MAX_NOTES} characters")
    for name, text in (("description", edit.description), ("notes", edit.notes)):
        if "\x00" in text:
            # PostgreSQL text cannot hold NUL; refuse it on every backend alike.
            raise ConfigError(f"{name}: NUL characters are not allowed")
    if edit.status not in LABEL_STATUSES:
        raise ConfigError(f"status: {str(edit.status)[:40]!r} is not one of "
                          f"{', '.join(LABEL_STATUSES)}")
    confidence = edit.confidence
    if confidence is not None:
        if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
                or not 0.0 <= float(confidence) <= 1.0:
            raise ConfigError("confidence: a number from 0 to 1, or empty")
        confidence = float(confidence)
    return LabelEdit(description=edit.description, tags=normalize_tags(list(edit.tags or [])),
                     status=edit.status, confidence=confidence, notes=edit.notes)


def check_author(author: str, author_kind: str) -> None:
    if author_kind not in AUTHOR_KINDS:
        raise ConfigError(f"author_kind: use one of {', '.join(AUTHOR_KINDS)}")
    if not author or len(author) > MAX_AUTHOR or author != author.strip():
        raise ConfigError(f"author: 1-{MAX_AUTHOR} characters without surrounding spaces")
