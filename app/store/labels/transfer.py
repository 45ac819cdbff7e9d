"""Import and export of labels with their history: JSON Lines, CSV, and Neuronpedia's
explanation shape (export only).

One record per label, withdrawn ones included (`withdrawn: true`, fields from before the
withdraw), each with its revisions, so export then import into an empty database is lossless.
Import checks every record first and writes all of them in one transaction, or none: the first
bad record is reported by its line number.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ConfigError
from app.store.db import write_session
from app.store.labels.edits import LabelEdit, check_author, clean_edit
from app.store.tables import Label, LabelRevision, LabelTag, as_utc

FORMATS = ("jsonl", "csv", "neuronpedia")
CSV_FIELDS = ["sae_id", "feature_index", "author", "author_kind", "description", "tags",
              "status", "confidence", "notes", "version", "reviewed_by", "created_at",
              "updated_at", "withdrawn", "revisions"]
_ACTIONS = ("create", "edit", "review", "withdraw", "import")


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def export_records(*, session: Session, sae_id: str | None = None) -> list[dict[str, Any]]:
    """Every label (withdrawn ones too) with its revisions, oldest label first."""
    label_t, rev_t = Label.__table__, LabelRevision.__table__
    rev_stmt = select(rev_t).order_by(rev_t.c.label_id, rev_t.c.version)
    label_stmt = select(label_t).order_by(label_t.c.id)
    if sae_id:
        rev_stmt = rev_stmt.where(rev_t.c.sae_id == sae_id)
        label_stmt = label_stmt.where(label_t.c.sae_id == sae_id)
    revisions: dict[int, list[Any]] = {}
    for r in session.execute(rev_stmt):
        revisions.setdefault(r.label_id, []).append(r)
    live = {r.id: r for r in session.execute(label_stmt)}
    records = []
    for label_id in sorted(set(live) | set(revisions)):
        revs = revisions.get(label_id, [])
        row = live.get(label_id)
        if row is not None:
            record = {
                "sae_id": row.sae_id, "feature_index": row.feature_index, "author": row.author,
                "author_kind": row.author_kind, "description": row.description,
                "tags": list(row.tags or []), "status": row.status,
                "confidence": row.confidence, "notes": row.notes, "version": row.version,
                "reviewed_by": row.reviewed_by, "created_at": _iso(row.created_at),
                "updated_at": _iso(row.updated_at), "withdrawn": False,
            }
        else:
            last = revs[-1]
            state = last.before or {}
            creator = next((r.actor for r in revs if r.action in ("create", "import")),
                           last.actor)
            record = {
                "sae_id": last.sae_id, "feature_index": last.feature_index, "author": creator,
                "author_kind": state.get("author_kind", "person"),
                "description": state.get("description", ""), "tags": state.get("tags", []),
                "status": state.get("status", "draft"), "confidence": state.get("confidence"),
                "notes": state.get("notes", ""), "version": last.version - 1,
                "reviewed_by": None, "created_at": _iso(revs[0].created_at),
                "updated_at": _iso(last.created_at), "withdrawn": True,
            }
        record["revisions"] = [
            {"version": r.version, "action": r.action, "actor": r.actor,
             "created_at": _iso(r.created_at), "before": r.before, "after": r.after}
            for r in revs
        ]
        records.append(record)
    return records


# Characters Python's str.splitlines() (and JavaScript, before ES2019) take as line ends, which
# json.dumps(ensure_ascii=False) leaves raw inside strings: escaped, so one record is one line
# for every reader.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def to_jsonl(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


# A spreadsheet runs a cell that starts with = + - @ (or a tab or carriage return before one) as
# a formula: `=HYPERLINK(...)` in a label would run when the export is opened. Such text cells
# are written with a leading apostrophe (OWASP's advice), and so are cells that already start
# with apostrophes followed by one of those, so import can take exactly one apostrophe off and
# get the text back unchanged.
_FORMULA_START = re.compile(r"^'*[=+\-@\t\r]")
_TEXT_FIELDS = ("sae_id", "author", "author_kind", "description", "status", "notes",
                "reviewed_by")


def _cell(text: str) -> str:
    return "'" + text if _FORMULA_START.match(text) else text


def _uncell(text: str) -> str:
    return text[1:] if text.startswith("'") and _FORMULA_START.match(text[1:]) else text


def to_csv(records: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    # CRLF (RFC 4180), and not only for spreadsheets: the writer quotes a field holding a
    # character of its line terminator, so with "\n" a lone "\r" in a label went out unquoted
    # and ended the row there on reading.
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for r in records:
        row = {**r, "tags": " ".join(r["tags"]),
               "confidence": "" if r["confidence"] is None else r["confidence"],
               "reviewed_by": r["reviewed_by"] or "",
               "withdrawn": "true" if r["withdrawn"] else "false",
               "revisions": json.dumps(r["revisions"], ensure_ascii=False)}
        writer.writerow({k: _cell(v) if k in _TEXT_FIELDS and isinstance(v, str) else v
                         for k, v in row.items()})
    return out.getvalue()


def to_neuronpedia(records: Iterable[dict[str, Any]], *, model_ids: dict[str, str]) -> list[dict]:
    """The live labels as Neuronpedia explanations (`layer` is the SAE id, as in our URLs)."""
    return [{"modelId": model_ids.get(r["sae_id"], ""), "layer": r["sae_id"],
             "index": str(r["feature_index"]), "description": r["description"],
             "authorId": r["author"],
             "typeName": "saescope" if r["author_kind"] == "person" else "saescope-auto",
             "createdAt": r["created_at"]}
            for r in records if not r["withdrawn"]]


def export_text(*, session: Session, fmt: str, sae_id: str | None = None) -> str:
    """The export file's text in one of FORMATS."""
    from app.store.tables import SAE

    if fmt not in FORMATS:
        raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    records = export_records(session=session, sae_id=sae_id)
    if fmt == "jsonl":
        return "".join(to_jsonl(records))
    if fmt == "csv":
        return to_csv(records)
    model_ids = dict(session.execute(select(SAE.id, SAE.model_id)).all())
    return json.dumps(to_neuronpedia(records, model_ids=model_ids), ensure_ascii=False,
                      indent=1) + "\n"


# --- import --------------------------------------------------------------------------------------


def parse_jsonl(text: str) -> list[tuple[int, dict[str, Any]]]:
    out = []
    # Lines end at \n only (JSON Lines); str.splitlines() would also cut at U+2028 and others,
    # which JSON allows raw inside a string.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if line_no == 1 and line.lstrip().startswith("["):
                raise ConfigError("line 1: a JSON array, not JSON Lines; import reads the jsonl "
                                  "or csv files of `saescope labels export` (Neuronpedia's "
                                  "shape is for export only)") from None
            raise ConfigError(f"line {line_no}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            what = "a JSON array (a Neuronpedia export?)" if isinstance(record, list) else \
                "not a JSON object"
            raise ConfigError(f"line {line_no}: {what}; import reads one label object a line")
        out.append((line_no, record))
    return out


def parse_csv(text: str) -> list[tuple[int, dict[str, Any]]]:
    # newline="" semantics: the csv module splits lines itself, so quoted fields keep their
    # line breaks and a lone \r ends a line as in the file.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames or []
    except csv.Error as exc:
        raise ConfigError(f"line 1: not CSV ({exc})") from None
    missing = [f for f in ("sae_id", "feature_index", "author", "description")
               if f not in fieldnames]
    if missing:
        raise ConfigError(f"line 1: the CSV header lacks {', '.join(missing)}")
    out = []
    line_no = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ConfigError(f"line {reader.line_num}: not CSV ({exc})") from None
        try:
            record: dict[str, Any] = {
                k: _uncell(v) if k in _TEXT_FIELDS and isinstance(v, str) else v
                for k, v in row.items()}
            record["tags"] = (row.get("tags") or "").split()
            record["confidence"] = float(row["confidence"]) if row.get("confidence") else None
            record["withdrawn"] = (row.get("withdrawn") or "").lower() == "true"
            record["revisions"] = json.loads(row["revisions"]) if row.get("revisions") else []
            record["reviewed_by"] = record.get("reviewed_by") or None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"line {line_no + 1}: {exc}") from None
        out.append((line_no + 1, record))
        line_no = reader.line_num
    return out


def _int(value: Any, name: str, *, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: not an integer") from None
    if number < minimum or isinstance(value, bool) or str(number) != str(value).strip():
        raise ConfigError(f"{name}: an integer >= {minimum}")
    return number


def _when(value: Any, name: str) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{name}: not an ISO date-time") from None
    # Stored as naive UTC (tables.utcnow); a time with an offset is converted, not relabeled.
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def _check(record: dict[str, Any]) -> dict[str, Any]:
    """A record's values for the tables, or ConfigError naming the field."""
    sae_id = record.get("sae_id")
    if not isinstance(sae_id, str) or not sae_id or len(sae_id) > 200:
        raise ConfigError("sae_id: 1-200 characters")
    author_kind = record.get("author_kind") or "person"
    author = record.get("author")
    check_author(author if isinstance(author, str) else "", author_kind)
    edit = clean_edit(LabelEdit(
        description=record.get("description", ""), tags=record.get("tags") or [],
        status=record.get("status") or "draft", confidence=record.get("confidence"),
        notes=record.get("notes") or ""))
    revisions = record.get("revisions") or []
    if not isinstance(revisions, list):
        raise ConfigError("revisions: a list")
    checked_revs = []
    for n, rev in enumerate(revisions):
        if not isinstance(rev, dict) or rev.get("action") not in _ACTIONS:
            raise ConfigError(f"revisions[{n}].action: one of {', '.join(_ACTIONS)}")
        for side in ("before", "after"):
            if rev.get(side) is not None and not isinstance(rev.get(side), dict):
                raise ConfigError(f"revisions[{n}].{side}: an object or null")
        checked_revs.append({
            "version": _int(rev.get("version"), f"revisions[{n}].version", minimum=1),
            "action": rev["action"], "actor": str(rev.get("actor") or author)[:200],
            "created_at": _when(rev.get("created_at"), f"revisions[{n}].created_at"),
            "before": rev.get("before"), "after": rev.get("after"),
        })
    versions = [r["version"] for r in checked_revs]
    if len(set(versions)) != len(versions):
        raise ConfigError("revisions: two revisions with one version")
    reviewed_by = record.get("reviewed_by")
    return {
        "sae_id": sae_id, "feature_index": _int(record.get("feature_index"), "feature_index"),
        "author": author, "author_kind": author_kind, "edit": edit,
        "version": _int(record.get("version", 1), "version", minimum=1),
        "reviewed_by": str(reviewed_by)[:64] if reviewed_by else None,
        "created_at": _when(record.get("created_at"), "created_at"),
        "updated_at": _when(record.get("updated_at"), "updated_at"),
        "withdrawn": bool(record.get("withdrawn")), "revisions": checked_revs,
    }


def import_records(engine: Engine, records: list[tuple[int, dict[str, Any]]]) -> int:
    """Write every (line number, record) or none; returns how many labels were written.

    A label already held by the same author on the same feature is an error (import into a
    database that has it would otherwise merge two histories), and so is a feature index past
    the width of an SAE this database holds. Labels of SAEs it does not hold (yet) are taken:
    labels are kept by SAE id, so they can come back before the SAE is built again.
    """
    from app.store.tables import SAE, utcnow

    checked = []
    seen: dict[tuple, int] = {}
    for line_no, record in records:
        try:
            values = _check(record)
        except ConfigError as exc:
            raise ConfigError(f"line {line_no}: {exc}; nothing was imported") from None
        key = (values["sae_id"], values["feature_index"], values["author_kind"],
               values["author"])
        if not values["withdrawn"]:
            if key in seen:
                raise ConfigError(f"line {line_no}: the same author's label on this feature "
                                  f"is on line {seen[key]} too; nothing was imported")
            seen[key] = line_no
        checked.append((line_no, values))
    now = utcnow()
    with write_session(engine, durable=True) as session:
        widths = dict(session.execute(select(SAE.id, SAE.d_sae)).all())
        for line_no, v in checked:
            width = widths.get(v["sae_id"])
            if width is not None and v["feature_index"] >= width:
                raise ConfigError(
                    f"line {line_no}: feature_index: SAE {v['sae_id']} has features "
                    f"0..{width - 1}, not {v['feature_index']}; nothing was imported")
            edit: LabelEdit = v["edit"]
            try:
                with session.begin_nested():
                    label_id = session.execute(insert(Label).values(
                        sae_id=v["sae_id"], feature_index=v["feature_index"],
                        author=v["author"], author_kind=v["author_kind"], user_id=None,
                        description=edit.description, tags=edit.tags, status=edit.status,
                        confidence=edit.confidence, notes=edit.notes, version=v["version"],
                        reviewed_by=v["reviewed_by"], created_at=v["created_at"] or now,
                        updated_at=v["updated_at"] or now,
                    ).returning(Label.id)).scalar_one()
            except IntegrityError:
                raise ConfigError(
                    f"line {line_no}: {v['author']} already has a label on feature "
                    f"{v['feature_index']} of {v['sae_id']}; nothing was imported") from None
            if edit.tags:
                session.execute(insert(LabelTag),
                                [{"label_id": label_id, "tag": t} for t in edit.tags])
            revisions = v["revisions"] or [{
                "version": v["version"], "action": "import", "actor": v["author"],
                "created_at": now, "before": None,
                "after": edit.snapshot()}]
            session.execute(insert(LabelRevision), [
                {"label_id": label_id, "sae_id": v["sae_id"],
                 "feature_index": v["feature_index"], **r,
                 "created_at": r["created_at"] or now} for r in revisions])
            if v["withdrawn"]:
                session.execute(delete(Label).where(Label.id == label_id))
    return len(checked)


def parse(text: str, fmt: str) -> list[tuple[int, dict[str, Any]]]:
    text = text.removeprefix("\ufeff")  # a byte-order mark from a spreadsheet's "save as"
    if fmt == "jsonl":
        return parse_jsonl(text)
    if fmt == "csv":
        return parse_csv(text)
    raise ConfigError(f"format: import reads jsonl or csv, not {fmt!r}")
