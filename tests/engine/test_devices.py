"""--device / --dtype: parsing, one-line CLI errors, float32 unchanged, a bfloat16 forward that
still feeds the SAE float32."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from app.engine.devices import resolve_device, resolve_dtype
from app.engine.loading import load_model
from app.engine.sae import SAE, SAEConfig
from app.errors import ConfigError
from app.pipeline.activations import cache_key_parts
from app.pipeline.build_inputs import ActivationSource
from app.pipeline.precompute import BuildOptions, compute_records

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_cpu_without_cuda_and_cuda_without_one_is_refused(no_cuda) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device(spec)
    for spec in ("gpu", "cuda:", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match="unknown device"):
            resolve_device(spec)


def test_dtypes() -> None:
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype 'float64'"):
        resolve_dtype("float64")


def _sae_folder(path):
    cfg = SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, hook_name=HOOK,
                    model_name="tiny-llama", context_size=16)
    return SAE.from_config(cfg, seed=0).save(path)


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "cuda"], "device cuda asked for, but torch sees no CUDA GPU"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--dtype", "float64"], "unknown dtype 'float64'"),
])
@pytest.mark.parametrize("command", ["build", "train-sae", "serve", "explain"])
def test_bad_device_or_dtype_is_one_line_and_exit_2(tmp_path, monkeypatch, no_cuda, command,
                                                      args, message) -> None:
    from app.settings import get_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    extra = {"build": ["--sae", str(_sae_folder(tmp_path / "sae")), "--model", "tiny-llama",
                       "--db", f"sqlite:///{tmp_path / 'x.db'}"],
             "train-sae": ["--model", "tiny-llama", "--hook", HOOK, "--out",
                           str(tmp_path / "out")],
             "serve": ["--db", f"sqlite:///{tmp_path / 'x.db'}"],
             "explain": ["--sae", "s", "--db", f"sqlite:///{tmp_path / 'x.db'}"]}[command]
    try:
        result = CliRunner().invoke(app, [command, *extra, *args])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "out").exists()


def test_serve_reads_device_and_dtype_from_the_environment(monkeypatch, tmp_path) -> None:
    from app.settings import Settings

    monkeypatch.setenv("SAESCOPE_DEVICE", "cuda:1")
    monkeypatch.setenv("SAESCOPE_DTYPE", "bfloat16")
    settings = Settings()
    assert (settings.device, settings.dtype) == ("cuda:1", "bfloat16")
    monkeypatch.delenv("SAESCOPE_DEVICE")
    monkeypatch.delenv("SAESCOPE_DTYPE")
    assert (Settings().device, Settings().dtype) == ("auto", "float32")


def test_float32_is_the_default_and_keys_are_unchanged(tmp_path) -> None:
    lm = load_model("tiny-llama", cache_dir=tmp_path)
    assert lm.dtype is torch.float32 and lm.device == torch.device("cpu")
    opts = BuildOptions(sae_path=tmp_path, db_url="sqlite://", cache_dir=tmp_path)
    assert (opts.device, opts.dtype) == ("cpu", "float32")
    parts = cache_key_parts(lm=lm, hook_name=HOOK, corpus="python-docs", text_field="text",
                            max_tokens=256, context_size=16)
    assert "model_dtype" not in parts  # float32 caches and checkpoints keep their old keys
    lm16 = load_model("tiny-llama", dtype=torch.bfloat16, cache_dir=tmp_path)
    parts16 = cache_key_parts(lm=lm16, hook_name=HOOK, corpus="python-docs",
                              text_field="text", max_tokens=256, context_size=16)
    assert parts16 == {**parts, "model_dtype": "bfloat16"}


def test_bfloat16_forward_feeds_the_sae_float32(tmp_path) -> None:
    lm = load_model("tiny-llama", dtype=torch.bfloat16, cache_dir=tmp_path)
    assert lm.dtype is torch.bfloat16
    ids = torch.randint(5, 200, (2, 16))
    raw = lm.run_to_hook(ids, HOOK)
    assert raw.dtype is torch.bfloat16  # the hook sees the forward's dtype ...
    acts = ActivationSource(lm=lm, hook_name=HOOK, cache=None).batch(ids.numpy(), 0, 2)
    assert acts.dtype is torch.float32  # ... the SAE gets float32
    assert torch.equal(acts, raw.to(torch.float16).float())
    lm32 = load_model("tiny-llama", cache_dir=tmp_path)
    ref = lm32.run_to_hook(ids, HOOK)
    assert torch.allclose(raw.float(), ref, rtol=0.1, atol=0.1)  # the same model, rounded


def test_a_bfloat16_build_runs_with_float32_encodes(tmp_path) -> None:
    corpus = tmp_path / "docs"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "quick", "fox", "def", "add", "(", "a", ",", "b", ")", ":", "return", "+"]
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(words, 200)))
    sae_path = _sae_folder(tmp_path / "sae")
    sae = SAE.load(sae_path)
    seen: list[torch.dtype] = []
    encode_sparse = sae.encode_sparse

    def spy(x, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append(x.dtype)
        return encode_sparse(x, *args, **kwargs)

    sae.encode_sparse = spy
    lm = load_model("tiny-llama", dtype=torch.bfloat16, cache_dir=tmp_path)
    opts = BuildOptions(sae_path=sae_path, corpus=str(corpus), n_tokens=8 * 16, batch_size=4,
                        window_len=8, n_top=3, n_bands=2, per_band=1, eval_tokens=16,
                        progress=False, db_url=f"sqlite:///{tmp_path / 'x.db'}",
                        cache_dir=tmp_path / "cache", dtype="bfloat16")
    records, _ = compute_records(opts, lm=lm, sae=sae, log=lambda m: None)
    assert seen and set(seen) == {torch.float32}
    assert records.run.config["model_dtype"] == "bfloat16"
    ev = records.run.sae_stats["explained_variance"]
    assert ev == ev  # the evaluation ran on the bfloat16 model (not NaN)
    f32, _ = compute_records(replace(opts, dtype="float32", cache_dir=tmp_path / "c32"),
                             lm=load_model("tiny-llama", cache_dir=tmp_path),
                             sae=SAE.load(sae_path), log=lambda m: None)
    assert "model_dtype" not in f32.run.config
