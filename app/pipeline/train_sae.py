"""The train-sae job: corpus -> cached activations -> TopK SAE -> held-out evals -> SAE folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.engine.devices import resolve_device, resolve_dtype
from app.engine.evals import (
    evaluate_sae,
    format_evals,
    held_out_fingerprint,
    sae_files_fingerprint,
)
from app.engine.formats import SAELENS_CFG, SAELENS_WEIGHTS
from app.engine.loading import load_model
from app.engine.sae import SAE, SAEConfig
from app.engine.train import CHECKPOINT_NAME, TrainConfig, train_topk
from app.errors import ConfigError
from app.pipeline.activations import cache_key, cache_key_parts, get_activations
from app.pipeline.corpus import CorpusTooSmall, load_corpus
from app.pipeline.interrupts import DeferredInterrupt
from app.pipeline.outputs import check_corpus, check_writable_dir

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HOOK = "blocks.15.hook_resid_post"
DEFAULT_D_SAE = 4096
DEFAULT_K = 32
DEFAULT_TOKENS = 200_000
DEFAULT_EPOCHS = 4
DEFAULT_EVAL_TOKENS = 8192
DEFAULT_SAE_ID = "15-res-topk-4k"
_HOOK_SET = {"hook_resid_post": "res", "hook_resid_pre": "res-pre", "hook_mlp_out": "mlp",
             "hook_attn_out": "att"}


@dataclass
class TrainedSAE:
    path: Path
    sae: SAE
    evals: dict[str, Any]


def default_sae_id(hook_name: str, *, d_sae: int, architecture: str = "topk") -> str:
    """Neuronpedia-style "{layer}-{set}": (blocks.15.hook_resid_post, 4096) -> 15-res-topk-4k."""
    parts = hook_name.strip().split(".")
    if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in _HOOK_SET:
        raise ConfigError(f"cannot derive an SAE id from hook {hook_name!r}; pass --sae-id")
    size = f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)
    return f"{parts[1]}-{_HOOK_SET[parts[2]]}-{architecture}-{size}"


def sae_folder(saes_dir: Path, *, model_id: str, sae_id: str) -> Path:
    """Where the SAE ``sae_id`` of ``model_id`` is kept: saes_dir/{model_id}/{sae_id}."""
    return saes_dir / model_id / sae_id


def train_sae(
    *,
    cache_dir: Path,
    saes_dir: Path | None = None,
    out: Path | None = None,
    model: str = DEFAULT_MODEL,
    hook_name: str = DEFAULT_HOOK,
    d_sae: int = DEFAULT_D_SAE,
    k: int = DEFAULT_K,
    corpus: str = "python-docs",
    tokens: int = DEFAULT_TOKENS,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    sae_id: str | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    context_size: int = 128,
    text_field: str = "text",
    lm: LanguageModel | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainedSAE:
    """Cache activations, train a TopK SAE, evaluate it on held-out tokens, save it with evals.json.

    The first ``tokens`` of the corpus train the SAE; the next ``eval_tokens`` are held out for
    the evaluation. Bad options and unwritable outputs raise ConfigError before the model loads
    and before anything is written. The SAE lands in ``out``, else in ``sae_folder(saes_dir,
    ...)`` (SAELens layout + evals.json), written aside and renamed into place; if that write
    still fails, the SAE is kept beside its checkpoint and the ConfigError says where.
    Activations and the training checkpoint live under ``cache_dir``.
    """
    if out is None and saes_dir is None:
        raise ValueError("train_sae needs out or saes_dir to know where the SAE goes")
    t_start = time.perf_counter()
    check_options(d_sae=d_sae, k=k, epochs=epochs, tokens=tokens, eval_tokens=eval_tokens,
                  context_size=context_size)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    cfg = TrainConfig(d_sae=d_sae, k=k, epochs=epochs, seed=seed, **(train_overrides or {}))
    # Every output is checked before the model loads: a run must not fail at its last write.
    check_writable_dir(cache_dir, what=f"the cache folder {cache_dir}",
                       hint="set SAESCOPE_HOME to a writable folder")
    if out is not None:
        check_destination(Path(out))
    else:
        assert saes_dir is not None
        check_writable_dir(saes_dir, what=f"the SAE folder {saes_dir}",
                           hint="pass --out or set SAESCOPE_SAES_DIR")
    check_corpus(corpus, text_field=text_field)  # a missing or empty corpus: before the model
    if lm is None:
        log(f"loading {model} ...")
        lm = load_model(model, device=torch_device, dtype=torch_dtype, cache_dir=cache_dir)
    hook_name = lm.hook_point(hook_name).name  # ConfigError listing valid names
    sae_id = sae_id or default_sae_id(hook_name, d_sae=d_sae)
    if out is None:
        assert saes_dir is not None
        out = sae_folder(saes_dir, model_id=lm.model_id, sae_id=sae_id)
        check_destination(out)
    out = Path(out)

    try:
        windows = load_corpus(corpus, lm=lm, text_field=text_field, context_size=context_size,
                              max_tokens=tokens + eval_tokens)
    except CorpusTooSmall as exc:
        most = exc.available - eval_tokens
        fix = (f"lower --tokens to at most {most:,}" if most >= context_size else
               f"lower --eval-tokens or use a larger corpus (it holds {exc.available:,})")
        raise ConfigError(f"corpus {corpus!r} has {exc.available:,} text tokens, fewer than "
                          f"--tokens {tokens:,} plus the {eval_tokens:,} held-out tokens after "
                          f"them; {fix}") from None
    # The most whole packed sequences holding at most --tokens text tokens train; the rest are
    # held out.
    train_windows, held_out = windows.split(tokens, eval_tokens)
    n_train_seq = train_windows.n_seq
    if train_windows.real_tokens() != tokens:
        log(f"--tokens {tokens:,} rounded down to {train_windows.real_tokens():,}: the text of "
            f"{n_train_seq} whole sequences of {context_size}")

    cache = get_activations(lm=lm, hook_name=hook_name, corpus=corpus, max_tokens=tokens,
                            context_size=context_size, cache_dir=cache_dir,
                            text_field=text_field, tokenized=train_windows, progress=progress,
                            log=log)
    t_acts = time.perf_counter()
    data = cache.counted_activations()
    n_trained = len(data)  # text tokens: BOS and other special positions are left out
    log(f"training on {len(data):,} tokens ({cache.n_seq * context_size - len(data):,} BOS/"
        f"special positions left out), {epochs} epochs")

    parts = cache_key_parts(lm=lm, hook_name=hook_name, corpus=corpus, text_field=text_field,
                            max_tokens=tokens, context_size=context_size)
    run_key = cache_key({**parts, "train": asdict(cfg)})
    ckpt_dir = cache_dir / "train" / run_key
    with DeferredInterrupt() as interrupt:  # Ctrl-C ends the step, checkpoints, says so
        result = train_topk(data, cfg=cfg, checkpoint_dir=ckpt_dir, progress=progress,
                            should_stop=lambda: interrupt.requested, log=log)
    del data
    t_train = time.perf_counter()

    w = result.weights
    sae_cfg = SAEConfig(
        architecture="topk", d_in=lm.d_model, d_sae=d_sae, k=k, hook_name=hook_name,
        model_name=lm.model_id, apply_b_dec_to_input=True, normalize_activations="none",
        context_size=context_size, prepend_bos=True, exclude_special_tokens=True,
        neuronpedia_id=f"{lm.model_id}/{sae_id}",
        metadata={"sae_id": sae_id, "dataset_path": corpus, "training_tokens": n_trained,
                  "training_epochs": epochs, "seed": seed, "trained_by": "saescope",
                  "train_config": asdict(cfg), "input_scale_folded": result.scale},
    )
    sae = SAE.from_tensors(sae_cfg, {"W_enc": w.W_enc, "b_enc": w.b_enc, "W_dec": w.W_dec,
                                     "b_dec": w.b_dec}, source="trained SAE")
    log(f"evaluating on {held_out.real_tokens():,} held-out tokens ...")
    # Evaluated beside the model (its device), kept and saved on the CPU.
    evals = evaluate_sae(sae.to(lm.device), lm, held_out.tokens, held_out.special_mask,
                         progress=progress)
    sae = sae.to("cpu")
    t_eval = time.perf_counter()
    evals.update({
        "sae_id": sae_id, "model_id": lm.model_id, "corpus": corpus,
        "train_tokens": n_trained, "eval_tokens": held_out.real_tokens(), "epochs": epochs,
        "seed": seed, "d_sae": d_sae, "k": k,
        "train": result.summary,
        "seconds": {"activations": t_acts - t_start, "train": t_train - t_acts,
                    "eval": t_eval - t_train, "total": t_eval - t_start},
        "activation_cache": str(cache.path),
        # Lets `saescope build` reuse these figures when it evaluates the same thing.
        "held_out_sha256": held_out_fingerprint(held_out.tokens),
        "notes": "special positions (BOS and other special tokens) keep their activation "
                 "when the SAE is spliced in or the hook is zero-ablated, and are excluded "
                 "from all metrics",
    })

    try:
        _write_sae_folder(out, sae=sae, evals=evals)
    except OSError as exc:
        raise ConfigError(_unsaved_message(out, exc, sae=sae, evals=evals, ckpt_dir=ckpt_dir)) \
            from None
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is saved; its checkpoint is spent
    log(format_evals(evals))
    log(f"saved {out} ({t_eval - t_start:.0f} s)")
    return TrainedSAE(path=out, sae=sae, evals=evals)


def check_options(*, d_sae: int, k: int, epochs: int, tokens: int, eval_tokens: int,
                  context_size: int) -> None:
    """Refuse option values the run cannot use, naming the flags the user typed."""
    if d_sae < 1:
        raise ConfigError(f"--d-sae must be at least 1 (got {d_sae})")
    if not 1 <= k <= d_sae:
        raise ConfigError(f"--k must be between 1 and --d-sae ({d_sae}), got {k}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    for flag, value in (("--tokens", tokens), ("--eval-tokens", eval_tokens)):
        if value < context_size:
            raise ConfigError(f"{flag} must be at least one sequence of {context_size} tokens "
                              f"(got {value})")


def check_destination(out: Path) -> None:
    """Fail unless the SAE can be written to ``out``. An existing SAE folder there is replaced;
    any other non-empty folder is refused, since replacing it would delete its files."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder")
        if any(out.iterdir()) and not (out / SAELENS_CFG).is_file():
            raise ConfigError(f"--out {out} is a folder that holds no SAE ({SAELENS_CFG}) and "
                              "would be replaced; give a new or empty folder")
    # The SAE is written beside ``out`` and renamed into place, so its parent must be writable.
    check_writable_dir(out.parent, what=f"the SAE to {out}",
                       hint="choose a writable folder with --out")


def _write_sae_folder(out: Path, *, sae: SAE, evals: dict[str, Any]) -> None:
    """Write the SAE and evals.json aside, then rename the folder into place (replacing an
    older SAE there), so a failure never leaves half a folder at ``out``."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        sae.save(tmp)
        evals["sae_sha256"] = sae_files_fingerprint(tmp)
        (tmp / "evals.json").write_text(json.dumps(evals, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unsaved_message(out: Path, exc: OSError, *, sae: SAE, evals: dict[str, Any],
                     ckpt_dir: Path) -> str:
    """Keep a trained SAE whose write failed beside its checkpoint, and say where and how to
    retry."""
    reason = f"cannot write the SAE to {out} ({exc.strerror or exc})"
    kept = ckpt_dir / "unsaved-sae"
    try:
        _write_sae_folder(kept, sae=sae, evals=evals)
    except OSError as exc2:
        return f"{reason}, nor keep it at {kept} ({exc2.strerror or exc2})"
    resume = (", or rerun with the same options and a writable --out: it resumes from the "
              "finished checkpoint without training again"
              if (ckpt_dir / CHECKPOINT_NAME).is_file() else "")
    return f"{reason}; the trained SAE is kept at {kept}: copy that folder to {out}{resume}"


def train_default_sae(*, saes_dir: Path, cache_dir: Path, **kwargs: Any) -> TrainedSAE:
    """Train the default SAE (smollm2-135m, layer 15 residual, 4096 latents, k 32)."""
    return train_sae(saes_dir=saes_dir, cache_dir=cache_dir, **kwargs)


def ensure_sae(*, saes_dir: Path, cache_dir: Path, model: str = DEFAULT_MODEL,
               sae_id: str = DEFAULT_SAE_ID, log: Callable[[str], None] = print,
               **kwargs: Any) -> Path:
    """Folder of the SAE ``sae_id`` of ``model``; trains it with the defaults when absent."""
    folder = sae_folder(saes_dir, model_id=model, sae_id=sae_id)
    if (folder / SAELENS_CFG).is_file() and (folder / SAELENS_WEIGHTS).is_file():
        return folder
    log(f"no SAE at {folder}; training it")
    return train_sae(saes_dir=saes_dir, cache_dir=cache_dir, model=model, sae_id=sae_id, log=log,
                     **kwargs).path
