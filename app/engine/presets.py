"""Model presets: the registry in models/presets.toml, read into typed records."""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.errors import ConfigError
from app.resources import PRESETS_FILE

SOURCE_KINDS = ("pip-gguf", "pip-gguf-assembled", "tiny")
ARCHITECTURES = ("llama", "gemma3")


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # one of SOURCE_KINDS
    architecture: str  # one of ARCHITECTURES
    default_hook: str
    has_chat_template: bool
    description: str
    default: bool = False
    package: str = ""  # PyPI distribution name (pip sources)
    module: str = ""  # importable top-level name, located with importlib.util.find_spec
    file: str = ""  # GGUF file name inside the package (or written by assemble())
    install: str = ""  # the pip command that provides the package


@lru_cache
def _load_presets(path: Path = PRESETS_FILE) -> tuple[Preset, ...]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the model preset registry {path}: {exc}") from exc
    presets = []
    for entry in data.get("preset", []):
        try:
            preset = Preset(
                name=entry["name"],
                source=entry["source"],
                architecture=entry["architecture"],
                default_hook=entry["default_hook"],
                has_chat_template=bool(entry.get("chat_template", False)),
                description=entry.get("description", ""),
                default=bool(entry.get("default", False)),
                package=entry.get("package", ""),
                module=entry.get("module", ""),
                file=entry.get("file", ""),
                install=entry.get("install", ""),
            )
        except KeyError as exc:
            raise ConfigError(f"{path}: preset {entry.get('name', '?')!r} lacks {exc}") from exc
        if preset.source not in SOURCE_KINDS:
            raise ConfigError(
                f"{path}: preset {preset.name!r} has source {preset.source!r}; "
                f"allowed: {', '.join(SOURCE_KINDS)}"
            )
        if preset.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"{path}: preset {preset.name!r} has architecture {preset.architecture!r}; "
                f"allowed: {', '.join(ARCHITECTURES)}"
            )
        presets.append(preset)
    if sum(p.default for p in presets) != 1:
        raise ConfigError(f"{path}: exactly one preset must say `default = true`")
    return tuple(presets)


def list_presets() -> list[Preset]:
    """All presets in registry order (the default first by convention)."""
    return list(_load_presets())


def preset_names() -> list[str]:
    return [p.name for p in _load_presets()]


def default_model() -> str:
    """Name of the preset loaded when no model is given."""
    return next(p.name for p in _load_presets() if p.default)


def find_preset(name: str) -> Preset | None:
    return next((p for p in _load_presets() if p.name == name), None)


def is_installed(preset: Preset) -> bool:
    """Whether the preset can load here: tiny presets always can, pip presets once their package
    is installed (found with importlib, never imported)."""
    if preset.source == "tiny":
        return True
    try:
        return importlib.util.find_spec(preset.module) is not None
    except (ImportError, ValueError):
        return False


def get_preset(name: str) -> Preset:
    preset = find_preset(name)
    if preset is None:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(preset_names())}")
    return preset
