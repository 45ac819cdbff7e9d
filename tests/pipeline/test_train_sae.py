"""The train-sae job (app/pipeline/train_sae.py): corpus -> SAE folder, through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine.sae import SAE, SAEConfig
from app.errors import ConfigError
from app.pipeline.train_sae import default_sae_id, ensure_sae, sae_folder


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SAESCOPE_SAES_DIR", str(tmp_path / "saes"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.fixture
def text_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.md").write_text(
            f"# Note {i}\nThe quick brown fox jumps over the lazy dog. def f(a): return a\n"
            * (20 + 5 * i), encoding="utf-8")
    return folder


def _cli(*args):
    from typer.testing import CliRunner

    from app.cli import app

    return CliRunner().invoke(app, ["train-sae", *args])


def test_train_sae_command_writes_a_saelens_folder_with_evals(isolated_home, text_corpus):
    import json

    result = _cli("--model", "tiny-llama", "--hook", "blocks.2.hook_resid_post", "--d-sae", "64",
                  "--k", "4", "--corpus", str(text_corpus), "--tokens", "4096",
                  "--eval-tokens", "512", "--epochs", "2")
    assert result.exit_code == 0, result.output
    folder = isolated_home / "saes" / "tiny-llama" / "2-res-topk-64"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "evals.json",
                                                        "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert cfg["metadata"]["exclude_special_tokens"] is True
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    evals = json.loads((folder / "evals.json").read_text())
    for key in ("l0", "explained_variance", "normalized_mse", "n_dead", "n_dense",
                "ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "ce_loss_recovered"):
        assert key in evals
    assert evals["l0"] <= 4 and 512 - 16 < evals["eval_tokens"] <= 512  # text tokens
    assert evals["train_tokens"] == cfg["metadata"]["training_tokens"] <= 4096
    assert "CE loss recovered" in result.output
    sae = SAE.load(folder)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    # the training checkpoint is removed once the SAE is saved
    assert not any((isolated_home / "home" / "cache" / "train").glob("*/checkpoint.pt"))


@pytest.mark.parametrize(("args", "message"), [
    (["--tokens", "100000000"], "lower --tokens"),
    (["--hook", "blocks.9.hook_resid_post"], "unknown hook"),
    (["--k", "65", "--d-sae", "64"], "k must be between"),
    (["--text-field", "body", "--corpus", "CORPUS/notes.jsonl"], "no field 'body'"),
    (["--corpus", "CORPUS/missing.txt"], "not found"),
])
def test_train_sae_command_bad_input_exits_2_and_writes_nothing(isolated_home, text_corpus,
                                                                args, message):
    (text_corpus / "notes.jsonl").write_text('{"text": "hello"}\n')
    args = [a.replace("CORPUS", str(text_corpus)) for a in args]
    defaults = ["--model", "tiny-llama", "--hook", "blocks.2.hook_resid_post",
                "--corpus", str(text_corpus), "--tokens", "1024"]
    result = _cli(*defaults, *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (isolated_home / "home").exists() and not (isolated_home / "saes").exists()


def test_default_sae_id_names_layer_set_architecture_and_width():
    assert default_sae_id("blocks.15.hook_resid_post", d_sae=4096) == "15-res-topk-4k"
    assert default_sae_id("blocks.3.hook_mlp_out", d_sae=100) == "3-mlp-topk-100"
    with pytest.raises(ConfigError, match="pass --sae-id"):
        default_sae_id("blocks.3.attn.hook_z", d_sae=64)


def test_ensure_sae_returns_an_existing_folder_under_saes_dir_without_training(tmp_path):
    folder = sae_folder(tmp_path / "saes", model_id="tiny-llama", sae_id="2-res-topk-64")
    SAE.from_config(SAEConfig(architecture="topk", d_in=8, d_sae=64, k=4), seed=0).save(folder)

    def no_training(message):
        raise AssertionError(f"ensure_sae tried to train: {message}")

    got = ensure_sae(saes_dir=tmp_path / "saes", cache_dir=tmp_path / "cache",
                     model="tiny-llama", sae_id="2-res-topk-64", log=no_training)
    assert got == tmp_path / "saes" / "tiny-llama" / "2-res-topk-64"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("args", "flag"), [
    (["--d-sae", "0"], "'--d-sae'"),
    (["--epochs", "0"], "'--epochs'"),
    (["--k", "0"], "'--k'"),
    (["--tokens", "100"], "'--tokens'"),
    (["--seed", "-1"], "'--seed'"),
])
def test_train_sae_option_ranges_name_the_flag(isolated_home, args, flag):
    result = _cli("--model", "tiny-llama", *args)
    assert result.exit_code == 2
    assert f"Invalid value for {flag}" in result.output
    assert "batch" not in result.output and "d_sae=" not in result.output
    assert not (isolated_home / "home").exists() and not (isolated_home / "saes").exists()


def test_help_shows_ranges_the_sae_id_rule_and_hub_ids():
    from typer.testing import CliRunner

    from app.cli import app

    def help_text(command):
        result = CliRunner(env={"COLUMNS": "240"}).invoke(app, [command, "--help"])
        assert result.exit_code == 0
        return " ".join(result.output.replace("│", " ").split())

    train = help_text("train-sae")
    for text in ("[1<=x<=1048576]", "[x>=128]", "[1<=x<=1000]", "LAYER-SET-topk-WIDTH",
                 "hub id org/name"):
        assert text in train
    assert "hub id org/name" in help_text("build")


def test_unwritable_out_fails_before_the_model_loads_and_writes_nothing(isolated_home,
                                                                       text_corpus):
    blocker = isolated_home / "a-file"
    blocker.write_text("not a folder")
    keep = isolated_home / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    outs = {str(blocker / "sae"): "is not a folder", str(keep): "holds no SAE"}
    if Path("/proc/self").is_dir():  # a folder no one can create anything in, even root
        outs["/proc/saescope-x"] = "/proc is not writable"
    before = sorted(isolated_home.rglob("*"))
    for out, message in outs.items():
        result = _cli("--model", "tiny-llama", "--hook", "blocks.2.hook_resid_post",
                      "--corpus", str(text_corpus), "--out", out)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.strip().splitlines()
                 if not line.startswith("data folder: ")]  # the banner every long command prints
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
        assert sorted(isolated_home.rglob("*")) == before  # no cache, no SAE, no probe left
    assert (keep / "todo.txt").read_text() == "mine"


def test_a_failed_final_write_keeps_the_sae_and_a_rerun_does_not_train_again(
        tmp_path, text_corpus, monkeypatch):
    import json
    import shutil

    from app.pipeline.train_sae import train_sae

    dest = tmp_path / "dest"
    options = dict(cache_dir=tmp_path / "cache", model="tiny-llama",
                   hook_name="blocks.2.hook_resid_post", d_sae=64, k=4, corpus=str(text_corpus),
                   tokens=4096, eval_tokens=512, epochs=2, progress=False)

    def block_the_destination(message):
        if message.startswith("evaluating"):  # after training: the folder turns into a file
            shutil.rmtree(dest, ignore_errors=True)
            dest.write_text("in the way")

    dest.mkdir()
    with pytest.raises(ConfigError) as err:
        train_sae(out=dest / "sae", log=block_the_destination, **options)
    message = str(err.value)
    assert f"cannot write the SAE to {dest / 'sae'}" in message and "\n" not in message
    kept = Path(message.split("the trained SAE is kept at ")[1].split(": copy")[0])
    assert sorted(p.name for p in kept.iterdir()) == ["cfg.json", "evals.json",
                                                      "sae_weights.safetensors"]
    assert "resumes from the finished checkpoint" in message
    kept_sae = SAE.load(kept)
    kept_evals = json.loads((kept / "evals.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("the rerun trained again")

    monkeypatch.setattr("app.engine.train.topk_loss_and_grads", no_training)
    result = train_sae(out=tmp_path / "retry", log=lambda message: None, **options)
    torch.testing.assert_close(result.sae.W_enc, kept_sae.W_enc)
    assert result.evals["explained_variance"] == kept_evals["explained_variance"]
    assert not kept.exists()  # spent with its checkpoint once the SAE is saved
