"""Loading a LanguageModel: presets, local Hugging Face folders, GGUF files (with their dequantized
cache) and hub ids.

Loading a GGUF file dequantizes every tensor, which is slow, so the first load writes the
dequantized float32 weights and the tokenizer as a Hugging Face folder under
{cache_dir}/models/{model_id}; later loads read that folder (safetensors, mmap). The cache is keyed
by the GGUF file's path, size and mtime and by the transformers version. The caller says where
the cache lives (``cache_dir``); the engine reads no settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from app.engine.lm import LanguageModel
from app.engine.presets import (
    Preset,
    default_model,
    find_preset,
    get_preset,
    is_installed,
    list_presets,
    preset_names,
)
from app.engine.tiny import build_tiny
from app.errors import ConfigError, OfflineError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_CACHE_STAMP = "saescope-source.json"
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_model(spec: str | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, cache_dir: Path) -> LanguageModel:
    """Load a preset name, a local HF folder, a local .gguf file or a hub id (needs a network, or
    the model in the hub cache), on ``device`` with its weights in ``dtype`` (loaded as float32,
    then cast, so every format gives the same numbers before the cast).

    ``cache_dir`` holds the dequantized copies of GGUF models ({cache_dir}/models/{model_id}) and
    the GGUF files that presets assemble from parts ({cache_dir}/gguf/{preset}).
    """
    spec = (spec or default_model()).strip()
    cache_dir = Path(cache_dir)
    preset = find_preset(spec)
    if preset is not None:
        lm = _load_preset(preset, cache_dir=cache_dir)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            lm = _load_local_file(path, cache_dir=cache_dir)
        elif path.is_dir():
            lm = _load_local_folder(path, cache_dir=cache_dir)
        elif _looks_like_path(spec):
            raise ConfigError(f"model file or folder {spec} does not exist; {_choices()}")
        elif _HUB_ID_RE.fullmatch(spec):
            lm = _load_hub(spec)
        else:
            raise ConfigError(f"unknown model {spec!r}; {_choices()}")
    if torch.device(device).type != "cpu":
        lm.hf_model.to(device)
    if dtype != torch.float32:
        lm.hf_model.to(dtype)
    return lm


def _choices() -> str:
    return (
        f"use a preset ({', '.join(preset_names())}), a local Hugging Face folder, "
        "a local .gguf file, or a hub id such as org/name (needs a network)"
    )


def _looks_like_path(spec: str) -> bool:
    # Hub ids have exactly one slash ("org/name"); anything deeper is meant as a path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _load_preset(preset: Preset, *, cache_dir: Path) -> LanguageModel:
    if preset.source == "tiny":
        return build_tiny(preset.name)
    gguf = _preset_gguf(preset, cache_dir=cache_dir)
    lm = _load_gguf(gguf, model_id=preset.name, source=f"preset {preset.name} ({gguf})",
                    cache_dir=cache_dir)
    lm.has_chat_template = preset.has_chat_template and lm.has_chat_template
    return lm


def _preset_gguf(preset: Preset, *, cache_dir: Path) -> Path:
    """Locate (or assemble) the GGUF of a pip-packaged preset, without importing llm packages."""
    spec = importlib.util.find_spec(preset.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model preset {preset.name!r} needs the package {preset.package}; "
            f"install it with `{preset.install}`"
        )
    if preset.source == "pip-gguf":
        path = Path(next(iter(spec.submodule_search_locations))) / preset.file
        if not path.is_file():
            raise ConfigError(
                f"{path} is missing from the installed {preset.package}; "
                f"reinstall it with `{preset.install} --force-reinstall`"
            )
        return path
    # pip-gguf-assembled: a small pure-Python package (safe to import) joins its part wheels.
    # Not under cache_dir/models/{name}: that folder is replaced whole when the cache is rebuilt.
    target = cache_dir / "gguf" / preset.name / preset.file
    if target.is_file():
        return target
    package = importlib.import_module(preset.module)
    # Assemble aside and rename, so a killed run never leaves a truncated file behind.
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(partial, overwrite=True)
        partial.replace(target)
        return target
    except (OSError, ValueError, ModuleNotFoundError) as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot assemble {preset.file} from {preset.package} ({exc}); "
            f"reinstall it with `{preset.install} --force-reinstall`"
        ) from exc


def _load_local_file(path: Path, *, cache_dir: Path) -> LanguageModel:
    if path.suffix.lower() != ".gguf":
        raise ConfigError(
            f"{path} is not a .gguf file; give a .gguf file or a Hugging Face model folder"
        )
    return _load_gguf(path, model_id=_slug(path.stem), source=str(path), cache_dir=cache_dir)


def _load_local_folder(path: Path, *, cache_dir: Path) -> LanguageModel:
    if (path / "config.json").is_file():
        return _load_hf_folder(path, model_id=_slug(path.name), source=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_local_file(ggufs[0], cache_dir=cache_dir)
    raise ConfigError(
        f"{path} is neither a Hugging Face model folder (no config.json) nor a folder with exactly "
        f"one .gguf file ({len(ggufs)} found); name the .gguf file itself"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"


def _load_hf_folder(path: Path, *, model_id: str, source: str, **kwargs: object) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot load the model folder {path}: {_first_line(exc)}") from exc
    return LanguageModel(model_id=model_id, source=source, hf_model=model, tokenizer=tokenizer)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ----- GGUF files and their dequantized cache --------------------------------------------------


def _gguf_fingerprint(path: Path) -> dict[str, object]:
    import transformers

    stat = path.stat()
    return {
        "gguf": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
    }


def _load_gguf(path: Path, *, model_id: str, source: str, cache_dir: Path) -> LanguageModel:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read the model file {path}: {exc.strerror or exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ConfigError(f"{path} is not a GGUF file (bad magic bytes {magic!r})")

    cache = cache_dir / "models" / model_id
    fingerprint = _gguf_fingerprint(path)
    cached = _read_stamp(cache) == fingerprint
    if cached:
        try:
            return _load_hf_folder(cache, model_id=model_id, source=source)
        except ConfigError as exc:
            log.warning("ignoring a broken dequantized cache at %s: %s", cache, exc)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # the GGUF reader raises many kinds on a damaged file
        raise ConfigError(
            f"cannot load the GGUF file {path}: {_first_line(exc)}; is the file complete?"
        ) from exc
    _write_cache(cache, model=model, tokenizer=tokenizer, fingerprint=fingerprint)
    return LanguageModel(model_id=model_id, source=source, hf_model=model, tokenizer=tokenizer)


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _CACHE_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_cache(folder: Path, *, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 fingerprint: dict) -> None:
    """Write the dequantized model as an HF folder atomically: build aside, then rename."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        # GGUF loading marks the model as quantized (hf_quantizer, config.quantization_config),
        # which save_pretrained refuses and from_pretrained would follow back to the GGUF file;
        # the weights are already plain float32, so hide both while saving.
        hidden = {
            "quantizer": getattr(model, "hf_quantizer", None),
            "config": getattr(model.config, "quantization_config", None),
        }
        try:
            model.hf_quantizer = None
            if hidden["config"] is not None:
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.hf_quantizer = hidden["quantizer"]
            if hidden["config"] is not None:
                model.config.quantization_config = hidden["config"]
        tokenizer.save_pretrained(tmp)
        # The stamp goes in last: a folder without it is never trusted.
        (tmp / _CACHE_STAMP).write_text(json.dumps(fingerprint, indent=1), encoding="utf-8")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("could not cache the dequantized model at %s: %s", folder, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# ----- hub ids ---------------------------------------------------------------------------------

# A resolver that takes longer than this is treated as no network: the hub client would spend
# far longer in its retries before failing the same way.
_RESOLVE_TIMEOUT_S = 3.0


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it may be.

    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (read by huggingface_hub at import) decide with no
    network attempt; otherwise one DNS lookup of the hub host, which fails at once on a machine
    without a network, stands in for the hub client's slow retries.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    return _resolve_failure(host)


def _resolve_failure(host: str) -> str | None:
    result: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            result.append(None)
        except OSError as exc:
            result.append(exc)

    # A thread, so a resolver that hangs cannot hold the command past the timeout.
    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(_RESOLVE_TIMEOUT_S)
    if not result:
        return f"{host} did not resolve within {_RESOLVE_TIMEOUT_S:.0f} s"
    if result[0] is not None:
        return f"{host} does not resolve"
    return None


@contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """huggingface_hub's offline mode for one load: local_files_only alone still lets it fetch
    side data (its agent registry) from the hub."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _is_network_failure(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        name = type(exc).__name__
        if any(word in name for word in ("Connect", "Offline", "Timeout", "NameResolution")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _offline_message(repo_id: str, reason: str) -> str:
    usable = [p.name for p in list_presets() if p.source != "tiny" and is_installed(p)]
    if usable:
        instead = (f"use an installed preset ({', '.join(usable)}), a local Hugging Face folder "
                   "or a local .gguf file instead")
    else:
        default = get_preset(default_model())
        instead = (f"use a local Hugging Face folder or a local .gguf file instead, or install "
                   f"the preset {default.name} with `{default.install}`")
    return (f"{repo_id!r} is no local path, so it was read as a Hugging Face hub id, but this "
            f"machine is offline ({reason}) and the hub cache does not hold it; {instead}")


def _load_hub(repo_id: str) -> LanguageModel:
    from huggingface_hub import try_to_load_from_cache

    reason = hub_offline_reason()
    if reason is not None:
        # Offline, a model already in the hub cache still loads, without a network attempt.
        if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            raise OfflineError(_offline_message(repo_id, reason))
        with _hub_offline_mode():
            return _load_hf_folder(Path(repo_id), model_id=_slug(repo_id),
                                   source=f"hub:{repo_id}", local_files_only=True)
    try:
        return _load_hf_folder(Path(repo_id), model_id=_slug(repo_id), source=f"hub:{repo_id}")
    except ConfigError as exc:
        if _is_network_failure(exc.__cause__):
            raise OfflineError(_offline_message(repo_id, "no network")) from exc.__cause__
        raise
