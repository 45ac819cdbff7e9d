"""Tiny random Llama and Gemma 3 models with a small locally trained tokenizer, for tests.

They run the same Hugging Face code paths as the real presets (hooks, masks, norms, tied or
untied unembedding) in milliseconds. Weights are seeded, and the byte-level BPE tokenizer is
trained on the built-in text below, so every build is identical.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from app.engine.lm import LanguageModel
from app.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY_PRESETS = ("tiny-llama", "tiny-gemma3")
D_MODEL = 64
N_LAYERS = 4
VOCAB_TARGET = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<bos>", "<eos>")  # ids 0, 1, 2

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A sparse autoencoder reads the residual stream of a
language model and writes it back as a sum of a few feature directions. Each feature fires on some
tokens and stays silent on the rest; the explorer shows the top activating windows of every feature.
def add(a, b):
    return a + b

class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count

for i in range(10):
    print(i, add(i, i))

Python is a programming language that lets you work quickly and integrate systems effectively.
The standard library contains built-in modules that provide access to system functionality such
as file input and output, as well as modules written in Python that provide standardized
solutions for many problems that occur in everyday programming.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 -1 +1 = < > ! ? ; : , . ' " ( ) [ ] { } # @
Once upon a time there was a little model with four layers. It could not say much, but it always
tried its best, and every test that called it finished in the blink of an eye.
"""


@lru_cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 512 tokens) with BOS `<bos>` = 1, built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte gets a token, so any text round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def _config(name: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=D_MODEL,
        intermediate_size=2 * D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # Larger than HF's 0.02 so activations and logits are far from zero and uniform,
        # which keeps the equality and intervention tests meaningful.
        initializer_range=0.1,
    )
    if name == "tiny-llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-6)
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **common,
        head_dim=16,
        query_pre_attn_scalar=16,
        # A short window so sliding and full attention layers really differ on test inputs.
        sliding_window=8,
        layer_types=["sliding_attention"] * (N_LAYERS - 1) + ["full_attention"],
        tie_word_embeddings=True,
    )


def build_tiny(name: str, *, seed: int = 0) -> LanguageModel:
    """A LanguageModel with seeded random weights (the same for the same name and seed)."""
    from transformers import AutoModelForCausalLM

    if name not in TINY_PRESETS:
        raise ConfigError(f"unknown tiny model {name!r}; tiny models: {', '.join(TINY_PRESETS)}")
    tokenizer = tiny_tokenizer()
    config = _config(name, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # HF initialises norm weights to a constant; random ones make a wrong norm site or a
        # forgotten Gemma (1 + weight) offset show up in the tests.
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "norm" in pname:
                    param.add_(0.2 * torch.randn_like(param))
    return LanguageModel(
        model_id=name,
        source="tiny",
        hf_model=model,
        tokenizer=tokenizer,
        has_chat_template=False,
    )
