"""Server file paths out of public responses: a path under the data folder (settings.home) shows
relative to it, any other path only its final name.

The database keeps full paths (the build and the model loader need them); what the API and the
pages show goes through here. Values are strings that may hold a path anywhere ("preset x
(/opt/.../model.gguf)"), or JSON documents (an SAE's cfg, a run's config and statistics) whose
strings are all treated the same way.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

# An absolute or explicitly relative POSIX path: starts with "/", "./", "../" or "~/" where no
# word, dot, colon or slash precedes it (so "org/name", "hub:org/name" and URLs stay whole), and
# runs to whitespace, a quote, a bracket or a separator.
_PATH = re.compile(r"(?<![\w.:/~-])(?:/|\.{1,2}/|~/)[^\s'\"()<>\[\]{},;]*")


def public_path(value: str, *, home: Path) -> str:
    """`value` with every file path in it shortened (see the module docstring)."""
    if "/" not in value:
        return value
    return _public_path(value, str(home))


@lru_cache(maxsize=1024)
def _public_path(value: str, home: str) -> str:
    root = PurePosixPath(home)

    def shorten(match: re.Match[str]) -> str:
        path = PurePosixPath(match.group(0))
        if path.is_absolute():
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                pass
        return path.name or "."

    return _PATH.sub(shorten, value)


def public_json(value: Any, *, home: Path) -> Any:
    """A JSON document with public_path applied to every string in it (keys stay)."""
    if isinstance(value, str):
        return public_path(value, home=home)
    if isinstance(value, dict):
        return {k: public_json(v, home=home) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [public_json(v, home=home) for v in value]
    return value
