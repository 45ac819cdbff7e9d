"""What a precompute build depends on: ``BuildOptions`` (the CLI's flags) and their checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.errors import ConfigError
from app.pipeline.corpus import DEFAULT_CORPUS

Log = Callable[[str], None]


@dataclass(kw_only=True)
class BuildOptions:
    """Everything a build depends on (the CLI's flags; the caller fills ``db_url`` and
    ``cache_dir`` from its settings)."""

    sae_path: Path
    db_url: str
    cache_dir: Path  # activation caches, checkpoints, downloaded models
    model: str | None = None  # preset / folder / .gguf; default: the SAE's model_name
    corpus: str = DEFAULT_CORPUS
    n_tokens: int = 100_000  # text tokens processed (BOS and other special positions not counted)
    sae_id: str | None = None  # default: the SAE folder's name
    hook_name: str | None = None  # default: the SAE's hook
    context_size: int | None = None  # default: the SAE's context_size, else 128
    batch_size: int = 16  # sequences per forward pass
    text_field: str = "text"
    n_top: int = 20
    window_len: int = 32
    n_bands: int = 10
    per_band: int = 3
    n_logits: int = 10
    n_neighbours: int = 10
    eval_tokens: int = 4096  # held-out positions for explained variance / CE loss recovered
    seed: int = 0
    checkpoint_every: int = 20  # batches
    checkpoint_seconds: float = 60.0  # and at least this often
    use_activation_cache: bool = True
    device: str = "cpu"  # auto, cpu, cuda or cuda:N (see app.engine.devices); the CLI says auto
    dtype: str = "float32"  # the model forward's; the SAE encode and the accumulators stay float32
    progress: bool = True
    shards: int = 0  # > 0: cut the corpus into this many shards, run on Ray (sharded.py)
    ray_address: str | None = None  # an existing Ray cluster; default: start Ray locally


def check_options(opts: BuildOptions) -> None:
    for name in ("n_tokens", "batch_size", "n_top", "window_len", "n_bands", "per_band",
                 "checkpoint_every"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be at least 1 "
                              f"(got {getattr(opts, name)})")
    if opts.context_size is not None and opts.context_size < 2:
        raise ConfigError(f"context size must be at least 2 (got {opts.context_size})")
    if opts.checkpoint_seconds <= 0:
        raise ConfigError(f"checkpoint seconds must be positive (got {opts.checkpoint_seconds})")
    if opts.shards < 0:
        raise ConfigError(f"shards must be at least 1 (got {opts.shards})")
    if opts.ray_address and not opts.shards:
        raise ConfigError("--ray-address runs shards: add --shards N")
    from app.engine.devices import resolve_device, resolve_dtype

    resolve_device(opts.device)
    resolve_dtype(opts.dtype)
    if opts.eval_tokens < 0:
        raise ConfigError(f"eval tokens must be >= 0 (got {opts.eval_tokens})")
