"""Where the files shipped beside the code live: presets, templates, static assets, migrations.

The one module that knows the repository layout (`models/`, `frontend/`, `migrations/` at the top
level), so a change to how they are packaged touches only this file. It imports nothing from the
app, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

PRESETS_FILE = REPO_ROOT / "models" / "presets.toml"
TEMPLATES_DIR = REPO_ROOT / "frontend" / "templates"
STATIC_DIR = REPO_ROOT / "frontend" / "static"
MIGRATIONS_DIR = REPO_ROOT / "migrations"
