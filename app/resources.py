"""Where the files shipped beside the code live: presets, templates, static assets, migrations.

The one module that knows the repository layout (`models/`, `frontend/`, `migrations/` at the top
level). In a checkout or an editable install they are read in place; a wheel carries copies under
`app/_shipped/` (see setup.py). It imports nothing from the app, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_WHEEL_DIR = _PACKAGE_DIR / "_shipped"
SHIPPED_ROOT = _WHEEL_DIR if _WHEEL_DIR.is_dir() else _PACKAGE_DIR.parent

PRESETS_FILE = SHIPPED_ROOT / "models" / "presets.toml"
TEMPLATES_DIR = SHIPPED_ROOT / "frontend" / "templates"
STATIC_DIR = SHIPPED_ROOT / "frontend" / "static"
MIGRATIONS_DIR = SHIPPED_ROOT / "migrations"
