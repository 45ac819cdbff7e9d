"""SAE file formats: which format a folder is in, and reading it; one module per format.

Each reader turns a folder into (SAEConfig, tensors in our names and layout, source file), so
``SAE.from_tensors`` validates every format the same way. Formats, as published: SAELens
(``saelens``, read and written), Gemma Scope 1 and 2 (``gemma_scope_1``, ``gemma_scope_2``) and
Llama Scope (``llama_scope``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.engine.formats.common import Tensors
from app.engine.formats.gemma_scope_1 import read_gemma_scope_1
from app.engine.formats.gemma_scope_2 import read_gemma_scope_2
from app.engine.formats.llama_scope import read_llama_scope
from app.engine.formats.saelens import (
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    read_saelens,
    write_saelens,
)
from app.engine.sae_config import SAEConfig
from app.errors import ConfigError, NotFoundError

__all__ = [
    "FORMATS",
    "SAELENS_CFG",
    "SAELENS_WEIGHTS",
    "Format",
    "detect_format",
    "read_sae_folder",
    "write_saelens",
]

Reader = Callable[[Path], tuple[SAEConfig, Tensors, str]]


@dataclass(frozen=True)
class Format:
    name: str
    # files that identify the format; the first entry alone is enough to claim the folder
    files: tuple[str, ...]
    reader: Reader


FORMATS: tuple[Format, ...] = (
    Format("saelens", (SAELENS_CFG, SAELENS_WEIGHTS), read_saelens),
    Format("gemma-scope-1", ("params.npz",), read_gemma_scope_1),
    Format("gemma-scope-2", ("params.safetensors", "config.json"), read_gemma_scope_2),
    Format("llama-scope", ("hyperparams.json", "checkpoints/final.safetensors"), read_llama_scope),
)


def read_sae_folder(path: str | Path) -> tuple[SAEConfig, Tensors, str]:
    """Detect the folder's format and read it: (config, tensors in our layout, source file)."""
    folder = _folder_of(Path(path))
    for fmt in FORMATS:
        if (folder / fmt.files[0]).is_file():
            return fmt.reader(folder)
    expected = "; ".join(f"{f.name}: {' + '.join(f.files)}" for f in FORMATS)
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise ConfigError(
        f"{folder} is not an SAE folder in a known format. Expected one of: {expected}. "
        f"Found: {', '.join(present) or 'nothing'}"
    )


def detect_format(path: str | Path) -> str:
    """Name of the format of an SAE folder ('saelens', 'gemma-scope-1', ...)."""
    folder = _folder_of(Path(path))
    for fmt in FORMATS:
        if (folder / fmt.files[0]).is_file():
            return fmt.name
    raise ConfigError(f"{folder} is not an SAE folder in a known format")


def _folder_of(path: Path) -> Path:
    if not path.exists():
        raise NotFoundError(f"SAE path {path} does not exist")
    if path.is_file():
        # a weights or config file was given: use its folder (Llama Scope keeps weights one
        # level down, in checkpoints/)
        path = path.parent
        if path.name == "checkpoints" and (path.parent / "hyperparams.json").is_file():
            path = path.parent
    return path
